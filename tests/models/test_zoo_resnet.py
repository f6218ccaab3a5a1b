"""ResNet-34/50/101/152, ResNeXt-50 32x4d and ShuffleNet v2: published sizes and structure."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.models.architectures import build_model, get_spec
from pipeline.models.shufflenet import channel_shuffle, channel_split

FAMILY_MODELS = {
    "resnet34": "resnet",
    "resnet50": "resnet",
    "resnet101": "resnet",
    "resnet152": "resnet",
    "resnext50_32x4d": "resnext",
    "shufflenet_v2": "shufflenet",
}

# torchvision's sum(p.numel() for p in model.parameters()) at 224x224x3, 1000 classes.
# The builders give exactly these (trainable params, measured): resnet34 21_797_672,
# resnet50 25_557_032, resnet101 44_549_160, resnet152 60_192_808,
# resnext50_32x4d 25_028_904, shufflenet_v2 2_278_604; 0.5x 1_366_792,
# 1.5x 3_503_624, 2.0x 7_393_996.
PUBLISHED = {
    ("resnet34", 1.0): 21_797_672,
    ("resnet50", 1.0): 25_557_032,
    ("resnet101", 1.0): 44_549_160,
    ("resnet152", 1.0): 60_192_808,
    ("resnext50_32x4d", 1.0): 25_028_904,
    ("shufflenet_v2", 1.0): 2_278_604,
    ("shufflenet_v2", 0.5): 1_366_792,
    ("shufflenet_v2", 1.5): 3_503_624,
    ("shufflenet_v2", 2.0): 7_393_996,
}


def count_params(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def pixels(shape, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype(np.float32)


@pytest.fixture(autouse=True)
def fresh_session():
    yield
    keras.backend.clear_session()


@pytest.mark.parametrize(("name", "width"), sorted(PUBLISHED))
def test_imagenet_param_count_matches_torchvision(name: str, width: float) -> None:
    model = build_model(name, (224, 224, 3), 1000, small_input=False, width_multiplier=width)
    published = PUBLISHED[name, width]
    assert abs(count_params(model.trainable_weights) - published) <= 0.01 * published
    assert model.get_layer("head_pool").input.shape[1:3] == (7, 7)


@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_registered_with_family(name: str) -> None:
    spec = get_spec(name)
    assert spec.family == FAMILY_MODELS[name]
    assert spec.hand_written and spec.imagenet_size == 224


def test_resnext_3x3_convs_are_grouped() -> None:
    model = build_model("resnext50_32x4d", (32, 32, 3), 10, width_multiplier=0.25)
    spatial = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.name.endswith("_2_conv")
    ]
    assert len(spatial) == 3 + 4 + 6 + 3
    assert all(layer.groups == 32 and layer.kernel_size == (3, 3) for layer in spatial)
    for layer in spatial:
        cin, cout = layer.input.shape[-1], layer.output.shape[-1]
        assert count_params(layer.weights) == 3 * 3 * (cin // 32) * cout

    full = build_model("resnext50_32x4d", (32, 32, 3), 10)
    conv = full.get_layer("stage1_block1_2_conv")
    assert conv.get_config()["groups"] == 32
    assert conv.input.shape[-1] == conv.output.shape[-1] == 128  # int(64 * 4 / 64) * 32
    assert count_params(conv.weights) == 3 * 3 * (128 // 32) * 128
    bottleneck = build_model("resnet50", (32, 32, 3), 10).get_layer("stage1_block1_2_conv")
    assert bottleneck.groups == 1 and count_params(bottleneck.weights) == 3 * 3 * 64 * 64


def test_small_input_keeps_resolution_resnet50() -> None:
    def final_map(small_input: bool) -> tuple[int, int]:
        model = build_model("resnet50", (32, 32, 3), 10, small_input=small_input)
        return tuple(model.get_layer("head_pool").input.shape[1:3])

    assert final_map(True) == (4, 4)
    assert final_map(False) == (1, 1)


@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_forward_small_input(name: str) -> None:
    width = 0.25 if name in ("resnet101", "resnet152") else 1.0
    model = build_model(name, (32, 32, 3), 10, small_input=True, width_multiplier=width)
    probs = keras.ops.convert_to_numpy(model(pixels((32, 32, 3)), training=False))
    assert probs.shape == (2, 10) and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["shufflenet_v2", "resnext50_32x4d"])
def test_training_step_is_finite(name: str) -> None:
    # Eagerly: one step, and tracing (let alone XLA) costs tens of seconds on CPU.
    model = build_model(name, (32, 32, 3), 10, dropout=0.2, width_multiplier=0.25)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
    loss = model.train_on_batch(pixels((32, 32, 3), n=4), np.arange(4) % 10)
    assert np.isfinite(loss)


def test_shufflenet_split_and_shuffle_match_torchvision() -> None:
    inputs = keras.Input((2, 2, 8))
    left, right = channel_split(inputs, "stage1_split")
    shuffled = channel_shuffle(inputs, "stage1_shuffle")
    x = np.arange(2 * 2 * 8, dtype=np.float32).reshape(1, 2, 2, 8)
    outs = keras.Model(inputs, [left, right, shuffled])(x)
    left, right, shuffled = (keras.ops.convert_to_numpy(t) for t in outs)
    np.testing.assert_array_equal(left, x[..., :4])  # torch: x.chunk(2, dim=1)
    np.testing.assert_array_equal(right, x[..., 4:])
    # torchvision's channel_shuffle with 2 groups: channels 0,4,1,5,2,6,3,7
    np.testing.assert_array_equal(shuffled, x[..., [0, 4, 1, 5, 2, 6, 3, 7]])


def test_shufflenet_other_width_scales_stages() -> None:
    model = build_model("shufflenet_v2", (32, 32, 3), 10, width_multiplier=0.25)
    widths = [model.get_layer(f"stage{s}_unit1_concat").output.shape[-1] for s in (1, 2, 3)]
    assert widths == [32, 56, 120]  # scaled_width(116 / 232 / 464 * 0.25)
    assert model.get_layer("head_conv5_conv").output.shape[-1] == 1024


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_shufflenet_keras_round_trip(padding: str, tmp_path: Path) -> None:
    from pipeline.models.blocks import LayerChoices

    choices = LayerChoices(padding=padding)
    model = build_model("shufflenet_v2", (32, 32, 3), 10, width_multiplier=0.5, choices=choices)
    images = pixels((32, 32, 3))
    probs = keras.ops.convert_to_numpy(model(images, training=False))
    path = tmp_path / "shufflenet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(images, training=False)), probs)
