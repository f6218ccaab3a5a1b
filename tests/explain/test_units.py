"""Dead ReLU units against a numpy count, the effective receptive field of conv stacks
against the theoretical one (on whichever Keras backend runs: CI runs both)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.explain import units


def _known_units_model():
    """1x1 conv whose channel 1 is killed by its bias, channel 2 fires only on pixels
    above 250 and channel 3 only below 10; then a relu conv, a relu6 layer, and layers
    that are not ReLUs."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    image = keras.Input((6, 6, 1), name="image")
    x = layers.Conv2D(4, 1, name="c1")(image)
    x = layers.Activation("relu", name="c1_relu")(x)
    x = layers.Conv2D(5, 3, activation="relu", name="c2")(x)
    x = layers.LeakyReLU(name="leaky")(x)
    x = layers.ReLU(max_value=6.0, name="relu6")(x)
    x = layers.Activation("gelu", name="gelu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(3, activation="softmax", name="probs")(x)
    model = keras.Model(image, out)
    model.get_layer("c1").set_weights(
        [
            np.array([1.0, 1.0, 1.0, -1.0], "float32").reshape(1, 1, 1, 4),
            np.array([0.0, -1000.0, -250.0, 10.0], "float32"),
        ]  # fmt: skip
    )
    return model


def test_dead_units_equal_a_numpy_count_of_recorded_activations():
    import keras

    model = _known_units_model()
    rng = np.random.default_rng(0)
    images = rng.integers(20, 200, size=(10, 6, 6, 1)).astype(np.uint8)
    # Batches of 4: c1's channel 2 (x - 250) fires in the first only, channel 3 (10 - x)
    # in the last only; a count that forgets a batch finds one of them dead.
    images[1, 2, 3, 0] = 255
    images[8:] = 0

    assert [layer.name for layer in units.relu_layers(model)] == ["c1_relu", "c2", "relu6"]
    rows = units.dead_units(model, images, batch_size=4)

    names = [r["layer"] for r in rows]
    recorder = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names])
    recorded = recorder.predict(images.astype("float32"), batch_size=len(images), verbose=0)
    for row, acts in zip(rows, recorded, strict=True):
        never = ~(acts > 0).any(axis=(0, 1, 2))
        assert row["channels"] == acts.shape[-1]
        assert row["dead"] == int(never.sum())
        assert row["fraction"] == pytest.approx(never.mean())
    assert rows[0]["dead"] == 1  # channel 1 only
    assert units.dead_fraction(rows) == pytest.approx(
        sum(r["dead"] for r in rows) / sum(r["channels"] for r in rows)
    )


def _conv_stack(activation, size=15, layers_n=3):
    import keras
    from keras import layers

    keras.utils.set_random_seed(1)
    image = keras.Input((size, size, 2), name="image")
    x = image
    for i in range(layers_n):
        x = layers.Conv2D(3, 3, padding="same", activation=activation, name=f"conv{i}")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(image, layers.Dense(2, name="logits")(x))


@pytest.mark.parametrize("activation", [None, "relu"])
def test_erf_of_a_3x3_conv_stack_is_within_the_theoretical_field(activation):
    from pipeline.models.model_card import model_card

    model = _conv_stack(activation)
    theoretical = model_card(model)["receptive_field"]
    assert theoretical == 7
    images = np.random.default_rng(2).uniform(0, 255, (6, 15, 15, 2)).astype("float32")
    erf = units.effective_receptive_field(model, images)

    assert erf["layer"] == "conv2"
    assert erf["map"].shape == (15, 15)
    assert 0 < erf["erf_px"] <= erf["support_px"] <= theoretical
    if activation is None:  # every path of a linear stack carries gradient
        assert erf["support_px"] == theoretical
        nonzero = np.argwhere(erf["map"] > 0)
        assert nonzero.min(axis=0).tolist() == [4, 4]
        assert nonzero.max(axis=0).tolist() == [10, 10]


def test_erf_grows_with_depth_and_names_a_bad_layer():
    from pipeline.errors import ConfigError

    model = _conv_stack(None, size=21, layers_n=5)
    images = np.random.default_rng(3).uniform(0, 255, (4, 21, 21, 2)).astype("float32")
    sides = [
        units.effective_receptive_field(model, images, layer=f"conv{i}")["support_px"]
        for i in range(5)
    ]
    assert sides == [3, 5, 7, 9, 11]
    with pytest.raises(ConfigError, match="'nope'"):
        units.effective_receptive_field(model, images, layer="nope")


def test_figures_and_table_are_written(tmp_path):
    model = _known_units_model()
    images = np.random.default_rng(0).integers(0, 255, size=(4, 6, 6, 1)).astype(np.uint8)
    rows = units.dead_units(model, images, batch_size=8)
    table = units.dead_units_csv(rows, tmp_path / "dead_units.csv")
    assert table.read_text().splitlines()[0] == "layer,channels,dead,fraction"
    assert len(table.read_text().splitlines()) == 1 + len(rows)
    chart = units.dead_units_png(rows, tmp_path / "dead_units.png")
    erf = units.effective_receptive_field(_conv_stack(None), np.ones((1, 15, 15, 2)))
    heat = units.erf_png(erf, 7, tmp_path / "erf.png")
    for png in (chart, heat):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 100_000


def test_segmentation_erf_is_taken_before_the_per_pixel_softmax():
    """A U-Net's output is a softmax over channels: their sum is 1 everywhere and its
    gradient 0, so the field is measured on the class scores before it."""
    import keras

    from pipeline.data.scenes import digit_scenes
    from pipeline.models.segmentation import build_segmentation_model

    model = build_segmentation_model("unet", (32, 32, 1), 11, width_multiplier=0.25)
    assert units.erf_layer(model).name == "seg_head_conv"
    if keras.backend.backend() != "tensorflow":
        return  # eager JAX compiles a U-Net's gradient op by op: 40 s of CI for the same figure
    images, _ = digit_scenes(4, size=32, seed=0)
    erf = units.effective_receptive_field(model, images[..., None])
    assert erf["layer"] == "seg_head_conv"
    assert 0 < erf["erf_px"] <= erf["support_px"] <= 32
