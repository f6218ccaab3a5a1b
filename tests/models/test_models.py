"""Every registered architecture builds at several sizes, predicts and names its layers."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest

from pipeline.models.architectures import build_model, get_spec, list_models

# Builders name every layer after its place in the network; `blockN_`: the layers
# keras.applications builds on our input (VGG-16/19: block1_conv1 ... block5_pool).
# `backbone_`: the other keras.applications (applications.py), renamed by their adapter.
LAYER_NAME = re.compile(r"^(image|rescale|stem|stage\d+|block\d+|backbone|head|probs)(_|$)")


@pytest.fixture
def restore_policy():
    """Tests that switch the global dtype policy leave float32 behind, even when they fail."""
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def pixel_batch(shape: tuple[int, int, int], n: int = 2, seed: int = 0) -> np.ndarray:
    """Raw 0..255 pixels as float32, what the loader feeds the model."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype(np.float32)


def keras_default_name(layer) -> bool:
    """True for names Keras makes up when a builder passes none: `conv2d`, `conv2d_3`."""
    base = re.sub(r"(?<!^)(?=[A-Z])", "_", type(layer).__name__).lower()
    return re.fullmatch(rf"{base}(_\d+)?", layer.name) is not None


def count_params(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def check_forward(model, shape: tuple[int, int, int]) -> np.ndarray:
    probs = model(pixel_batch(shape), training=False)
    assert probs.dtype == "float32"
    probs = keras.ops.convert_to_numpy(probs)
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs >= 0).all()
    return probs


# Keras's own saving code trips NumPy 2's `copy` deprecation on TensorFlow variables.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("name", list_models())
def test_architecture(name: str, restore_policy) -> None:
    # Sizes below the architecture's minimum are skipped (the minimum itself if none is left).
    min_size = get_spec(name).min_size
    shapes = [s for s in [(16, 16, 1), (32, 32, 3)] if s[0] >= min_size]
    for shape in shapes or [(min_size, min_size, 3)]:
        model = build_model(name, shape, 10, dropout=0.2)
        assert tuple(model.input_shape) == (None, *shape)
        check_forward(model, shape)

        names = [layer.name for layer in model.layers]
        assert len(names) == len(set(names)), "layer names are not unique"
        for layer in model.layers:
            assert LAYER_NAME.match(layer.name), f"{layer.name!r} not named by the builder"
            if not isinstance(layer, keras.layers.InputLayer):
                assert not keras_default_name(layer), f"{layer.name!r} is Keras's default"

        # The .keras round trip of every model is in test_zoo.py.

    # Mixed precision computes in bfloat16 but the probabilities stay float32.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    side = max(16, min_size)
    model = build_model(name, (side, side, 1), 10)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    check_forward(model, (side, side, 1))


@pytest.mark.parametrize("name", list_models())
def test_width_multiplier_scales_params(name: str) -> None:
    if get_spec(name).min_size > 32:
        pytest.skip("needs larger images")
    half = build_model(name, (32, 32, 3), 10, width_multiplier=0.5)
    full = build_model(name, (32, 32, 3), 10, width_multiplier=1.0)
    assert count_params(half.weights) < count_params(full.weights)


@pytest.mark.parametrize("name", list_models())
def test_small_input_keeps_resolution(name: str) -> None:
    if get_spec(name).min_size > 64:
        pytest.skip("needs larger images")
    if not get_spec(name).small_input:
        pytest.skip("model.small_input does not change its layout (refused)")

    def final_map(small_input: bool) -> tuple[int, int]:
        model = build_model(name, (64, 64, 3), 10, small_input=small_input)
        return tuple(model.get_layer("head_pool").input.shape[1:3])

    small, large = final_map(True), final_map(False)
    assert large[0] < small[0] and large[1] < small[1]


def test_resnet18_matches_torchvision_param_count() -> None:
    model = build_model("resnet18", (224, 224, 3), 1000, small_input=False)
    # torchvision.models.resnet18(): sum(p.numel() for p in model.parameters())
    assert count_params(model.trainable_weights) == 11_689_512
    assert model.get_layer("head_pool").input.shape[1:3] == (7, 7)


def test_unknown_architecture_lists_known_ones() -> None:
    with pytest.raises(KeyError) as info:
        build_model("resnet9000", (16, 16, 1), 10)
    message = str(info.value)
    assert "resnet9000" in message
    for name in list_models():
        assert name in message


def test_seeds_simple_cnn_is_the_seeds_model_less_its_redundant_conv_biases() -> None:
    """The seeds' SimpleCNN at 32x32x3, 10 classes, by their formula (k*k*Cin + 1)*Cout per
    conv, 4*C per batch norm (gamma, beta and the two moving statistics), (in + 1)*out per
    linear layer; their nn.Conv2d keeps a bias that batch norm's shift makes redundant,
    ours does not (64 + 128 + 256 fewer)."""
    model = build_model("seeds_simple_cnn", (32, 32, 3), 10, dropout=0.5)
    convs = (3 * 3 * 3 + 1) * 64 + (3 * 3 * 64 + 1) * 128 + (3 * 3 * 128 + 1) * 256
    norms = 4 * (64 + 128 + 256)
    linear = (256 + 1) * 128 + (128 + 1) * 10
    assert model.count_params() == convs + norms + linear - (64 + 128 + 256)
    assert model.get_layer("head_pool").input.shape[1:] == (4, 4, 256)  # 32 -> 16 -> 8 -> 4
    assert model.get_layer("head_dropout").rate == 0.5
    assert [type(layer).__name__ for layer in model.layers[2:6]] == [
        "Conv2D",
        "BatchNormalization",
        "Activation",
        "MaxPooling2D",
    ]
