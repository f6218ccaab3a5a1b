"""Operator choices: padding modes against np.pad, conv types against their parameter formulas,
activations and ConcatPool2d against numpy, model.kernel_size and model.dilation_rate against
the seeds' parameter and receptive-field formulas.

Runs on whichever Keras backend is active (CI runs it on TensorFlow and on JAX).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.models.blocks import (
    LayerChoices,
    conv,
    conv_norm_act,
    downsample,
    norm,
)
from pipeline.models.layers import ClassToken, Pad2D, StochasticDepth

NP_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@pytest.mark.parametrize("mode", list(NP_MODE))
@pytest.mark.parametrize("padding", [1, 2, ((0, 3), (2, 1))])
def test_padding_matches_numpy(mode, padding):
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
    spec = padding if isinstance(padding, tuple) else ((padding, padding), (padding, padding))
    expected = np.pad(x, ((0, 0), *spec, (0, 0)), mode=NP_MODE[mode])
    got = keras.ops.convert_to_numpy(Pad2D(padding, mode=mode)(x))
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)  # exact: padding only copies values


@pytest.mark.parametrize("mode", list(NP_MODE))
@pytest.mark.parametrize("padding", [((1, 2), (2, 0)), ((7, 3), (0, 6))])  # and wider than 5
def test_padding_layer_survives_save_and_load(mode, padding, tmp_path):
    inputs = keras.Input((5, 5, 2))
    model = keras.Model(inputs, Pad2D(padding, mode=mode, name="pad")(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.get_layer("pad").get_config() == model.get_layer("pad").get_config()
    x = np.arange(50, dtype=np.float32).reshape(1, 5, 5, 2)
    got = keras.ops.convert_to_numpy(loaded(x))
    np.testing.assert_array_equal(got, keras.ops.convert_to_numpy(model(x)))
    np.testing.assert_array_equal(got, np.pad(x, ((0, 0), *padding, (0, 0)), NP_MODE[mode]))


def test_stochastic_depth_survives_save_and_load(tmp_path):
    inputs = keras.Input((3, 3, 2))
    layer = StochasticDepth(0.3, seed=4, name="drop")
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.get_layer("drop").get_config() == layer.get_config()
    assert loaded.get_layer("drop").rate == 0.3 and loaded.get_layer("drop").seed == 4
    x = np.ones((4, 3, 3, 2), np.float32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), x)  # inference: identity


def test_class_token_is_prepended_and_survives_save_and_load(tmp_path):
    inputs = keras.Input((4, 3))
    layer = ClassToken(stddev=0.5, name="token")
    model = keras.Model(inputs, layer(inputs))
    token = np.arange(3, dtype=np.float32).reshape(1, 1, 3)
    layer.token.assign(token)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.get_layer("token").get_config() == layer.get_config()
    assert loaded.get_layer("token").stddev == 0.5
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    got = keras.ops.convert_to_numpy(loaded(x))
    assert got.shape == (2, 5, 3)
    np.testing.assert_array_equal(got[:, 0], np.repeat(token[:, 0], 2, axis=0))
    np.testing.assert_array_equal(got[:, 1:], x)


@pytest.mark.parametrize("mode", list(NP_MODE))
@pytest.mark.parametrize("side", [1, 2, 3, 4])
def test_padding_matches_numpy_for_every_side_and_pad_up_to_7(mode, side):
    """Pads as wide as the side or wider too: numpy reflects and wraps again and again.

    H has `side` pixels and W 5 - side; each of the four pads takes every value 0..7.
    """
    x = np.random.default_rng(side).normal(size=(1, side, 5 - side, 2)).astype(np.float32)
    for pad in range(8):
        spec = ((pad, (pad + 5) % 8), ((pad + 2) % 8, (7 - pad)))  # asymmetric
        expected = np.pad(x, ((0, 0), *spec, (0, 0)), mode=NP_MODE[mode])
        got = keras.ops.convert_to_numpy(Pad2D(spec, mode=mode)(x))
        np.testing.assert_array_equal(got, expected, err_msg=f"{mode} {spec}")


def test_padding_needs_static_sides_and_non_negative_pads():
    with pytest.raises(ValueError, match="known height and width"):
        Pad2D(1, mode="reflect")(keras.Input((None, 4, 1)))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        Pad2D(((0, -1), (0, 0)))


def conv_params(kind: str, k: int = 3, cin: int = 16, cout: int = 32, groups: int = 4) -> int:
    """Trainable parameters of one conv of `kind` built by the blocks (no bias)."""
    inputs = keras.Input((12, 12, cin))
    outputs = conv(inputs, cout, k, name="c", choices=LayerChoices(conv=kind, groups=groups))
    model = keras.Model(inputs, outputs)
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize(
    ("kind", "formula"),
    [
        ("standard", lambda k, ci, co, g: k * k * ci * co),
        ("dilated", lambda k, ci, co, g: k * k * ci * co),  # same weights, wider reach
        ("separable", lambda k, ci, co, g: k * k * ci + ci * co),  # depthwise + pointwise
        ("group", lambda k, ci, co, g: k * k * (ci // g) * co),
        ("spatial_separable", lambda k, ci, co, g: k * ci * co + k * co * co),  # kx1 then 1xk
    ],
)
@pytest.mark.parametrize("k", [3, 5])
def test_conv_type_parameter_formula(kind, formula, k):
    assert conv_params(kind, k=k) == formula(k, 16, 32, 4)


def test_dilated_conv_reaches_further_with_the_same_output_size():
    inputs = keras.Input((16, 16, 1))
    out = conv(inputs, 1, 3, name="c", choices=LayerChoices(conv="dilated"))
    layer = keras.Model(inputs, out).get_layer("c_conv")
    assert layer.dilation_rate == (2, 2) and tuple(out.shape[1:3]) == (16, 16)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_modes_keep_the_output_size(mode):
    inputs = keras.Input((9, 9, 4))
    for strides, expected in [(1, 9), (2, 5)]:
        out = conv(
            inputs, 8, 3, strides=strides, name=f"c{strides}", choices=LayerChoices(padding=mode)
        )
        assert tuple(out.shape[1:3]) == (expected, expected)


@pytest.mark.parametrize(
    ("kind", "layer_type"),
    [
        ("batch", keras.layers.BatchNormalization),
        ("group", keras.layers.GroupNormalization),
        ("layer", keras.layers.LayerNormalization),
    ],
)
def test_norm_choices(kind, layer_type):
    inputs = keras.Input((4, 4, 64))
    model = keras.Model(inputs, norm(inputs, LayerChoices(norm=kind), name="n"))
    assert isinstance(model.layers[-1], layer_type)


def test_layer_norms_are_the_seeds_per_sample_one_and_convnexts_per_pixel_one():
    """norm: layer (the seeds' LayerNorm): mean and variance over each sample's H x W x C
    features, a scale and shift per feature (2 * H * W * C); layer_channels (ConvNeXt's):
    over each pixel's C channels, a scale and shift per channel (2 * C)."""
    x = np.random.default_rng(0).normal(3, 2, size=(2, 4, 5, 6)).astype(np.float32)
    eps = 1e-3  # Keras's LayerNormalization default
    for kind, axes, params in (("layer", (1, 2, 3), 2 * 4 * 5 * 6), ("layer_channels", -1, 12)):
        inputs = keras.Input((4, 5, 6))
        model = keras.Model(inputs, norm(inputs, LayerChoices(norm=kind), name="n"))
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(model(x)), (x - mean) / np.sqrt(var + eps), atol=1e-4
        )
        assert model.count_params() == params, kind


def test_no_norm_gives_the_conv_a_bias():
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(
        inputs, conv_norm_act(inputs, 8, 3, name="c", choices=LayerChoices(norm="none"))
    )
    assert model.get_layer("c_conv").use_bias
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


@pytest.mark.parametrize("kind", ["relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh"])
def test_activation_choices_compute_their_function(kind):
    inputs = keras.Input((1, 1, 1))
    out = conv_norm_act(inputs, 1, 1, name="c", choices=LayerChoices(norm="none", activation=kind))
    model = keras.Model(inputs, out)
    model.get_layer("c_conv").set_weights([np.ones((1, 1, 1, 1)), np.zeros(1)])
    x = np.array([-2.0, -0.5, 0.0, 1.5], np.float32).reshape(4, 1, 1, 1)
    got = keras.ops.convert_to_numpy(model(x)).ravel()
    reference = {
        "relu": np.maximum(x, 0),
        "leaky_relu": np.where(x > 0, x, 0.01 * x),
        "elu": np.where(x > 0, x, np.expm1(x)),
        "gelu": keras.ops.convert_to_numpy(keras.activations.gelu(x)),
        "sigmoid": 1 / (1 + np.exp(-x)),
        "tanh": np.tanh(x),
    }[kind].ravel()
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "layer_type"),
    [
        ("max", keras.layers.MaxPooling2D),
        ("avg", keras.layers.AveragePooling2D),
        ("strided", keras.layers.Conv2D),
    ],
)
def test_downsample_choices_halve_the_map(kind, layer_type):
    inputs = keras.Input((8, 8, 4))
    out = downsample(inputs, LayerChoices(downsample=kind), name="d")
    model = keras.Model(inputs, out)
    assert tuple(out.shape[1:]) == (4, 4, 4)
    assert any(isinstance(layer, layer_type) for layer in model.layers)


def test_reflect_padded_resnet_builds_down_to_a_1x1_map():
    from pipeline.models.architectures import build_model

    model = build_model(
        "resnet18", (8, 8, 1), 3, width_multiplier=0.25, choices=LayerChoices(padding="reflect")
    )
    assert model.get_layer("head_pool").input.shape[1:3] == (1, 1)
    assert np.isfinite(keras.ops.convert_to_numpy(model(np.ones((1, 8, 8, 1))))).all()


def test_model_with_custom_layers_loads_in_a_fresh_process(tmp_path):
    """The evaluate stage loads in a new process, where nothing has registered the layers yet."""
    import subprocess
    import sys

    from pipeline.models.architectures import build_model

    model = build_model("vit_tiny", (8, 8, 1), 3, width_multiplier=0.25, choices=LayerChoices())
    padded = build_model(
        "simple_cnn", (8, 8, 1), 3, width_multiplier=0.25, choices=LayerChoices(padding="circular")
    )
    for name, m in (("vit", model), ("padded", padded)):
        (tmp_path / name).mkdir()
        m.save(tmp_path / name / "model.keras")
    code = (
        "import sys; from pathlib import Path; "
        "from pipeline.models.saved import load_trained_model;"
        "print(*[load_trained_model(Path(p)).count_params() for p in sys.argv[1:]])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "vit"), str(tmp_path / "padded")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(model.count_params()), str(padded.count_params())]


def test_max_avg_downsample_is_the_seeds_concat_pool():
    """ConcatPool2d: torch.cat([max_pool(x), avg_pool(x)], dim=1), channels doubled."""
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, downsample(inputs, LayerChoices(downsample="max_avg"), name="d"))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    got = keras.ops.convert_to_numpy(model(x))
    windows = x.reshape(2, 3, 2, 3, 2, 3)
    want = np.concatenate([windows.max(axis=(2, 4)), windows.mean(axis=(2, 4))], axis=-1)
    assert got.shape == (2, 3, 3, 6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert model.count_params() == 0


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("kind", ["standard", "separable", "group"])
def test_kernel_size_replaces_3x3_kernels_and_keeps_the_map(k, kind):
    """The seeds' formulas at model.kernel_size k: k*k*Cin*Cout (standard), k*k*Cin +
    Cin*Cout (depthwise separable), k*k*(Cin/g)*Cout (grouped); same map size; a 1x1
    conv stays 1x1."""
    choices = LayerChoices(conv=kind, kernel_size=k)
    inputs = keras.Input((9, 9, 16))
    out = conv(inputs, 32, 3, name="c", choices=choices)
    pointwise = conv(inputs, 32, 1, name="p", choices=choices)
    model = keras.Model(inputs, [out, pointwise])
    count = sum(int(np.prod(w.shape)) for w in model.get_layer("c_conv").trainable_weights)
    formula = {
        "standard": k * k * 16 * 32,
        "separable": k * k * 16 + 16 * 32,
        "group": k * k * (16 // 4) * 32,
    }[kind]
    assert count == formula
    assert tuple(out.shape[1:3]) == (9, 9)
    assert model.get_layer("p_conv").kernel_size == (1, 1)


@pytest.mark.parametrize("strides", [1, 2])
def test_kernel_size_with_a_padding_mode_keeps_pytorch_output_sizes(strides):
    inputs = keras.Input((9, 9, 2))
    out = conv(
        inputs,
        4,
        3,
        strides=strides,
        name="c",
        choices=LayerChoices(kernel_size=7, padding="reflect"),
    )
    assert tuple(out.shape[1:3]) == ((9, 9) if strides == 1 else (5, 5))


@pytest.mark.parametrize("rate", [2, 3, 4])
def test_dilation_rate_sets_the_reach_of_dilated_convs(rate):
    """A 3x3 conv dilated by r sees 2r + 1 pixels a side (the seeds' k + (k - 1)(r - 1)):
    the centre output of an impulse response is non-zero exactly that far."""
    inputs = keras.Input((15, 15, 1))
    out = conv(inputs, 1, 3, name="c", choices=LayerChoices(conv="dilated", dilation_rate=rate))
    model = keras.Model(inputs, out)
    layer = model.get_layer("c_conv")
    layer.set_weights([np.ones((3, 3, 1, 1), np.float32)])
    assert layer.dilation_rate == (rate, rate) and tuple(out.shape[1:3]) == (15, 15)
    image = np.zeros((1, 15, 15, 1), np.float32)
    image[0, 7, 7] = 1
    response = keras.ops.convert_to_numpy(model(image))[0, :, :, 0]
    rows = np.flatnonzero(response.any(axis=1))
    assert rows.max() - rows.min() + 1 == 2 * rate + 1
    assert int((response != 0).sum()) == 9


def test_new_choices_survive_save_and_load(tmp_path):
    from pipeline.models.architectures import build_model

    choices = LayerChoices(
        downsample="max_avg", kernel_size=5, activation="tanh", conv="dilated", dilation_rate=3
    )
    model = build_model("simple_cnn", (16, 16, 3), 4, width_multiplier=0.25, choices=choices)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6
    )
    assert loaded.get_layer("stage1_1_conv").kernel_size == (5, 5)
    assert loaded.get_layer("stage1_1_conv").dilation_rate == (3, 3)
    assert loaded.get_layer("stage2_1_conv").input.shape[-1] == 2 * 8  # max and avg channels


def test_valid_padding_shrinks_each_map_by_k_minus_1_and_refuses_what_it_cannot_build():
    """The seeds' unpadded ('valid') convolutions: seeds_simple_cnn at 32x32 goes
    32 -conv-> 30 -pool-> 15 -conv-> 13 -pool-> 7 -conv-> 5 -pool-> 3 (pools keep 'same'),
    with the parameters of the padded model; at 8x8 it runs out of pixels: one line."""
    from pipeline.errors import ConfigError
    from pipeline.models.architectures import build_model

    valid = LayerChoices(padding="valid")
    model = build_model("seeds_simple_cnn", (32, 32, 3), 10, choices=valid)
    padded = build_model("seeds_simple_cnn", (32, 32, 3), 10)
    sides = [model.get_layer(f"block{b}_conv").output.shape[1] for b in (1, 2, 3)]
    assert sides == [30, 13, 5]
    assert model.get_layer("head_pool").input.shape[1:3] == (3, 3)
    assert model.count_params() == padded.count_params()
    with pytest.raises(ConfigError, match="model.padding valid: seeds_simple_cnn") as refused:
        build_model("seeds_simple_cnn", (8, 8, 3), 10, choices=valid)
    assert "\n" not in str(refused.value)
    # and before training writes anything: check_model, with the data's image shape
    from pipeline.config import ModelConfig
    from pipeline.models.from_config import check_model

    cfg = ModelConfig(arch="simple_cnn", padding="valid")
    check_model(cfg, (32, 32, 3))
    with pytest.raises(ConfigError, match="model.padding valid: simple_cnn"):
        check_model(cfg, (16, 16, 1))
