"""Linear probes (on whichever Keras backend runs: CI runs both): a trained network's
stages read the digit more and more linearly, an untrained one's last stage far less;
the pooled features are the layers' own outputs averaged; bad options are refused."""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.explain import probe

SIZE = 32


def scenes(count: int, seed: int):
    """32x32 scenes of one digit (16x16, scale 2) at a random place; label = the digit.
    The place is what makes an untrained network's pooled features weak: the identity
    has to survive translation, which trained filters learn and random ones do not."""
    from pipeline.data.scenes import VOID, digit_scenes

    images, masks = digit_scenes(count, size=SIZE, digits_per_scene=(1, 1), scales=(2,), seed=seed)
    labels = np.array([np.unique(m[(m > 0) & (m != VOID)])[0] - 1 for m in masks])
    return images[..., None], labels


def test_probes_rise_with_depth_and_an_untrained_network_reads_less():
    """simple_cnn (width 0.25), 5 epochs on 1000 scenes; probes fitted on those 1000 and
    scored on 200 val and 200 test scenes. Measured (TensorFlow, 2 shared cores): trained
    stages 0.66 / 0.94 / 0.96 / 0.96 test top-1, untrained 0.44 / 0.68 / 0.63 / 0.53,
    chance 0.07; about 10 s."""
    from pipeline.models.architectures import build_model

    start = time.perf_counter()
    splits = {"train": scenes(1000, 1), "val": scenes(200, 2), "test": scenes(200, 3)}
    keras.utils.set_random_seed(0)
    model = build_model("simple_cnn", (SIZE, SIZE, 1), 10, width_multiplier=0.25)
    untrained = keras.models.clone_model(model)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    x, y = splits["train"]
    model.fit(x.astype("float32"), y, batch_size=64, epochs=5, verbose=0)

    trained_rows = probe.run_probes(model, splits)
    untrained_rows = probe.run_probes(untrained, splits)
    print(probe.markdown(trained_rows, title="trained"))
    print(probe.markdown(untrained_rows, title="untrained"))
    print(f"{time.perf_counter() - start:.0f} s")

    kinds = [r.kind for r in trained_rows]
    # the max-pool after stage 3 learns nothing: "pooled", not a fourth stage
    assert kinds == ["stage 1", "stage 2", "stage 3", "stage 3 pooled", "chance", "model"]
    assert [r.resolution for r in trained_rows[:4]] == ["32x32", "16x16", "8x8", "4x4"]
    stages = [r.test_top1 for r in trained_rows[:4]]
    chance = trained_rows[4]
    assert chance.test_top1 < 0.2
    assert stages[-1] >= 0.85
    assert stages[-1] >= stages[0] + 0.15
    assert untrained_rows[3].test_top1 <= stages[-1] - 0.2
    predicted = model.predict(splits["test"][0].astype("float32"), verbose=0).argmax(axis=1)
    assert trained_rows[5].test_top1 == pytest.approx(np.mean(predicted == splits["test"][1]))


def _dense_head_model():
    """conv -> pool -> conv, then flatten -> dense(12) -> dense(3): two stages and a
    penultimate vector that is not a pooled stage."""
    from keras import layers

    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), name="image")
    x = layers.Rescaling(1 / 255)(image)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(x)
    x = layers.Flatten(name="flat")(x)
    x = layers.Dense(12, activation="relu", name="hidden")(x)
    return keras.Model(image, layers.Dense(3, activation="softmax", name="probs")(x))


def test_pooled_features_are_the_layer_outputs_averaged_and_the_penultimate_vector():
    model = _dense_head_model()
    probed = probe.probe_layers(model)
    assert [(kind, layer.name, res) for kind, layer, res in probed] == [
        ("stage 1", "c1", "8x8"),
        ("stage 2", "c2", "4x4"),
        ("penultimate", "hidden", ""),
    ]
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1)).astype(np.uint8)
    features, outputs = probe.pooled_features(model, images, batch_size=2)
    names = ["c1", "c2", "hidden"]
    recorder = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names])
    recorded = recorder.predict(images.astype("float32"), verbose=0)
    np.testing.assert_allclose(features[0], recorded[0].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features[1], recorded[1].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features[2], recorded[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs, model.predict(images.astype("float32"), verbose=0), 1e-5)


def test_a_gap_head_adds_no_penultimate_row_and_metrics_are_named_by_layer(tmp_path):
    from PIL import Image

    from pipeline.models.architectures import build_model

    model = build_model("resnet18", (16, 16, 1), 3, width_multiplier=0.25)
    probed = probe.probe_layers(model)
    assert [layer.name for _, layer, _ in probed] == [
        f"stage{i}_block2_out_relu" for i in range(1, 5)
    ]  # head_pool is stage 4 pooled: no fifth row
    rng = np.random.default_rng(0)

    def split(n):
        return rng.integers(0, 256, (n, 16, 16, 1)).astype(np.uint8), np.arange(n) % 3

    rows = probe.run_probes(
        model, {"train": split(30), "val": split(9), "test": split(9)}, max_train=12
    )
    files = probe.write_table(rows, tmp_path, title="resnet18, noise")
    assert [f.name for f in files] == ["probe.csv", "probe.md", "probe.png"]
    with Image.open(files[2]) as chart:
        assert chart.format == "PNG"
    assert "| `stage4_block2_out_relu` | stage 4 | 2x2 | 128 |" in files[1].read_text()
    metrics = probe.metrics(rows)
    assert set(metrics) == {
        f"probe_{s}_top1_{n}"
        for s in ("val", "test")
        for n in [*(f"stage{i}_block2_out_relu" for i in range(1, 5)), "chance"]
    }


def test_bad_options_are_refused_by_name():
    model = _dense_head_model()
    images = np.zeros((4, 8, 8, 1), np.uint8)
    splits = {s: (images, np.array([0, 1, 2, 0])) for s in probe.SPLITS}
    with pytest.raises(ConfigError, match="--max-train 0"):
        probe.run_probes(model, splits, max_train=0)
    inputs = keras.Input((4,))
    flat = keras.Model(inputs, keras.layers.Activation("softmax")(inputs), name="flat")
    with pytest.raises(ConfigError, match="flat has no spatial stage nor dense head"):
        probe.probe_layers(flat)
