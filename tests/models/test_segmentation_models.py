"""U-Net and DeepLabV3+: build on zoo encoders, train a step, save/reload; their structure.

Runs on whichever Keras backend is active (CI runs it on TensorFlow and on JAX).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.models.architectures import build_model
from pipeline.models.segmentation import build_segmentation_model
from pipeline.training.losses import SegmentationLoss

NUM_CLASSES = 4
VOID = 255
SHAPE = (64, 96, 3)  # not square: height and width are kept apart
ON_JAX = keras.backend.backend() == "jax"

# On JAX (CI's second pass) the first three cover every decoder code path and both
# upsamplings; the zoo tests already run each encoder there.
CASES = [
    ("unet", "plain", "bilinear"),
    ("unet", "mobilenet_v2", "transpose"),
    ("deeplabv3plus", "resnet18", "bilinear"),
    *(
        pytest.param(*case, marks=pytest.mark.skipif(ON_JAX, reason="TensorFlow pass runs it"))
        for case in [
            ("unet", "plain", "transpose"),
            ("unet", "resnet18", "bilinear"),
            ("unet", "efficientnet_b0", "bilinear"),
            ("deeplabv3plus", "mobilenet_v2", "bilinear"),
        ]
    ),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (the default store of a temp project)."""
    import os

    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("segmentation-store"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mp.undo()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it


@pytest.mark.parametrize(("arch", "encoder", "upsampling"), CASES)
def test_model_trains_a_step_saves_reloads_and_logs(arch, encoder, upsampling, store, tmp_path):
    model = build_segmentation_model(
        arch, SHAPE, NUM_CLASSES, encoder=encoder, upsampling=upsampling, width_multiplier=0.25
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, *SHAPE)).astype(np.float32)
    masks = rng.integers(0, NUM_CLASSES, (2, *SHAPE[:2]))
    masks[:, :8] = VOID
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=SegmentationLoss("ce_dice", NUM_CLASSES, ignore_index=VOID),
        run_eagerly=not ON_JAX,
    )
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    assert np.isfinite(model.train_on_batch(images, masks))
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert sum(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)) > 0.9 * len(
        before
    )

    probs = model.predict_on_batch(images)
    assert probs.shape == (2, *SHAPE[:2], NUM_CLASSES) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-4)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded.predict_on_batch(images), probs, rtol=1e-4, atol=1e-5)

    import mlflow
    import pandas as pd

    from pipeline.tracking import logged_models, runs

    with runs.training_run("segmentation", run_name=arch, params={}, tags={}):
        card = {
            "classes": [f"c{i}" for i in range(NUM_CLASSES)],
            "image_shape": list(SHAPE),
            "task": "segmentation",
        }
        uri = logged_models.log_model(model, card=card)
    logged = logged_models.load_keras_model(uri)
    np.testing.assert_allclose(logged.predict_on_batch(images), probs, rtol=1e-4, atol=1e-5)
    # the pyfunc: an image of another size in, a mask of that size out
    served = mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"array": [images[0][::2, ::2].tolist()]})
    )
    mask = np.asarray(served["mask"][0])
    assert mask.shape == (SHAPE[0] // 2, SHAPE[1] // 2) and mask.max() < NUM_CLASSES
    assert set(served["classes_present"][0]) == {card["classes"][i] for i in np.unique(mask)}
    keras.backend.clear_session()


def layer_types(model) -> set[str]:
    return {type(layer).__name__ for layer in model.layers}


def test_upsampling_choice_picks_transposed_conv_or_interpolation():
    transposed = build_segmentation_model("unet", SHAPE, 3, upsampling="transpose")
    bilinear = build_segmentation_model("unet", SHAPE, 3, upsampling="bilinear")
    assert "Conv2DTranspose" in layer_types(transposed)
    assert "Conv2DTranspose" not in layer_types(bilinear)
    resize = [layer for layer in bilinear.layers if type(layer).__name__ == "UpSampling2D"]
    assert len(resize) == 4 and all(layer.interpolation == "bilinear" for layer in resize)


def test_plain_unet_concatenates_each_encoder_level_into_the_decoder():
    model = build_segmentation_model("unet", SHAPE, 3, width_multiplier=0.25)
    for level, side in zip((4, 3, 2, 1), (8, 16, 32, 64), strict=True):
        concat = model.get_layer(f"dec{level}_concat")
        sources = {t._keras_history.operation.name for t in concat.input}
        assert f"enc{level}_conv2_relu" in sources, sources
        assert concat.output.shape[1] == side


def test_encoder_keeps_the_classifiers_layer_names_and_weights_load_by_name():
    classifier = build_model("resnet18", SHAPE, 10, width_multiplier=0.25, small_input=False)
    model = build_segmentation_model("unet", SHAPE, 3, encoder="resnet18", width_multiplier=0.25)
    shared = {layer.name for layer in classifier.layers if layer.weights} & {
        layer.name for layer in model.layers
    }
    encoder_convs = {layer.name for layer in classifier.layers if type(layer).__name__ == "Conv2D"}
    assert encoder_convs <= shared  # every conv of the encoder, head excluded
    assert "head_dense" not in {layer.name for layer in model.layers}


def test_deeplab_has_aspp_rates_image_pooling_and_a_stride_4_skip():
    model = build_segmentation_model(
        "deeplabv3plus", SHAPE, 3, encoder="resnet18", aspp_rates=(2, 4, 6), width_multiplier=0.25
    )
    rates = sorted(
        layer.dilation_rate[0]
        for layer in model.layers
        if layer.name.startswith("aspp_rate") and "conv" in layer.name
    )
    assert rates == [2, 4, 6]
    assert model.get_layer("aspp_pool").output.shape[1:3] == (1, 1)
    assert model.get_layer("aspp_concat").output.shape[1] == SHAPE[0] // 16
    assert model.get_layer("decoder_low_conv").input.shape[1] == SHAPE[0] // 4
    assert (
        model.get_layer("aspp_concat").output.shape[-1]
        == 5 * model.get_layer("aspp_project_conv").filters
    )


def test_operator_choices_reach_the_plain_unets_encoder_and_decoder():
    """GroupNorm (small-batch segmentation's norm) and the other choices, everywhere."""
    from pipeline.models.blocks import LayerChoices

    choices = LayerChoices(norm="group", activation="leaky_relu", downsample="strided")
    model = build_segmentation_model(
        "unet", SHAPE, 3, upsampling="transpose", width_multiplier=0.25, choices=choices
    )
    types = layer_types(model)
    assert "GroupNormalization" in types and "BatchNormalization" not in types
    assert "MaxPooling2D" not in types and "ReLU" not in types
    for name in ("enc1_conv1_leaky_relu", "enc1_down_gn", "bottom_conv2_gn", "dec1_upconv_gn"):
        model.get_layer(name)
    assert not [la for la in model.layers if la.get_config().get("activation") == "relu"]
    probs = keras.ops.convert_to_numpy(model(np.ones((1, *SHAPE), np.float32)))
    assert probs.shape == (1, *SHAPE[:2], 3) and np.isfinite(probs).all()


def test_bad_choices_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="model.encoder: vit_tiny"):
        build_segmentation_model("unet", SHAPE, 3, encoder="vit_tiny")
    with pytest.raises(ConfigError, match="prepare.image_size"):
        build_segmentation_model("unet", (72, 72, 3), 3)
    with pytest.raises(ConfigError, match="deeplabv3plus needs a zoo encoder"):
        build_segmentation_model("deeplabv3plus", SHAPE, 3)
    with pytest.raises(ConfigError, match="model.upsampling"):
        build_segmentation_model("unet", SHAPE, 3, upsampling="nearest")
