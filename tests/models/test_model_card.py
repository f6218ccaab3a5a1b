"""The model card against hand calculations and published figures, on real Keras models."""

from __future__ import annotations

import json
import math
from functools import cache

import keras
import numpy as np
import pytest
from conftest import ROOT, run_cli
from keras import layers

from pipeline.__main__ import main
from pipeline.errors import ConfigError
from pipeline.models.architectures import build_model, get_spec, list_models
from pipeline.models.layers import Pad2D
from pipeline.models.model_card import format_table, model_card, registry_cards

REQUIRED_KEYS = {"name", "params", "trainable_params", "macs", "receptive_field"}


def tiny(*stack, shape=(32, 32, 3)):
    """Input -> the layers in order -> global pool -> dense: the card reports the map before GAP."""
    inputs = keras.Input(shape)
    x = inputs
    for layer in stack:
        x = layer(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


def one_layer(layer, shape):
    """A model that is just `layer` on an input of `shape`, to count its MACs alone."""
    inputs = keras.Input(shape)
    return keras.Model(inputs, layer(inputs))


@cache
def registry_card(name: str) -> dict:
    """The card of a registered architecture at its ImageNet size, built once per session."""
    return registry_cards(None, 1000, names=[name])[0]


@cache
def application(name: str) -> tuple[dict, int, int]:
    """(card, count_params, trainable count) of keras.applications.<name>(weights=None)."""
    model = getattr(keras.applications, name)(weights=None)
    result = model_card(model), model.count_params(), count(model.trainable_weights)
    del model
    keras.backend.clear_session()
    return result


def count(weights) -> int:
    return sum(math.prod(w.shape) for w in weights)


# ---------------------------------------------------------------- receptive field


@pytest.mark.parametrize(
    "stack, rf, stride",
    [
        # 1 + 2 + 2
        ([layers.Conv2D(4, 3), layers.Conv2D(4, 3)], 5, 1),
        # 3x3/2: 1 + 2 = 3, jump 2; 3x3: 3 + 2*2 = 7
        ([layers.Conv2D(4, 3, strides=2), layers.Conv2D(4, 3)], 7, 2),
        # dilation 2 spans 5 taps: 1 + 4 = 5; then 3x3: 5 + 2 = 7
        ([layers.Conv2D(4, 3, dilation_rate=2), layers.Conv2D(4, 3)], 7, 1),
        # 3x3: 3; 2x2/2 pool: 3 + 1 = 4, jump 2; 3x3: 4 + 2*2 = 8
        ([layers.Conv2D(4, 3), layers.MaxPooling2D(2), layers.Conv2D(4, 3)], 8, 2),
        # 3x1 then 1x3 cover 3x3: rf 3, not 5
        ([layers.Conv2D(4, (3, 1)), layers.Conv2D(4, (1, 3))], 3, 1),
        # padding moves nothing: 3 + 2 = 5
        ([Pad2D(1), layers.Conv2D(4, 3), layers.ZeroPadding2D(1), layers.Conv2D(4, 3)], 5, 1),
        # separable 3x3 (depthwise 3x3, pointwise 1x1) twice: 1 + 2 + 2 = 5
        ([layers.SeparableConv2D(4, 3), layers.SeparableConv2D(4, 3)], 5, 1),
    ],
)
def test_receptive_field_of_small_stacks(stack, rf, stride) -> None:
    card = model_card(tiny(*stack))
    assert (card["receptive_field"], card["output_stride"]) == (rf, stride)


def test_merge_takes_the_largest_field_and_longest_path() -> None:
    """Residual block: two 3x3 convs (rf 5, depth 2) added to a 1x1 shortcut (rf 1, depth 1)."""
    inputs = keras.Input((16, 16, 3))
    shortcut = layers.Conv2D(8, 1)(inputs)
    x = layers.Conv2D(8, 3, padding="same")(inputs)
    x = layers.Conv2D(8, 3, padding="same")(x)
    x = layers.Add()([shortcut, x])
    x = layers.GlobalAveragePooling2D()(x)
    card = model_card(keras.Model(inputs, layers.Dense(2)(x)))
    assert card["receptive_field"] == 5
    assert card["depth"] == 3  # conv, conv, dense
    assert card["feature_map"] == [16, 16, 8]


def test_simple_cnn_receptive_field() -> None:
    """simple_cnn at 32x32, small_input: three stages of two 3x3 convs and a 2x2/2 max pool.

    stage 1: 1 + 2*1 + 2*1 = 5, pool: 5 + 1*1 = 6, jump 2
    stage 2: 6 + 2*2 + 2*2 = 14, pool: 14 + 1*2 = 16, jump 4
    stage 3: 16 + 2*4 + 2*4 = 32, pool: 32 + 1*4 = 36, jump 8; map 32/8 = 4
    """
    card = model_card(build_model("simple_cnn", (32, 32, 3), 10, small_input=True))
    assert card["receptive_field"] == 36
    assert card["output_stride"] == 8
    assert card["feature_map"] == [4, 4, 128]
    assert card["depth"] == 7  # 6 convs + the dense layer


def test_resnet18_receptive_field() -> None:
    """ResNet-18 at 224, the published stem:

    7x7/2 conv: 1 + 6*1 = 7, jump 2; 3x3/2 max pool: 7 + 2*2 = 11, jump 4
    stage 1, four 3x3 convs: 11 + 4*2*4 = 43
    stage 2, 3x3/2 then three 3x3: 43 + 2*4 = 51, jump 8; 51 + 3*2*8 = 99
    stage 3: 99 + 2*8 = 115, jump 16; 115 + 3*2*16 = 211
    stage 4: 211 + 2*16 = 243, jump 32; 243 + 3*2*32 = 435 (torchvision's figure too)
    The 1x1 projection shortcuts add nothing and lie on shorter paths.
    """
    card = registry_card("resnet18")
    assert card["receptive_field"] == 435
    assert card["output_stride"] == 32
    assert card["feature_map"] == [7, 7, 512]
    assert card["depth"] == 18  # stem + 16 block convs + dense


def test_vgg16_receptive_field_and_depth() -> None:
    """VGG-16 (keras.applications, include_top) at 224; the map before Flatten is pool5's.

    block 1, two 3x3: 5; pool 2x2/2: 6, jump 2
    block 2: 6 + 2*2*2 = 14; pool: 16, jump 4
    block 3, three 3x3: 16 + 3*2*4 = 40; pool: 44, jump 8
    block 4: 44 + 3*2*8 = 92; pool: 100, jump 16
    block 5: 100 + 3*2*16 = 196 (the last conv); pool: 212, jump 32
    """
    card, _, _ = application("VGG16")
    assert card["receptive_field"] == 212
    assert card["output_stride"] == 32
    assert card["feature_map"] == [7, 7, 512]
    assert card["depth"] == 16  # 13 convs + 3 dense


def test_attention_sees_the_whole_image() -> None:
    """ViT-like: 8x8/8 patches to tokens, self-attention: the field is the input side."""
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(64, 8, strides=8)(inputs)
    x = layers.Reshape((16, 64))(x)
    x = layers.MultiHeadAttention(num_heads=4, key_dim=16)(x, x)
    x = layers.GlobalAveragePooling1D()(x)
    card = model_card(keras.Model(inputs, layers.Dense(10)(x)))
    assert card["receptive_field"] == 32
    assert card["output_stride"] == 8
    assert card["feature_map"] == [4, 4, 64]
    # patch conv 4*4 * 8*8*3 * 64; q, k, v 3 * 16*64*(4*16); QK^T and AV 2 * 16*16*(4*16);
    # output 16*(4*16)*64; dense 64*10
    expected = 16 * 192 * 64 + 3 * 16 * 64 * 64 + 2 * 16 * 16 * 64 + 16 * 64 * 64 + 640
    assert card["macs"] == expected
    assert card["depth"] == 3


# ---------------------------------------------------------------- MACs


@pytest.mark.parametrize(
    "layer, shape, macs",
    [
        # 8*8 positions * 3*3 taps * 4 in * 16 out
        (layers.Conv2D(16, 3, padding="same"), (8, 8, 4), 8 * 8 * 9 * 4 * 16),
        # 4 groups: each output sees 8/4 = 2 input channels
        (layers.Conv2D(16, 3, padding="same", groups=4), (8, 8, 8), 8 * 8 * 9 * 2 * 16),
        # stride 2 -> 4*4 positions, 9 taps, 4 channels x multiplier 2
        (layers.DepthwiseConv2D(3, 2, padding="same", depth_multiplier=2), (8, 8, 4), 16 * 9 * 8),
        # depthwise 8*8*9*4 + pointwise 8*8*4*16
        (layers.SeparableConv2D(16, 3, padding="same"), (8, 8, 4), 64 * 9 * 4 + 64 * 4 * 16),
        # each input position scatters 3*3 taps * 4 in * 6 out
        (layers.Conv2DTranspose(6, 3, strides=2, padding="same"), (8, 8, 4), 64 * 9 * 4 * 6),
        # dense on a 4D map acts at all 8*8 positions (ConvNeXt's pointwise layers)
        (layers.Dense(10), (8, 8, 4), 8 * 8 * 4 * 10),
        # (tokens, 32) x (32, 4 heads, 8) kernel
        (layers.EinsumDense("btd,dhk->bthk", output_shape=(5, 4, 8)), (5, 32), 5 * 32 * 4 * 8),
    ],
)
def test_macs_of_one_layer(layer, shape, macs) -> None:
    assert model_card(one_layer(layer, shape))["macs"] == macs


def test_shared_layer_counts_once_per_call() -> None:
    inputs = keras.Input((8, 8, 4))
    conv = layers.Conv2D(4, 3, padding="same")
    card = model_card(keras.Model(inputs, conv(conv(inputs))))
    assert card["macs"] == 2 * 8 * 8 * 9 * 4 * 4
    assert card["layers"] == 1
    assert card["receptive_field"] == 5


@pytest.mark.parametrize("side", [96, None])
def test_nested_application_is_walked(side) -> None:
    """A keras.applications backbone nested as one layer (for known or unknown input sizes)."""
    options = {"alpha": 0.35, "include_top": False, "weights": None}
    flat = keras.applications.MobileNetV2(input_shape=(96, 96, 3), pooling="avg", **options)
    reference = model_card(flat)
    backbone = keras.applications.MobileNetV2(input_shape=(side, side, 3), **options)
    inputs = keras.Input((96, 96, 3))
    x = layers.GlobalAveragePooling2D()(backbone(inputs))
    card = model_card(keras.Model(inputs, layers.Dense(10)(x)))
    assert card["macs"] == reference["macs"] + 1280 * 10
    assert card["depth"] == reference["depth"] + 1
    assert card["receptive_field"] == reference["receptive_field"] == 491
    keras.backend.clear_session()


# Published multiply-accumulates at 224x224 (torchvision / the papers), in G.
PUBLISHED = {
    "resnet18": 1.82,
    "resnet50": 4.11,
    "vgg16": 15.47,
    "mobilenet_v2": 0.30,
    "efficientnet_b0": 0.39,
    "convnext_tiny": 4.47,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_registry_macs_match_published(name) -> None:
    card = registry_card(name)
    assert card["input"] == [224, 224, 3]
    assert card["macs"] / 1e9 == pytest.approx(PUBLISHED[name], rel=0.05)


# keras.applications ResNet50 is v1: its blocks stride in the first 1x1 conv, which so runs
# at the output resolution; the published 4.11G is v1.5 (torchvision), striding in the 3x3.
# v1.5's extra MACs, stages 2-4: (56^2 - 28^2)*256*128 = (28^2 - 14^2)*512*256
# = (14^2 - 7^2)*1024*512 = 77,070,336 each.
RESNET50_V1_TO_V15 = 3 * 77_070_336


@pytest.mark.parametrize(
    "name, published, offset",
    [
        ("ResNet50", 4.11, RESNET50_V1_TO_V15),
        ("VGG16", 15.47, 0),
        ("MobileNetV2", 0.30, 0),
        ("EfficientNetB0", 0.39, 0),
        ("ConvNeXtTiny", 4.47, 0),
    ],
)
def test_application_macs_match_published(name, published, offset) -> None:
    card, params, trainable = application(name)
    assert (card["macs"] + offset) / 1e9 == pytest.approx(published, rel=0.05)
    assert card["params"] == params
    assert card["trainable_params"] == trainable
    assert card["non_trainable_params"] == params - trainable


def test_resnet50_v1_is_three_point_eight_six() -> None:
    """He et al. give ResNet-50 (v1) as 3.8 GFLOPs (multiply-adds); the walk finds 3.86G."""
    card, _, _ = application("ResNet50")
    assert card["macs"] / 1e9 == pytest.approx(3.86, rel=0.01)
    assert card["depth"] == 50


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", ["simple_cnn", "resnet18"])
def test_params_match_keras(name) -> None:
    model = build_model(name, (32, 32, 3), 10, small_input=True)
    card = model_card(model)
    trainable = count(model.trainable_weights)
    assert card["params"] == model.count_params()
    assert card["trainable_params"] == trainable
    assert card["non_trainable_params"] == model.count_params() - trainable > 0  # BN statistics


# ---------------------------------------------------------------- registry and CLI


def test_registry_cards_report_too_small_inputs() -> None:
    """simple_cnn needs 8x8: at 4 it gets an error entry; at 8 it builds (so does no bigger one)."""
    too_small = registry_cards(4, 10, names=["simple_cnn"])
    assert too_small[0]["error"] == "needs images of at least 8x8, got 4x4"
    assert too_small[0]["params"] is None and too_small[0]["input"] == [4, 4, 3]

    bigger = [n for n in list_models() if get_spec(n).min_size > 8][:2]
    cards = registry_cards(8, 10, names=["simple_cnn", *bigger])
    assert cards[0]["name"] == "simple_cnn" and "error" not in cards[0]
    assert cards[0]["params"] > 0
    for card in cards[1:]:
        assert card["error"].startswith("needs images of at least")
        assert "\n" not in card["error"]
    assert set(cards[-1]) >= REQUIRED_KEYS


def test_registry_cards_refuse_unknown_names() -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'nope'"):
        registry_cards(32, 10, names=["nope"])


def test_format_table() -> None:
    cards = [registry_card("resnet18"), *registry_cards(4, 10, names=["simple_cnn"])]
    lines = format_table(cards).splitlines()
    assert lines[0].split() == [
        "name", "input", "params", "(M)", "trainable", "(M)", "MACs", "(G)", "depth", "RF", "stride"
    ]  # fmt: skip
    row = ["resnet18", "224x224x3", "11.70", "11.69", "1.814", "18", "435", "32"]
    assert lines[2].split() == row
    assert lines[3].split()[:3] == ["simple_cnn", "4x4x3", "error:"]


def test_cli_json() -> None:
    args = ["models", "--json", "--image-size", "32", "--num-classes", "10"]
    result = run_cli([*args, "--arch", "simple_cnn", "resnet18"], ROOT)
    assert result.returncode == 0, result.stderr
    cards = json.loads(result.stdout)
    assert [c["name"] for c in cards] == ["simple_cnn", "resnet18"]
    for card in cards:
        assert set(card) >= REQUIRED_KEYS
        assert card["input"] == [32, 32, 3]
        assert card["macs"] > 0 and card["receptive_field"] > 0


def test_cli_table_and_bad_arch(capsys) -> None:
    """In-process `main` (the subprocess test above covers the entry point)."""
    assert main(["models", "--image-size", "16", "--arch", "simple_cnn"]) == 0
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header.startswith("name") and "MACs (G)" in header
    assert set(rule) == {"-", " "}
    assert row.split()[:2] == ["simple_cnn", "16x16x3"]

    assert main(["models", "--arch", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown architecture 'nope'")


def test_card_is_plain_json() -> None:
    """Scripts read the cards as JSON: every figure is a plain int (no numpy or Fraction)."""
    card = model_card(tiny(layers.Conv2D(4, 3, strides=2)))
    assert json.loads(json.dumps(card)) == card
    assert all(not isinstance(v, np.generic) for v in card.values())
