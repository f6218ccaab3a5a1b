"""The classic families (LeNet-5, AlexNet, VGG, GoogLeNet) against their published layouts.

Published parameter counts are torchvision's `sum(p.numel() for p in model.parameters())`
(trainable only: batch norm's moving statistics are buffers there, non-trainable here).
torchvision's AlexNet and plain VGGs have no batch norm, so they are built with
`LayerChoices(norm="none")` (a conv bias, no norm) where the default choices add batch
norm for trainability; VGG-16/19 come from keras.applications (no norm) with default
choices. The counts match exactly; the tests allow the issue's 1%.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.models.architectures import build_model, get_spec
from pipeline.models.blocks import LayerChoices
from pipeline.models.googlenet import INCEPTION_STAGES

CLASSIC = ("lenet5", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "googlenet")
NO_NORM = LayerChoices(norm="none")

# name -> (published trainable parameters at 224x224x3, 1000 classes; choices to match it)
IMAGENET = {
    "alexnet": (61_100_840, NO_NORM),
    "vgg11": (132_863_336, NO_NORM),
    "vgg13": (133_047_848, NO_NORM),
    "vgg16": (138_357_544, LayerChoices()),
    "vgg19": (143_667_240, LayerChoices()),
}
# torchvision.models.googlenet(aux_logits=False, init_weights=True): 3x3 third branch.
TORCHVISION_GOOGLENET = 6_624_904


def trainable(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def pixels(shape, n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, *shape)).astype(np.float32)


def layer_types(model) -> set[str]:
    return {type(layer).__name__ for layer in model.layers}


@pytest.fixture(autouse=True)
def fresh_session():
    yield
    keras.backend.clear_session()


@pytest.mark.parametrize("name", list(IMAGENET))
def test_imagenet_param_counts_match_torchvision(name: str) -> None:
    published, choices = IMAGENET[name]
    model = build_model(name, (224, 224, 3), 1000, small_input=False, choices=choices)
    count = trainable(model)
    assert abs(count - published) <= 0.01 * published, f"{name}: {count:,} vs {published:,}"
    assert count == published
    # The published classifier input: 6x6x256 (AlexNet), 7x7x512 (VGG), no pooling needed.
    side, channels = (6, 256) if name == "alexnet" else (7, 512)
    head_pool = model.get_layer("head_pool")
    assert tuple(head_pool.input.shape[1:]) == (side, side, channels)
    assert model.get_layer("head_fc1").input.shape[-1] == side * side * channels
    assert model.get_layer("head_fc1").units == 4096


def test_alexnet_maps_follow_torchvision() -> None:
    """11x11/4 p2 -> 55, pool 3/2 -> 27, 5x5 p2 -> 27, pool -> 13, 3x3s -> 13, pool -> 6."""
    model = build_model("alexnet", (224, 224, 3), 1000, small_input=False, choices=NO_NORM)
    sides = {
        "stem_conv": 55,
        "stem_down_maxpool": 27,
        "stage1_conv": 27,
        "stage1_down_maxpool": 13,
        "stage2_3_conv": 13,
        "stage2_down_maxpool": 6,
    }
    for layer, side in sides.items():
        assert model.get_layer(layer).output.shape[1:3] == (side, side), layer


def inception_params(kernel_3rd_branch: int) -> int:
    """Paper table 1 with torchvision's BasicConv2d (conv without bias + BN gamma/beta)."""

    def conv_bn(c_in: int, c_out: int, k: int) -> int:
        return k * k * c_in * c_out + 2 * c_out

    total = conv_bn(3, 64, 7) + conv_bn(64, 64, 1) + conv_bn(64, 192, 3)
    c_in = 192
    for modules in INCEPTION_STAGES.values():
        for n1, r3, n3, r5, n5, proj in modules.values():
            total += conv_bn(c_in, n1, 1) + conv_bn(c_in, r3, 1) + conv_bn(r3, n3, 3)
            total += conv_bn(c_in, r5, 1) + conv_bn(r5, n5, kernel_3rd_branch)
            total += conv_bn(c_in, proj, 1)
            c_in = n1 + n3 + n5 + proj
    assert c_in == 1024
    return total + 1024 * 1000 + 1000


def test_googlenet_has_torchvisions_parameter_count() -> None:
    """6,624,904 = torchvision's googlenet(aux_logits=False), recomputed from the table.

    The paper's 5x5 third branch would add (25 - 9) * sum(5x5 reduce * 5x5) =
    16 * 23,808 = 380,928, where the sum over 3a..5b is 16*32 + 32*96 + 16*48 + 24*64
    + 24*64 + 32*64 + 32*128 + 32*128 + 48*128.
    """
    assert inception_params(3) == TORCHVISION_GOOGLENET  # the table is torchvision's
    extra = 16 * sum(m[3] * m[4] for stage in INCEPTION_STAGES.values() for m in stage.values())
    assert inception_params(5) == TORCHVISION_GOOGLENET + extra == TORCHVISION_GOOGLENET + 380_928

    # torchvision's GoogLeNet has batch norm: default choices.
    model = build_model("googlenet", (224, 224, 3), 1000, small_input=False)
    assert trainable(model) == TORCHVISION_GOOGLENET
    assert model.get_layer("head_pool").input.shape[1:] == (7, 7, 1024)
    assert model.get_layer("stage3_a_branch3_conv").kernel.shape[:2] == (3, 3)


@pytest.mark.parametrize("small_input", [False, True])
def test_lenet5_has_61_7k_params_on_32x32(small_input: bool) -> None:
    # 156 + 2,416 + 48,120 + 10,164 + 850 (conv 6@5x5, conv 16@5x5, 400-120-84-10)
    model = build_model("lenet5", (32, 32, 1), 10, small_input=small_input, choices=NO_NORM)
    assert trainable(model) == 61_706
    # Default batch norm: two convs lose their biases (-22), gain gamma and beta (+44).
    model = build_model("lenet5", (32, 32, 1), 10, small_input=small_input)
    assert abs(trainable(model) - 61_706) <= 0.01 * 61_706
    # small_input=False is the paper's valid first conv: 32 -> 28 -> 14 -> 10 -> 5.
    side = 6 if small_input else 5
    assert model.get_layer("head_pool").input.shape[1:] == (side, side, 16)


@pytest.mark.parametrize("name", CLASSIC)
def test_forward_at_32x32_small_input(name: str) -> None:
    model = build_model(name, (32, 32, 3), 10, dropout=0.5, small_input=True)
    probs = keras.ops.convert_to_numpy(model(pixels((32, 32, 3)), training=False))
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs >= 0).all()


# Smallest side each builds with small_input=False (the registry's min_size is for True).
LARGE_INPUT_SIDE = {"lenet5": 13, "alexnet": 63}


@pytest.mark.parametrize("name", CLASSIC)
def test_small_input_keeps_a_larger_last_map(name: str) -> None:
    def last_map(side: int, small_input: bool) -> tuple[int, int]:
        model = build_model(name, (side, side, 3), 10, small_input=small_input)
        return tuple(model.get_layer("head_pool").input.shape[1:3])

    small = last_map(32, True)  # every one builds at 32x32 with small_input
    side = max(32, LARGE_INPUT_SIDE.get(name, 32))  # AlexNet's large layout needs 63
    large = last_map(side, False)
    assert large[0] < small[0] and large[1] < small[1], (small, large)


@pytest.mark.parametrize("name", ["lenet5", "alexnet"])
def test_large_input_layout_refuses_too_small_images(name: str) -> None:
    side = LARGE_INPUT_SIDE[name]
    build_model(name, (side, side, 3), 10, small_input=False)
    with pytest.raises(ConfigError, match="model.small_input false needs images of at least"):
        build_model(name, (side - 1, side - 1, 3), 10, small_input=False)
    # ...while small_input=True goes down to the registry's min_size.
    low = get_spec(name).min_size
    build_model(name, (low, low, 3), 10, small_input=True)


def test_adaptive_head_pool_has_torchvision_bins() -> None:
    """AdaptiveAvgPool2d: output cell i averages rows floor(i*H/n) .. ceil((i+1)*H/n)."""
    model = build_model("alexnet", (64, 64, 3), 10, small_input=True, choices=NO_NORM)
    pool = model.get_layer("head_pool")
    for side in (3, 7, 13):
        x = np.random.default_rng(side).normal(size=(1, side, side, 2)).astype(np.float32)
        expected = np.zeros((1, 6, 6, 2), np.float32)
        for i in range(6):
            r0, r1 = i * side // 6, -(-(i + 1) * side // 6)
            for j in range(6):
                c0, c1 = j * side // 6, -(-(j + 1) * side // 6)
                expected[0, i, j] = x[0, r0:r1, c0:c1].mean(axis=(0, 1))
        got = keras.ops.convert_to_numpy(pool(x))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_separable_convs_shrink_lenet() -> None:
    standard = build_model("lenet5", (32, 32, 1), 10, small_input=False)
    separable = build_model(
        "lenet5", (32, 32, 1), 10, small_input=False, choices=LayerChoices(conv="separable")
    )
    assert trainable(separable) < trainable(standard)
    assert "SeparableConv2D" in layer_types(separable)
    # the valid 5x5 keeps its output size whatever the conv type
    assert separable.get_layer("stage2_conv").output.shape[1:3] == (10, 10)


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "vgg11", "googlenet"])
def test_strided_downsampling_replaces_pools(name: str) -> None:
    pooled = build_model(name, (64, 64, 3), 10, small_input=False)
    strided = build_model(
        name, (64, 64, 3), 10, small_input=False, choices=LayerChoices(downsample="strided")
    )
    assert "MaxPooling2D" in layer_types(pooled)
    down = [layer for layer in strided.layers if "_down" in layer.name]
    assert down and not any(isinstance(layer, keras.layers.MaxPooling2D) for layer in down)
    assert any(isinstance(layer, keras.layers.Conv2D) for layer in down)
    assert trainable(strided) > trainable(pooled)
    # same maps either way
    assert strided.get_layer("head_pool").input.shape == pooled.get_layer("head_pool").input.shape


def test_other_choices_apply() -> None:
    choices = LayerChoices(norm="group", activation="gelu", padding="reflect", head="gap")
    model = build_model("alexnet", (224, 224, 3), 10, small_input=False, choices=choices)
    types = layer_types(model)
    assert {"GroupNormalization", "Pad2D"} <= types
    assert "BatchNormalization" not in types
    assert model.get_layer("stem_gelu")
    # the shared head: global pool straight to the classes, no 4096 stack
    assert isinstance(model.get_layer("head_pool"), keras.layers.GlobalAveragePooling2D)
    assert not [layer for layer in model.layers if layer.name.startswith("head_fc")]
    assert model.get_layer("stem_conv").output.shape[1:3] == (55, 55)


def test_keras_vggs_are_flat_and_take_no_choices() -> None:
    model = build_model("vgg16", (32, 32, 3), 10, small_input=False)
    names = [layer.name for layer in model.layers]
    assert "block1_conv1" in names and "block5_pool" in names
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert "block5_pool" not in [
        layer.name for layer in build_model("vgg16", (32, 32, 3), 10, small_input=True).layers
    ]
    with pytest.raises(ConfigError, match="model.norm applies to hand-written"):
        build_model("vgg19", (32, 32, 3), 10, choices=NO_NORM)


def test_width_multiplier_scales_hidden_widths() -> None:
    half = build_model("alexnet", (64, 64, 3), 10, width_multiplier=0.5)
    assert half.get_layer("stage1_conv").filters == 96
    assert half.get_layer("head_fc1").units == 2048
    # LeNet rounds without multiples of 8: 6 and 16 channels at width 1
    lenet = build_model("lenet5", (32, 32, 1), 10)
    assert lenet.get_layer("stage1_conv").filters == 6
    assert lenet.get_layer("stage2_conv").filters == 16
    assert (
        build_model("vgg16", (32, 32, 3), 10, width_multiplier=0.5).get_layer("head_fc2").units
        == 2048
    )


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "vgg11"])
def test_trains_compiled_at_the_smallest_size(name: str) -> None:
    """At the registry's min_size the last map is 1x1: the head must train compiled (a
    graph, as `fit` runs it), not only eagerly, and replicate the cell as adaptive pooling
    does."""
    side = get_spec(name).min_size
    model = build_model(name, (side, side, 3), 3, small_input=True)
    assert tuple(model.get_layer("head_pool").input.shape[1:3]) == (1, 1)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=False)
    x = np.random.default_rng(0).uniform(0, 255, (2, side, side, 3)).astype(np.float32)
    assert np.isfinite(model.train_on_batch(x, np.array([0, 1])))
    cell = np.random.default_rng(1).normal(size=(1, 1, 1, 4)).astype(np.float32)
    pooled = keras.ops.convert_to_numpy(model.get_layer("head_pool")(cell))
    np.testing.assert_allclose(pooled, np.broadcast_to(cell, pooled.shape))
