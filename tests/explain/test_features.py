"""Feature maps, first-layer filters, activation maximization and ViT attention rollout,
checked against numpy where there is an answer to check, on whichever backend
KERAS_BACKEND names."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.explain import attention, features
from pipeline.models.architectures import build_model


def pointwise_network(channels: int = 3):
    """A 1x1 convolution (relu), then a 3x3 one, pooled to 2 classes."""
    inputs = keras.Input((5, 5, channels))
    x = keras.layers.Conv2D(4, 1, activation="relu", name="point")(inputs)
    x = keras.layers.Conv2D(2, 3, name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def test_feature_maps_are_the_layer_outputs():
    keras.utils.set_random_seed(2)
    model = pointwise_network()
    images = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.get_layer("point").weights)
    expected = np.maximum(images @ kernel[0, 0] + bias, 0)
    np.testing.assert_allclose(
        features.feature_maps(model, images, "point"), expected, rtol=1e-5, atol=1e-4
    )
    assert features.feature_maps(model, images).shape == (2, 3, 3, 2)  # the last map
    # a layer a skip connection passes by still has maps (no cut is needed)
    resnet = build_model("resnet18", (16, 16, 1), 3, width_multiplier=0.25)
    maps = features.feature_maps(resnet, np.zeros((1, 16, 16, 1)), "stage2_block1_1_relu")
    assert maps.shape[:3] == (1, 8, 8)
    with pytest.raises(ConfigError, match="--layer 'nope': .* has no such layer"):
        features.feature_maps(model, images, "nope")


@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grey"])
def test_first_layer_filters_are_the_kernels_scaled_about_grey(channels):
    keras.utils.set_random_seed(4)
    model = pointwise_network(channels)
    kernel = keras.ops.convert_to_numpy(model.get_layer("point").kernel)  # 1, 1, in, 4
    filters, name = features.first_layer_filters(model)
    assert name == "point"
    tiles = np.moveaxis(kernel, -1, 0)
    if channels == 1:
        tiles = tiles.mean(axis=-1)
        assert filters.shape == (4, 1, 1)
    else:
        assert filters.shape == (4, 1, 1, 3)
    reach = np.abs(tiles).reshape(4, -1).max(axis=1).reshape(-1, *[1] * (tiles.ndim - 1))
    np.testing.assert_allclose(filters, 0.5 + 0.5 * tiles / reach, rtol=1e-6)
    assert filters.min() >= 0 and filters.max() <= 1


def test_activation_maximization_excites_each_channel_repeatably():
    keras.utils.set_random_seed(0)
    model = build_model("simple_cnn", (16, 16, 1), 10, width_multiplier=0.25)
    layer, channels = "stage2_2_relu", [1, 3, 5]
    found = features.maximize(model, layer, channels, steps=32, seed=0)
    assert found.shape == (3, 16, 16, 1) and found.dtype == np.uint8
    start = 128 + np.random.default_rng(0).normal(0, 8, (1, 16, 16, 1))
    before = features.channel_activation(model, layer, start)[0, channels]
    after = np.diag(features.channel_activation(model, layer, found)[:, channels])
    assert (after > 1.5 * before).all(), (before, after)
    np.testing.assert_array_equal(features.maximize(model, layer, channels, steps=32), found)
    with pytest.raises(ConfigError, match="stage2_2_relu: channels \\[99\\] outside 0..15"):
        features.maximize(model, layer, [99], steps=1)


def numpy_attention(tokens, layer):
    """softmax(q k^T / sqrt(d)) per head from the layer's query and key weights."""
    weights = {w.path.split("/", 1)[1]: keras.ops.convert_to_numpy(w) for w in layer.weights}
    q = (
        np.einsum("ntd,dhk->nhtk", tokens, weights["query/kernel"])
        + weights["query/bias"][None, :, None]
    )
    k = (
        np.einsum("ntd,dhk->nhtk", tokens, weights["key/kernel"])
        + weights["key/bias"][None, :, None]
    )
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    logits -= logits.max(axis=-1, keepdims=True)
    scores = np.exp(logits)
    return scores / scores.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("class_token", [True, False], ids=["class_token", "pooled"])
def test_attention_rollout_matches_numpy(class_token):
    keras.utils.set_random_seed(5)
    model = build_model("vit_tiny", (16, 16, 1), 3, width_multiplier=0.25, class_token=class_token)
    images = np.random.default_rng(3).uniform(0, 255, (2, 16, 16, 1)).astype(np.float32)
    layers = attention.attention_layers(model)
    assert len(layers) == 12
    queries = keras.Model(model.inputs[0], [layer.input[0] for layer in layers])
    tokens = [keras.ops.convert_to_numpy(t) for t in queries(images)]
    weights = attention.attention_weights(model, images)
    count = 17 if class_token else 16  # a 4x4 patch grid, and the token
    joint = np.eye(count)
    for layer, query, found in zip(layers, tokens, weights, strict=True):
        expected = numpy_attention(query.astype(np.float64), layer)
        np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-5)
        mixed = 0.5 * np.eye(count) + 0.5 * expected.mean(axis=1)
        joint = (mixed / mixed.sum(axis=-1, keepdims=True)) @ joint
    relevance = joint[:, 0, 1:] if class_token else joint.mean(axis=1)
    np.testing.assert_allclose(
        attention.token_relevance(model, images), relevance.reshape(2, 4, 4), rtol=1e-4
    )
    maps = attention.rollout(model, images)
    assert maps.shape == (2, 16, 16) and maps.min() == 0 and maps.max() == 1


def test_attention_is_refused_for_a_cnn():
    model = build_model("simple_cnn", (16, 16, 1), 3, width_multiplier=0.25)
    with pytest.raises(ConfigError, match="--method attention: simple_cnn has no self-attention"):
        attention.rollout(model, np.zeros((1, 16, 16, 1)))
