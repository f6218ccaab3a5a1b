"""keras.applications adapters and the ViTs: published sizes, small_input, saving, refusals."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.models.applications import ADAPTERS
from pipeline.models.architectures import build_model, get_spec
from pipeline.models.blocks import BN_MOMENTUM, LayerChoices

# Published trainable parameters at the ImageNet configuration (1000 classes).
# Ours (exact, keras 3.15) in the comments; tested within 1%.
PUBLISHED_PARAMS = {
    # Szegedy et al. 23.85M counts the aux classifier; Keras has none: 23,817,352
    "inception_v3": 23_850_000,
    "densenet121": 7_980_000,  # 7,978,856
    "mobilenet_v1": 4_230_000,  # 4,231,976
    "mobilenet_v2": 3_500_000,  # 3,504,872
    "mobilenet_v3_small": 2_540_000,  # 2,542,856
    "mobilenet_v3_large": 5_480_000,  # 5,483,032
    "efficientnet_b0": 5_290_000,  # 5,288,548
    "convnext_tiny": 28_590_000,  # 28,589,128
    # DeiT-Tiny 5,717,416 with a class token; ours pools tokens instead: 5,717,032
    "vit_tiny": 5_720_000,
}


def pixels(side: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, side, side, 3)).astype(np.float32)


def count(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def final_map(model) -> tuple[int, int]:
    return tuple(model.get_layer("head_pool").input.shape[1:3])


def check_probabilities(model, side: int) -> np.ndarray:
    probs = keras.ops.convert_to_numpy(model(pixels(side), training=False))
    assert probs.dtype == np.float32 and probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    return probs


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_imagenet_params_match_published(name: str) -> None:
    side = get_spec(name).imagenet_size
    model = build_model(name, (side, side, 3), 1000, dropout=0.2, small_input=False)
    params = count(model.trainable_weights)
    keras.backend.clear_session()
    assert abs(params - PUBLISHED_PARAMS[name]) <= 0.01 * PUBLISHED_PARAMS[name], params


@pytest.mark.parametrize("name", sorted(set(ADAPTERS) - {"inception_v3"}))
def test_small_input_keeps_resolution_and_predicts(name: str) -> None:
    small = build_model(name, (32, 32, 3), 10, small_input=True)
    # Stem and first downsampling at stride 1: 32x32 -> 4x4 instead of 1x1.
    assert final_map(small) == (4, 4)
    # BatchNorm statistics follow a short run (Keras's 0.99/0.999 would not).
    norms = [layer for layer in small.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(layer.momentum == BN_MOMENTUM == 0.9 for layer in norms)
    check_probabilities(small, 32)
    if name in ("efficientnet_b1", "efficientnet_b2", "efficientnet_b3"):
        return  # same layers restrided as efficientnet_b0: spare the time
    large = build_model(name, (32, 32, 3), 10, small_input=False)
    assert final_map(large) == (1, 1)
    assert count(small.weights) == count(large.weights)  # strides only
    keras.backend.clear_session()


def test_inception_ignores_small_input_and_names_are_deterministic() -> None:
    small = build_model("inception_v3", (75, 75, 3), 10, small_input=True)
    large = build_model("inception_v3", (75, 75, 3), 10, small_input=False)
    # Keras's counter names (conv2d_57 ...) are renumbered per model.
    assert [layer.name for layer in small.layers] == [layer.name for layer in large.layers]
    assert small.get_layer("backbone_conv2d").strides == (2, 2)
    assert final_map(small) == final_map(large) == (1, 1)
    check_probabilities(small, 75)
    keras.backend.clear_session()


def test_vit_patches_follow_small_input() -> None:
    small = build_model("vit_tiny", (32, 32, 3), 10, small_input=True)
    assert final_map(small) == (8, 8)  # 4x4 patches: 64 tokens
    check_probabilities(small, 32)
    with pytest.raises(ConfigError, match="prepare.image_size"):
        build_model("vit_tiny", (40, 40, 3), 10, small_input=False)  # 16x16 patches
    with pytest.raises(ConfigError, match="prepare.image_size"):
        build_model("vit_tiny", (30, 30, 3), 10)


# Keras's own saving code trips NumPy 2's `copy` deprecation on TensorFlow variables.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("name", ["vit_tiny", "mobilenet_v3_small"])
def test_keras_file_round_trip(name: str, tmp_path: Path) -> None:
    model = build_model(name, (32, 32, 3), 10, dropout=0.2, small_input=True)
    probs = check_probabilities(model, 32)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    reloaded = keras.ops.convert_to_numpy(loaded(pixels(32), training=False))
    np.testing.assert_array_equal(reloaded, probs)
    keras.backend.clear_session()


def test_position_embedding_config_round_trip() -> None:
    from pipeline.models.layers import PositionEmbedding

    layer = PositionEmbedding(stddev=0.5, name="stem_position")
    clone = PositionEmbedding.from_config(layer.get_config())
    assert clone.stddev == 0.5 and clone.name == "stem_position"


@pytest.mark.parametrize("name", ["mobilenet_v2", "vit_tiny"])
def test_operator_choices_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="model.norm"):
        build_model(name, (32, 32, 3), 10, choices=LayerChoices(norm="group"))
