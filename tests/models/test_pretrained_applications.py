"""Keras's weights in the keras.applications families and VGG-16/19 (model.pretrained).

The parity tests are the ones a user trusts: a Keras application with random
weights is saved as Keras saves it, loaded into the zoo model by path, and the
zoo's backbone (the feature map `head_pool` reads) on 0..255 pixels equals the
Keras application's on the same pixels through Keras's own `preprocess_input`
(or its built-in preprocessing layers): the input scaling follows the weights.
"""

from __future__ import annotations

import socket
import time
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.models import applications
from pipeline.models.applications import (
    ImagenetFile,
    application_weights,
    imagenet_file,
    imagenet_weights_file,
    load_application_weights,
)
from pipeline.models.architectures import build_model, get_spec
from pipeline.models.blocks import IMAGENET_MEAN, IMAGENET_STD

# Keras's own saving code trips NumPy 2's `copy` deprecation on TensorFlow variables.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword"
)

TOLERANCE = 1e-4  # of the largest |activation| of the Keras application's feature map
# arch: (Keras constructor, its preprocess_input, side)
FAMILIES = {
    "densenet121": ("DenseNet121", keras.applications.densenet.preprocess_input, 32),
    "mobilenet_v2": ("MobileNetV2", keras.applications.mobilenet_v2.preprocess_input, 64),
    "mobilenet_v3_small": (
        "MobileNetV3Small",
        keras.applications.mobilenet_v3.preprocess_input,
        32,
    ),
    "efficientnet_b0": ("EfficientNetB0", keras.applications.efficientnet.preprocess_input, 32),
    "convnext_tiny": ("ConvNeXtTiny", keras.applications.convnext.preprocess_input, 32),
    "inception_v3": ("InceptionV3", keras.applications.inception_v3.preprocess_input, 75),
    "vgg16": ("VGG16", keras.applications.vgg16.preprocess_input, 64),
    "vgg19": ("VGG19", keras.applications.vgg19.preprocess_input, 32),
}


def pixels(side: int, n: int = 2) -> np.ndarray:
    """The first `n` of 16 random images (the 16 set the BatchNorm statistics)."""
    batch = np.random.default_rng(0).integers(0, 256, size=(16, side, side, 3))
    return batch[:n].astype("float32")


def flat_layers(model) -> list:
    """A model's layers, ConvNeXt's nested Sequential blocks expanded."""
    nested = (
        layer.layers if isinstance(layer, keras.Sequential) else [layer] for layer in model.layers
    )
    return [layer for layers in nested for layer in layers]


def keras_application(constructor: str, side: int, normalization=None):
    """Keras's headless application at its defaults with random weights throughout, not
    only the kernels (BatchNorm's scale and shift, LayerScale, EfficientNet's
    Normalization), then BatchNorm statistics of the random images the tests feed, so that
    every layer's activations stay near unit scale and each weight shows in the output
    (Keras's fresh statistics, 0 and 1, let some networks forget their input).
    `normalization`: EfficientNet's Normalization (mean, variance) instead of random."""
    keras.utils.set_random_seed(0)  # Keras's initializers
    app = getattr(keras.applications, constructor)(
        include_top=False, weights=None, input_shape=(side, side, 3)
    )
    rng = np.random.default_rng(1)
    for layer in flat_layers(app):
        for weight in layer.weights:
            value = keras.ops.convert_to_numpy(weight)
            # LayerScale's one weight is "variable" (Keras numbers it after the first)
            if weight.name in ("variance", "gamma") or type(layer).__name__ == "LayerScale":
                value = rng.uniform(0.5, 1.5, value.shape)
            elif weight.name in ("beta", "bias", "mean"):
                value = rng.normal(0.0, 0.1, value.shape)
            else:
                continue
            if normalization and isinstance(layer, keras.layers.Normalization):
                value = normalization[weight.name != "mean"]
            weight.assign(np.asarray(value, dtype="float32"))
    norms = []
    for layer in flat_layers(app):
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()  # Normalization reads its new statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            norms.append((layer, layer.momentum))
            layer.momentum = 0.0
    app(pixels(side, n=16), training=True)  # moving statistics := this batch's
    for layer, momentum in norms:
        layer.momentum = momentum
    return app


def save_legacy_h5(model, path: Path) -> Path:
    """The layout of the .h5 files Keras distributes (Keras 2's save_weights): the layer
    names, then per layer its weight names (trainable first) and arrays."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            group = f.create_group(layer.name)
            weights = layer.trainable_weights + layer.non_trainable_weights
            names = [f"{layer.name}/{w.name}:0".encode() for w in weights]
            group.attrs["weight_names"] = names
            for name, weight in zip(names, weights, strict=True):
                group.create_dataset(name, data=keras.ops.convert_to_numpy(weight))
    return path


def zoo_model(arch: str, side: int, *, input_norm: str | None = None, **options):
    norm = input_norm or get_spec(arch).pretrained_norm
    return build_model(arch, (side, side, 3), 10, input_norm=norm, **options)


def features(model, x: np.ndarray) -> np.ndarray:
    backbone = keras.Model(model.input, model.get_layer("head_pool").input)
    return keras.ops.convert_to_numpy(backbone(x, training=False))


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def keras_features(app, x: np.ndarray, arch: str) -> np.ndarray:
    if arch == "convnext_tiny":
        # Keras's headless ConvNeXt ends in a LayerNorm before pooling; ours is head_norm.
        app = keras.Model(app.input, app.layers[-1].input)
    return keras.ops.convert_to_numpy(app(x, training=False))


def check_parity(arch: str, path: Path, app) -> None:
    _, preprocess, side = FAMILIES[arch]
    model = zoo_model(arch, side, small_input=False)
    loaded = load_application_weights(
        model, arch, str(path), width_multiplier=1.0, small_input=False
    )
    assert loaded.fresh_head and all(name.startswith("head_") for name in loaded.fresh)
    x = pixels(side)
    theirs = keras_features(app, preprocess(x.copy()), arch)
    error = relative_error(features(model, x), theirs)
    print(f"{arch}: {error:.2e} of max |feature| {np.abs(theirs).max():.3g}")
    assert error <= TOLERANCE, error
    if arch == "convnext_tiny":
        for ours, keras_weight in zip(
            model.get_layer("head_norm").get_weights(), app.layers[-1].get_weights(), strict=True
        ):
            np.testing.assert_array_equal(ours, keras_weight)


@pytest.mark.parametrize(
    "arch",
    [
        "densenet121",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "convnext_tiny",
        "inception_v3",
        "vgg16",
        "vgg19",
    ],
)
def test_backbone_equals_keras_application_from_weights_h5(arch: str, tmp_path: Path) -> None:
    constructor, _, side = FAMILIES[arch]
    app = keras_application(constructor, side)
    path = tmp_path / f"{arch}.weights.h5"
    app.save_weights(path)
    check_parity(arch, path, app)
    keras.backend.clear_session()


def test_backbone_equals_keras_application_from_legacy_h5(tmp_path: Path) -> None:
    app = keras_application("DenseNet121", 32)
    path = save_legacy_h5(app, tmp_path / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5")
    check_parity("densenet121", path, app)
    keras.backend.clear_session()


def fake_keras_download(monkeypatch, path: Path) -> None:
    """Keras's get_file answering `path` for every request, for the zoo (keras.utils) and
    for the applications, which call it through a private module."""
    import keras.src.utils.file_utils as file_utils

    def get_file(fname, origin, *args, **kwargs):
        return str(path)

    monkeypatch.setattr(keras.utils, "get_file", get_file)
    monkeypatch.setattr(file_utils, "get_file", get_file)


def test_efficientnet_imagenet_folds_kerass_extra_scaling(monkeypatch, tmp_path: Path) -> None:
    # Keras's weights="imagenet" EfficientNet divides its Normalization's output by
    # sqrt(std) again (a Rescaling that weights=<path> does not build): ours must too.
    # BatchNorm statistics for what the imagenet graph computes, (x/255 - mean) / std;
    # the file then holds what Keras's ImageNet file does: the stds as variances.
    std = np.array(IMAGENET_STD)
    app = keras_application("EfficientNetB0", 32, normalization=(IMAGENET_MEAN, std**2))
    normalization = next(
        layer for layer in app.layers if isinstance(layer, keras.layers.Normalization)
    )
    normalization.set_weights([np.array(IMAGENET_MEAN), std, np.array(0)])
    normalization.finalize_state()
    path = tmp_path / "efficientnetb0_notop.weights.h5"
    app.save_weights(path)
    fake_keras_download(monkeypatch, path)
    keras_imagenet = keras.applications.EfficientNetB0(
        include_top=False, weights="imagenet", input_shape=(32, 32, 3)
    )
    model = zoo_model("efficientnet_b0", 32, small_input=False)
    load_application_weights(
        model, "efficientnet_b0", "imagenet", width_multiplier=1.0, small_input=False
    )
    x = pixels(32)
    theirs = keras.ops.convert_to_numpy(keras_imagenet(x, training=False))
    error = relative_error(features(model, x), theirs)
    print(f"efficientnet_b0 imagenet: {error:.2e} of max |feature| {np.abs(theirs).max():.3g}")
    assert error <= TOLERANCE, error
    # ... and by path it is Keras's weights=<path> model, without that division.
    load_application_weights(
        model, "efficientnet_b0", str(path), width_multiplier=1.0, small_input=False
    )
    assert relative_error(features(model, x), keras_features(app, x, "efficientnet_b0")) <= 1e-4
    keras.backend.clear_session()


def test_small_input_takes_the_same_weights(tmp_path: Path) -> None:
    app = keras_application("MobileNetV2", 32)
    path = tmp_path / "mobilenet_v2.weights.h5"
    app.save_weights(path)
    model = zoo_model("mobilenet_v2", 32, small_input=True)
    loaded = load_application_weights(
        model, "mobilenet_v2", str(path), width_multiplier=1.0, small_input=True
    )
    assert loaded.fresh == ("head_dense",)
    assert model.get_layer("head_pool").input.shape[1:3] == (4, 4)  # strides only
    np.testing.assert_array_equal(
        model.get_layer("backbone_block_16_project").get_weights()[0],
        app.get_layer("block_16_project").get_weights()[0],
    )
    keras.backend.clear_session()


# The imagenet files: the same name, URL and hash as Keras's applications fetch.


class _Requested(Exception):
    pass


IMAGENET_CASES = [
    *[(arch, 32, 1.0) for arch in applications.ADAPTERS if arch != "inception_v3"],
    ("inception_v3", 75, 1.0),
    ("vgg16", 32, 1.0),
    ("vgg19", 32, 1.0),
    ("mobilenet_v1", 128, 0.5),
    ("mobilenet_v2", 96, 0.35),
    ("mobilenet_v3_large", 32, 0.75),
]


def test_imagenet_files_are_the_ones_keras_fetches(monkeypatch) -> None:
    """Pins `imagenet_file` to Keras: each application's own get_file call, caught
    through Keras's private file_utils (the applications call it there)."""
    import keras.src.utils.file_utils as file_utils

    def get_file(fname, origin, cache_subdir="datasets", file_hash=None, **kwargs):
        raise _Requested(ImagenetFile(fname, origin, file_hash), cache_subdir)

    monkeypatch.setattr(file_utils, "get_file", get_file)
    constructors = {"vgg16": "VGG16", "vgg19": "VGG19"} | {
        arch: adapter.constructor for arch, adapter in applications.ADAPTERS.items()
    }
    for arch, side, width in IMAGENET_CASES:
        options = {"alpha": width} if arch.startswith("mobilenet") else {}
        with pytest.raises(_Requested) as requested, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MobileNets: "loading the 224 weights"
            getattr(keras.applications, constructors[arch])(
                include_top=False, weights="imagenet", input_shape=(side, side, 3), **options
            )
        expected, subdir = requested.value.args
        assert subdir == "models"
        assert imagenet_file(arch, (side, side, 3), width_multiplier=width) == expected, arch
        keras.backend.clear_session()


@pytest.fixture
def offline_cache(monkeypatch, tmp_path: Path) -> Path:
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    home = tmp_path / "keras-home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home / "models"


def test_imagenet_offline_is_one_line_naming_the_cache_and_url(offline_cache: Path) -> None:
    # This machine has no internet: the download fails at name resolution.
    spec = imagenet_file("densenet121", (32, 32, 3))
    start = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        imagenet_weights_file("densenet121", (32, 32, 3))
    elapsed = time.monotonic() - start
    message = str(refused.value)
    print(f"offline refusal in {elapsed:.3f} s: {message}")
    assert "\n" not in message
    assert message.startswith("model.pretrained imagenet: densenet121's Keras weights")
    assert str(offline_cache / spec.fname) in message
    assert f"download {spec.origin} there" in message
    assert elapsed < 5
    assert not (offline_cache / spec.fname).exists()  # no partial file left


def test_a_stalled_download_is_bounded(offline_cache: Path, monkeypatch) -> None:
    # A server that accepts the connection and never answers.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    spec = ImagenetFile("stalled_notop.h5", f"http://127.0.0.1:{port}/stalled_notop.h5", None)
    monkeypatch.setattr(applications, "imagenet_file", lambda *args, **kwargs: spec)
    monkeypatch.setattr(applications, "DOWNLOAD_TIMEOUT_S", 0.5)
    start = time.monotonic()
    try:
        with pytest.raises(ConfigError, match="cannot be downloaded .*timed out"):
            imagenet_weights_file("densenet121", (32, 32, 3))
    finally:
        server.close()
    assert time.monotonic() - start < 5
    assert socket.getdefaulttimeout() is None  # restored


def test_a_cached_file_needs_no_network(offline_cache: Path) -> None:
    spec = imagenet_file("mobilenet_v2", (32, 32, 3))  # Keras checks no hash for it
    offline_cache.mkdir()
    (offline_cache / spec.fname).write_bytes(b"cached")
    assert imagenet_weights_file("mobilenet_v2", (32, 32, 3)) == offline_cache / spec.fname


# Refusals: one line, naming the key.


@pytest.mark.parametrize(
    ("arch", "weights", "width", "message"),
    [
        ("densenet121", "imagenet", 0.5, "model.width_multiplier 0.5: densenet121's Keras "),
        ("efficientnet_b0", "some.weights.h5", 2.0, "fit width 1.0 only"),
        (
            "mobilenet_v2",
            "imagenet",
            0.6,
            "Keras has ImageNet weights for mobilenet_v2 at widths 0.35, 0.5, 0.75, 1.0, "
            "1.3, 1.4 only",
        ),
        ("mobilenet_v3_small", "imagenet", 0.5, "at widths 0.75, 1.0 only"),
    ],
)
def test_a_width_the_weights_cannot_fit_is_refused(arch, weights, width, message) -> None:
    with pytest.raises(ConfigError, match=message):
        application_weights(arch, weights, (32, 32, 3), width_multiplier=width, small_input=True)


def test_imagenet_wants_rgb() -> None:
    with pytest.raises(ConfigError, match="RGB images, got 1 channel"):
        imagenet_weights_file("densenet121", (32, 32, 1))


def test_a_file_keras_cannot_load_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_text("not an HDF5 file")
    with pytest.raises(ConfigError) as refused:
        application_weights(
            "mobilenet_v2", str(junk), (32, 32, 3), width_multiplier=1.0, small_input=True
        )
    message = str(refused.value)
    assert message.startswith(f"model.pretrained: {junk} does not load into Keras's MobileNetV2")
    assert "file signature not found" in message and "\n" not in message

    other = tmp_path / "mobilenet_v3_small.weights.h5"
    keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    ).save_weights(other)
    with pytest.raises(ConfigError) as refused:
        application_weights(
            "mobilenet_v2", str(other), (32, 32, 3), width_multiplier=1.0, small_input=True
        )
    message = str(refused.value)
    assert "could not be loaded" in message and "value.shape=" in message
    assert "\n" not in message
    keras.backend.clear_session()


def test_mis_shaped_and_unmatched_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet_v2.weights.h5"
    keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    ).save_weights(path)
    # The file is alpha 1.0; at another width Keras itself refuses it...
    with pytest.raises(ConfigError, match="at model.width_multiplier 0.5: .*value.shape="):
        application_weights(
            "mobilenet_v2", str(path), (32, 32, 3), width_multiplier=0.5, small_input=True
        )
    # ... and a model of another width than the weights' is refused before any copy.
    narrow = zoo_model("mobilenet_v2", 32, width_multiplier=0.5)
    before = narrow.get_layer("backbone_Conv1").get_weights()[0]
    with pytest.raises(ConfigError, match=r"backbone_Conv1/kernel of shape \(3, 3, 3, 32\)"):
        load_application_weights(
            narrow, "mobilenet_v2", str(path), width_multiplier=1.0, small_input=True
        )
    np.testing.assert_array_equal(narrow.get_layer("backbone_Conv1").get_weights()[0], before)

    # EfficientNet's weights carry its Normalization: a model without it is refused.
    app = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    path = tmp_path / "efficientnet_b0.weights.h5"
    app.save_weights(path)
    unit = zoo_model("efficientnet_b0", 32, input_norm="unit")
    with pytest.raises(ConfigError, match="backbone_normalization.*model.input_norm raw"):
        load_application_weights(
            unit, "efficientnet_b0", str(path), width_multiplier=1.0, small_input=True
        )
    keras.backend.clear_session()


def test_registry_knows_the_scaling_each_familys_weights_want() -> None:
    wanted = {
        "densenet121": "imagenet",  # Keras's "torch" mode
        "convnext_tiny": "imagenet",  # its built-in ImageNet Normalization
        "mobilenet_v1": "symmetric",  # "tf" mode
        "mobilenet_v2": "symmetric",
        "inception_v3": "symmetric",
        "mobilenet_v3_large": "symmetric",  # its built-in Rescaling(1/127.5, -1)
        "efficientnet_b3": "raw",  # keeps its own Rescaling and Normalization
        "vgg19": "caffe",
    }
    assert {arch: get_spec(arch).pretrained_norm for arch in wanted} == wanted


def test_a_saved_model_keeps_the_loaded_normalization(tmp_path: Path) -> None:
    # EfficientNet's own Normalization (input_norm raw) travels in the .keras file the
    # served model is loaded from, with the statistics the weights brought.
    app = keras_application("EfficientNetB0", 32)
    path = tmp_path / "efficientnet_b0.weights.h5"
    app.save_weights(path)
    model = zoo_model("efficientnet_b0", 32)
    load_application_weights(
        model, "efficientnet_b0", str(path), width_multiplier=1.0, small_input=True
    )
    saved = tmp_path / "model.keras"
    model.save(saved)
    loaded = keras.saving.load_model(saved, safe_mode=True)
    x = pixels(32)
    np.testing.assert_array_equal(features(loaded, x), features(model, x))
    keras.backend.clear_session()
