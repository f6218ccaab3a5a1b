"""Architectures from keras.applications behind the registry's builder signature.

Each adapter builds its Keras application headless (`include_top=False,
weights=None`: no internet, random init) on our raw-pixel input and [0, 1]
rescaling, then replays the application's graph once through
`keras.models.clone_model`, recreating every layer from its config, in order to:

- name its layers `backbone_<Keras's name>` (the application's own names less
  a leading model name; Keras's counter names such as `conv2d_57` renumbered
  from zero, so names do not depend on what the session built before);
- drop the application's own input preprocessing (EfficientNet's Rescaling and
  Normalization, MobileNetV3's Rescaling, ConvNeXt's ImageNet Normalization:
  `image_input` already scales the pixels, as `input_norm` says) unless
  `input_norm` is "raw", which keeps them; drop its identity layers (ConvNeXt),
  and flatten nested Sequential blocks (ConvNeXt's stem and downsampling
  blocks);
- `small_input`: set the stem and the first downsampling block to stride 1 with
  'same' padding (dropping the ZeroPadding2D that fed a 'valid' one), and drop
  DenseNet's stem max pool. The network then downsamples by 8 instead of 32,
  as resnet18's small_input does: a 4x4 final map at 32x32 instead of 1x1.
  Inception v3 keeps its ImageNet stem (its 'valid' convolutions and pools
  need 75x75 inputs whatever the strides): small_input does not apply to it;
- BatchNorm momentum: set to the zoo's 0.9 (PyTorch's 0.1). The applications use
  0.99 or 0.999, tuned for long ImageNet runs: after a few hundred steps their
  moving statistics still hold their initial values, and validation accuracy
  of a short CIFAR run sits at chance while training accuracy climbs;
- `width_multiplier`: passed as `alpha` to MobileNet v1/v2/v3 (any value
  works with weights=None); the other families have no width argument, so
  every convolution's and dense layer's channel count in the backbone is
  scaled (rounded to a multiple of 8): a uniform width scaling, not
  EfficientNet's compound scaling.

Then comes our head, laid out like the published classifier so that trainable
parameters at the ImageNet configuration match the published counts: global
average pool, dropout (our `dropout`), dense and float32 softmax; MobileNetV3
adds its hidden 1x1 conv (a dense 1024/1280 with hard swish, applied after
pooling as in the paper) and ConvNeXt its LayerNorm after pooling (Keras's
headless ConvNeXt applies that LayerNorm before pooling; it is moved here).

The seeds' operator choices (LayerChoices) do not apply: the registry refuses
them for these families (hand_written=False).

Pretrained weights (`model.pretrained`): `load_application_weights` builds the
Keras application (and VGG-16/19's, `classic.keras_vgg`) with `weights=` the
file, replays it as above to learn each layer's zoo name, and copies its
weights into the zoo model by name and shape; the head starts fresh. The input
scaling follows the weights: `Adapter.pretrained_norm`, the registry's
`pretrained_norm` (see `load_application_weights`). `imagenet_weights_file`
fetches Keras's own ImageNet file into the Keras cache, once.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.models.blocks import (
    BN_MOMENTUM,
    DEFAULT_CHOICES,
    IMAGENET_STD,
    classifier_head,
    image_input,
    probabilities,
)
from pipeline.models.blocks import scaled_width as _scaled_width
from pipeline.models.registration import register_model

PREFIX = "backbone"


@dataclass(frozen=True)
class Adapter:
    """How one keras.applications constructor becomes a registry builder."""

    constructor: str  # attribute of keras.applications
    family: str
    min_size: int = 32  # what keras.applications accepts
    imagenet_size: int = 224
    # the constructor takes the width multiplier as `alpha`
    alpha: bool = False
    # the constructor has `include_preprocessing` (turned off: we rescale)
    preprocessing_flag: bool = False
    # Keras layer names small_input sets to stride 1 ('same' padding): the stem
    # and the first downsampling block
    stride_one: tuple[str, ...] = ()
    # Keras layer names small_input removes (with the ZeroPadding2D feeding them)
    drop_small: tuple[str, ...] = ()
    # head: a hidden dense layer with hard swish after pooling (MobileNetV3), 0: none
    head_hidden: int = 0
    # head: LayerNorm after pooling (ConvNeXt)
    head_norm: bool = False
    # input scaling the Keras weights want (`blocks.input_scaling`): Keras's
    # preprocess_input mode, or "raw" where the Keras model scales its own input
    pretrained_norm: str = "imagenet"
    # the widths (alpha) Keras has ImageNet weights for; () for width 1 only
    imagenet_alphas: tuple[float, ...] = ()


ADAPTERS: dict[str, Adapter] = {
    # No small_input: the stem's 'valid' convolutions and pools need 75x75 anyway.
    "inception_v3": Adapter(
        "InceptionV3", "inception", min_size=75, imagenet_size=299, pretrained_norm="symmetric"
    ),
    "densenet121": Adapter(
        "DenseNet121", "densenet", stride_one=("conv1_conv",), drop_small=("pool1",)
    ),
    "mobilenet_v1": Adapter(
        "MobileNet",
        "mobilenet",
        alpha=True,
        stride_one=("conv1", "conv_dw_2"),
        pretrained_norm="symmetric",
        imagenet_alphas=(0.25, 0.5, 0.75, 1.0),
    ),
    "mobilenet_v2": Adapter(
        "MobileNetV2",
        "mobilenet_v2",
        alpha=True,
        stride_one=("Conv1", "block_1_depthwise"),
        pretrained_norm="symmetric",
        imagenet_alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
    ),
    "mobilenet_v3_small": Adapter(
        "MobileNetV3Small",
        "mobilenet_v3",
        alpha=True,
        preprocessing_flag=True,
        stride_one=("conv", "expanded_conv_depthwise"),
        head_hidden=1024,
        pretrained_norm="symmetric",
        imagenet_alphas=(0.75, 1.0),
    ),
    "mobilenet_v3_large": Adapter(
        "MobileNetV3Large",
        "mobilenet_v3",
        alpha=True,
        preprocessing_flag=True,
        stride_one=("conv", "expanded_conv_1_depthwise"),
        head_hidden=1280,
        pretrained_norm="symmetric",
        imagenet_alphas=(0.75, 1.0),
    ),
    **{
        f"efficientnet_b{k}": Adapter(
            f"EfficientNetB{k}",
            "efficientnet",
            imagenet_size=size,
            stride_one=("stem_conv", "block2a_dwconv"),
            pretrained_norm="raw",
        )
        for k, size in enumerate((224, 240, 260, 300))
    },
    # small_input: the 4x4/4 patchify stem becomes a 4x4/1 'same' (overlapping) conv.
    "convnext_tiny": Adapter(
        "ConvNeXtTiny",
        "convnext",
        preprocessing_flag=True,
        stride_one=("convnext_tiny_stem_conv",),
        head_norm=True,
    ),
}


def _snake_case(name: str) -> str:
    """Keras's automatic layer-name base of a class name: `Conv2D` -> `conv2d`."""
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: nearest multiple of `divisor`, at most 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _flat_layers(model) -> list:
    """A model's layers with nested Sequential blocks expanded."""
    import keras

    flat = []
    for layer in model.layers:
        flat.extend(layer.layers if isinstance(layer, keras.Sequential) else [layer])
    return flat


class _Replay:
    """clone_model's clone and call functions: rename, restride, rescale, drop layers."""

    def __init__(
        self,
        app,
        adapter: Adapter,
        *,
        small_input: bool,
        width_multiplier: float,
        keep_preprocessing: bool = False,
    ):
        from keras import layers

        self.app_prefix = f"{app.name}_"
        self.scale = 1.0 if adapter.alpha else width_multiplier
        self.stride_one = set(adapter.stride_one) if small_input else set()
        self.counts: dict[str, int] = {}
        self.skipped: set[int] = set()  # ids of the original layers left out
        self.names: dict[int, str] = {}  # id of an original layer -> its replay's name

        drop = set(adapter.drop_small) if small_input else set()
        named = {layer.name: layer for layer in _flat_layers(app)}
        missing = (self.stride_one | drop) - set(named)
        if missing:
            raise RuntimeError(f"{app.name}: no layers {sorted(missing)} (Keras changed?)")
        producers = {id(layer.output): layer for layer in app.layers}
        for name in self.stride_one | drop:
            producer = producers.get(id(named[name].input))
            if isinstance(producer, layers.ZeroPadding2D):
                self.skipped.add(id(producer))
        for name in drop:
            self.skipped.add(id(named[name]))
        for layer in app.layers:
            is_preprocessing = (
                isinstance(layer, layers.Rescaling | layers.Normalization)
                and layer.name != "rescale"
                and not keep_preprocessing
            )
            is_identity = (
                isinstance(layer, layers.Activation)
                and layer.get_config()["activation"] == "linear"
            )
            if is_preprocessing or is_identity:
                self.skipped.add(id(layer))
        if adapter.head_norm:
            # Keras's headless ConvNeXt ends in a LayerNorm; ours comes after pooling.
            self.skipped.add(id(app.layers[-1]))

    def clone(self, layer):
        """The replacement of one layer (a tuple for a flattened Sequential, None: skip)."""
        import keras

        if id(layer) in self.skipped:
            return None
        if isinstance(layer, keras.Sequential):
            return tuple(self.clone(inner) for inner in layer.layers)
        config = layer.get_config()
        if not isinstance(layer, keras.layers.Layer):
            return type(layer).from_config(config)  # a stateless op such as `x + 3.0`
        if layer.name in self.stride_one:
            config.update(strides=(1, 1), padding="same")
        if isinstance(layer, keras.layers.BatchNormalization):
            config["momentum"] = BN_MOMENTUM
        if self.scale != 1.0:
            self._scale_channels(layer, config)
        config["name"] = self.names[id(layer)] = self._rename(layer)
        return type(layer).from_config(config)

    def call(self, layer, *args, **kwargs):
        if layer is None:
            return args[0]
        if isinstance(layer, tuple):
            (x,) = args
            for inner in layer:
                x = self.call(inner, x)
            return x
        return layer(*args, **kwargs)

    def _rename(self, layer) -> str:
        name = layer.name
        if name in ("image", "rescale"):
            return name
        base = _snake_case(type(layer).__name__)
        if re.fullmatch(rf"{base}(_\d+)?", name):
            count = self.counts.get(base, 0)
            self.counts[base] = count + 1
            name = base if count == 0 else f"{base}_{count}"
        name = name.removeprefix(self.app_prefix)
        return f"{PREFIX}_{name}"

    def _scale_channels(self, layer, config: dict) -> None:
        """Scale a layer's channel count; equal counts stay equal (residual adds, SE)."""
        from keras import layers

        def scaled(channels: int) -> int:
            return _scaled_width(channels, self.scale)

        if isinstance(layer, layers.Conv2D):
            filters = config["filters"]
            config["filters"] = scaled(filters)
            if config.get("groups", 1) == filters > 1:  # depthwise as a grouped conv
                config["groups"] = config["filters"]
        elif isinstance(layer, layers.Dense):
            config["units"] = scaled(config["units"])
        elif isinstance(layer, layers.Reshape):  # EfficientNet's squeeze-excite
            *spatial, channels = config["target_shape"]
            config["target_shape"] = (*spatial, scaled(channels))
        elif "projection_dim" in config:  # ConvNeXt's LayerScale
            config["projection_dim"] = scaled(config["projection_dim"])


def backbone(
    adapter: Adapter,
    input_shape,
    *,
    width_multiplier: float,
    small_input: bool,
    input_norm: str = "unit",
):
    """(inputs, feature map): the headless application on raw pixels, replayed (see above)."""
    import keras

    _, x = image_input(input_shape, input_norm)
    # "raw": the pixels reach the application's own preprocessing layers, kept.
    keep = input_norm == "raw"
    options = {"include_top": False, "weights": None, "input_tensor": x}
    if adapter.alpha:
        options["alpha"] = width_multiplier
    if adapter.preprocessing_flag:
        options["include_preprocessing"] = keep
    app = getattr(keras.applications, adapter.constructor)(**options)
    replay = _Replay(
        app,
        adapter,
        small_input=small_input,
        width_multiplier=width_multiplier,
        keep_preprocessing=keep,
    )
    # A fresh input for the replay (some applications' `input` is a list holding ours).
    inputs = keras.tree.map_structure(
        lambda _: keras.Input(shape=input_shape, name="image"), app.input
    )
    clone = keras.models.clone_model(
        app, input_tensors=inputs, clone_function=replay.clone, call_function=replay.call
    )
    return keras.tree.flatten(inputs)[0], clone.outputs[0]


def head(x, adapter: Adapter, num_classes: int, *, dropout: float, width_multiplier: float):
    """Pool, the family's extra top layers, dropout, dense: the published classifier's layout."""
    from keras import layers

    if not adapter.head_hidden and not adapter.head_norm:
        return classifier_head(x, num_classes, dropout=dropout, head="gap")
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    if adapter.head_norm:
        x = layers.LayerNormalization(epsilon=1e-6, name="head_norm")(x)
    if adapter.head_hidden:
        # Keras widens MobileNetV3's last layer only for alpha > 1.
        units = adapter.head_hidden
        if adapter.alpha and width_multiplier > 1:
            units = _make_divisible(units * width_multiplier)
        x = layers.Dense(units, name="head_fc")(x)
        x = layers.Activation("hard_swish", name="head_hard_swish")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return probabilities(x, num_classes)


def build_application(
    name: str,
    input_shape,
    num_classes: int,
    *,
    dropout: float,
    width_multiplier: float,
    small_input: bool,
    choices=DEFAULT_CHOICES,
    input_norm: str = "unit",
):
    """Registered architecture `name` from keras.applications with our input and head."""
    import keras

    adapter = ADAPTERS[name]
    inputs, x = backbone(
        adapter,
        input_shape,
        width_multiplier=width_multiplier,
        small_input=small_input,
        input_norm=input_norm,
    )
    outputs = head(x, adapter, num_classes, dropout=dropout, width_multiplier=width_multiplier)
    return keras.Model(inputs, outputs, name=name)


# ---- pretrained weights --------------------------------------------------------------

# VGG-16/19 (`classic.keras_vgg`): Keras's layers kept under Keras's names.
KERAS_VGG = {"vgg16": "VGG16", "vgg19": "VGG19"}
# Keras's VGG weights take BGR images (Caffe's); the zoo's take RGB, so this kernel's
# input channels are reversed when loaded ("caffe" input_norm: x - mean, RGB order).
VGG_BGR_CONV = "block1_conv1"
# Seconds a stalled connection may take per read while fetching ImageNet weights.
DOWNLOAD_TIMEOUT_S = 30.0
_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_EFFICIENTNET_HASHES = (  # Keras's md5 of efficientnetb0..b3_notop.h5
    "50bc09e76180e00e4465e1a485ddc09d",
    "74c4e6b3e1f6a1eea24c589628592432",
    "111f8e2ac8aa800a7a99e3239f7bfb39",
    "af6d107764bb5b1abb91932881670226",
)
_MOBILENET_V3_HASHES = {  # Keras's md5 of weights_mobilenet_v3_<key>_no_top_v2.h5
    "small_224_0.75_float": "ebdb5cc8e0b497cd13a7c275d475c819",
    "small_224_1.0_float": "d3e8ec802a04aa4fc771ee12a9a9b836",
    "large_224_0.75_float": "40af19a13ebea4e2ee0c676887f69a2e",
    "large_224_1.0_float": "07fb09a5933dd0c8eaafa16978110389",
}


@dataclass(frozen=True)
class ImagenetFile:
    """Keras's headless ImageNet weights of one architecture, as its application fetches
    them: `keras.utils.get_file(fname, origin, cache_subdir="models", file_hash=...)`."""

    fname: str
    origin: str
    file_hash: str | None  # md5 or sha256; None where Keras checks none (MobileNet v1/v2)


@dataclass(frozen=True)
class LoadedWeights:
    """What `load_application_weights` did: the layers it filled, those left fresh."""

    copied: tuple[str, ...]
    fresh: tuple[str, ...]  # all head layers (the notop weights have no classifier)

    @property
    def fresh_head(self) -> bool:
        return bool(self.fresh)


def imagenet_file(arch: str, input_shape, *, width_multiplier: float = 1.0) -> ImagenetFile:
    """The file Keras's application `arch` loads for `weights="imagenet"`, headless.

    MobileNet v1/v2 have one per input side Keras trained at (128..224, v2 also 96),
    224 for any other side, as Keras picks them; every other family one file.
    """
    check_pretrained_width(arch, "imagenet", width_multiplier)
    rows, cols = int(input_shape[0]), int(input_shape[1])
    alpha = float(width_multiplier)
    if arch in KERAS_VGG:
        name = f"{arch}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        md5 = {"vgg16": "6d6bbae143d832006294945121d1f1fc"}.get(
            arch, "253f8cb515780f3b799900260a226db6"
        )
        return ImagenetFile(name, f"{_KERAS_APPS}{arch}/{name}", md5)
    if arch == "densenet121":
        name = "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
        return ImagenetFile(
            name, f"{_KERAS_APPS}densenet/{name}", "30ee3e1110167f948a6b9946edeeb738"
        )
    if arch == "inception_v3":
        name = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
        return ImagenetFile(
            name, f"{_KERAS_APPS}inception_v3/{name}", "bcbd6486424b2319ff4ef7d526e38f63"
        )
    if arch == "mobilenet_v1":
        side = rows if rows == cols and rows in (128, 160, 192, 224) else 224
        text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[alpha]
        name = f"mobilenet_{text}_{side}_tf_no_top.h5"
        return ImagenetFile(name, f"{_KERAS_APPS}mobilenet/{name}", None)
    if arch == "mobilenet_v2":
        side = rows if rows == cols and rows in (96, 128, 160, 192, 224) else 224
        name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{side}_no_top.h5"
        return ImagenetFile(name, f"{_KERAS_APPS}mobilenet_v2/{name}", None)
    if arch.startswith("mobilenet_v3_"):
        key = f"{arch.removeprefix('mobilenet_v3_')}_224_{alpha}_float"
        name = f"weights_mobilenet_v3_{key}_no_top_v2.h5"
        return ImagenetFile(name, f"{_KERAS_APPS}mobilenet_v3/{name}", _MOBILENET_V3_HASHES[key])
    if arch.startswith("efficientnet_b"):
        k = int(arch.removeprefix("efficientnet_b"))
        name = f"efficientnetb{k}_notop.h5"
        origin = f"https://storage.googleapis.com/keras-applications/{name}"
        return ImagenetFile(name, origin, _EFFICIENTNET_HASHES[k])
    if arch == "convnext_tiny":
        name = "convnext_tiny_notop.h5"
        sha256 = "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"
        return ImagenetFile(name, f"{_KERAS_APPS}convnext/{name}", sha256)
    raise ConfigError(f"model.pretrained imagenet: {arch} is not a keras.applications model")


def keras_cache_dir() -> Path:
    """The folder holding Keras's downloaded weights: $KERAS_HOME/models, else
    ~/.keras/models; /tmp/.keras/models where that base is not writable (as Keras does)."""
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    base = os.path.expanduser(base)
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return Path(base) / "models"


def imagenet_weights_file(arch: str, input_shape, *, width_multiplier: float = 1.0) -> Path:
    """Keras's ImageNet weights of `arch` in the Keras cache, downloaded there the first time.

    Keras's own download (`keras.utils.get_file`, same name, URL and hash as the
    application's), each network read bounded by DOWNLOAD_TIMEOUT_S. Offline with
    no cached file: a one-line ConfigError naming the cache path and the URL.
    """
    import keras

    if int(input_shape[-1]) != 3:
        raise ConfigError(
            f"model.pretrained imagenet: Keras's ImageNet weights take RGB images, "
            f"got {int(input_shape[-1])} channel(s) (set prepare.channels 3)"
        )
    spec = imagenet_file(arch, input_shape, width_multiplier=width_multiplier)
    cache = keras_cache_dir()
    target = cache / spec.fname
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path = keras.utils.get_file(
            spec.fname,
            spec.origin,
            cache_subdir="models",
            file_hash=spec.file_hash,
            cache_dir=str(cache.parent),
        )
    except Exception as exc:  # Keras raises a bare Exception for a failed fetch
        state = "does not match Keras's hash" if target.exists() else "are not cached"
        raise ConfigError(
            f"model.pretrained imagenet: {arch}'s Keras weights {state} at {target} and "
            f"cannot be downloaded ({_fetch_reason(exc)}): download {spec.origin} there"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return Path(path)


def _fetch_reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(" -- ", 1)[-1] if text.startswith("URL fetch failure") else text


def check_pretrained_width(arch: str, weights: str, width_multiplier: float) -> None:
    """Refuse a width the weights cannot fit: MobileNets' ImageNet alphas, else width 1.

    VGG-16/19's width scales only the (fresh) head, so any width fits. A MobileNet
    file given by path fits the alpha it was saved at (Keras checks when loading).
    """
    if arch in KERAS_VGG:
        return
    adapter = ADAPTERS[arch]
    width = float(width_multiplier)
    if adapter.alpha:
        if weights == "imagenet" and width not in adapter.imagenet_alphas:
            alphas = ", ".join(str(a) for a in adapter.imagenet_alphas)
            raise ConfigError(
                f"model.width_multiplier {width_multiplier}: Keras has ImageNet weights "
                f"for {arch} at widths {alphas} only (model.pretrained imagenet)"
            )
        return
    if width != 1.0:
        raise ConfigError(
            f"model.width_multiplier {width_multiplier}: {arch}'s Keras weights "
            "(model.pretrained) fit width 1.0 only"
        )


def _is_imagenet_file(arch: str, weights: str, input_shape) -> bool:
    """Whether `weights` is Keras's ImageNet file of EfficientNet `arch` (by its md5)."""
    if weights == "imagenet":
        return True
    expected = imagenet_file(arch, input_shape).file_hash
    digest = hashlib.md5(usedforsecurity=False)
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == expected


def _keras_application(arch: str, path: str, input_shape, width_multiplier: float):
    """The headless Keras application `arch` (Keras's own defaults) loaded from `path`."""
    import keras

    constructor = KERAS_VGG.get(arch) or ADAPTERS[arch].constructor
    options = {"include_top": False, "weights": path, "input_shape": tuple(input_shape)}
    if arch in ADAPTERS and ADAPTERS[arch].alpha:
        options["alpha"] = float(width_multiplier)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            app = getattr(keras.applications, constructor)(**options)
        except Exception as exc:  # Keras's errors on a bad file: ValueError, OSError...
            raise ConfigError(
                f"model.pretrained: {path} does not load into Keras's {constructor}"
                f"{_width_note(arch, width_multiplier)}: {_load_reason(exc)}"
            ) from None
    skipped = [
        str(w.message) for w in caught if "retain their freshly-initialized" in str(w.message)
    ]
    if skipped:
        raise ConfigError(
            f"model.pretrained: {path} leaves layers of Keras's {constructor} unloaded: "
            f"{' '.join(skipped[0].split())[:300]}"
        )
    return app


def _width_note(arch: str, width_multiplier: float) -> str:
    if arch in ADAPTERS and ADAPTERS[arch].alpha:
        return f" at model.width_multiplier {width_multiplier}"
    return ""


def _load_reason(exc: Exception) -> str:
    """Keras's error in one line: its first line, plus the shapes where it gives them."""
    text = str(exc)
    reason = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    shapes = re.search(r"variable\.shape=\([^)]*\), Received: value\.shape=\([^)]*\)", text)
    if shapes:
        reason = f"{reason} {shapes.group(0)}"
    return (reason or type(exc).__name__)[:400]


def application_weights(
    arch: str, weights: str, input_shape, *, width_multiplier: float, small_input: bool
) -> dict[str, list]:
    """{zoo layer name: weight arrays} of Keras's application `arch` loaded from `weights`.

    `weights`: "imagenet" (Keras's file, fetched by `imagenet_weights_file`) or a
    path in a format the application's `weights=` takes: Keras's own legacy .h5,
    or a `.weights.h5` saved from that application (Keras's defaults). Names are
    the replay's (`backbone_<name>`; VGG keeps Keras's); ConvNeXt's final
    LayerNorm, which Keras applies before pooling, becomes `head_norm`, after it,
    where ImageNet trained it. `small_input` changes strides only (and drops
    weightless pools and paddings): the weights fit either way.

    Folded in: VGG's first kernel takes RGB (its input channels reversed), and
    EfficientNet's ImageNet file gets the extra division by sqrt(std) that Keras
    adds after its Normalization for `weights="imagenet"` only (recognized by its
    md5 when given by path), folded into that Normalization's variance.
    Refused, one line: a width the weights cannot fit, a file Keras cannot load.
    """
    import keras

    check_pretrained_width(arch, weights, width_multiplier)
    path = weights
    if weights == "imagenet":
        path = str(imagenet_weights_file(arch, input_shape, width_multiplier=width_multiplier))
    app = _keras_application(arch, path, input_shape, width_multiplier)
    if arch in KERAS_VGG:
        arrays = {layer.name: layer.get_weights() for layer in app.layers if layer.weights}
        kernel = arrays[VGG_BGR_CONV][0]
        arrays[VGG_BGR_CONV][0] = kernel[:, :, ::-1, :].copy()
        return arrays
    adapter = ADAPTERS[arch]
    replay = _Replay(
        app,
        adapter,
        small_input=small_input,
        width_multiplier=width_multiplier,
        keep_preprocessing=True,
    )
    inputs = keras.tree.map_structure(lambda _: keras.Input(shape=tuple(input_shape)), app.input)
    keras.models.clone_model(
        app, input_tensors=inputs, clone_function=replay.clone, call_function=replay.call
    )
    arrays = {}
    for layer in _flat_layers(app):
        if not layer.weights:
            continue
        if adapter.head_norm and layer is app.layers[-1]:
            name = "head_norm"
        elif id(layer) in replay.names:
            name = replay.names[id(layer)]
        else:
            raise RuntimeError(f"{app.name}: weights of {layer.name} have no zoo layer")
        arrays[name] = layer.get_weights()
    if adapter.family == "efficientnet" and _is_imagenet_file(arch, weights, input_shape):
        mean, variance, count = arrays[f"{PREFIX}_normalization"]
        arrays[f"{PREFIX}_normalization"] = [mean, variance * IMAGENET_STD, count]
    return arrays


def load_application_weights(
    model, arch: str, weights: str, *, width_multiplier: float, small_input: bool
) -> LoadedWeights:
    """Copy Keras's weights of `arch` (`application_weights`) into the zoo `model`.

    `model` is `arch` built with the same width and small_input, and with the
    input scaling the weights want (`pretrained_norm`: Keras's preprocess_input
    mode; "raw" for EfficientNet, whose Keras model keeps its own Rescaling and
    Normalization, the latter's statistics in the file). Every weight of the model
    outside its head must come from the file, with the same shape, and every
    weight of the file must find its layer; otherwise a one-line ConfigError and
    the model is left as it was. The head starts fresh (Keras's headless weights
    have no classifier), except ConvNeXt's `head_norm`.
    """
    arrays = application_weights(
        arch,
        weights,
        tuple(model.input_shape[1:]),
        width_multiplier=width_multiplier,
        small_input=small_input,
    )
    layers = {layer.name: layer for layer in model.layers if layer.weights}
    unmatched = [name for name in arrays if name not in layers]
    if unmatched:
        hint = ""
        if any(name.endswith("normalization") for name in unmatched):
            hint = " (its input normalization: build the model with model.input_norm raw)"
        raise ConfigError(
            f"model.pretrained: {weights} has weights for {', '.join(unmatched[:3])}, "
            f"which {arch} built this way does not have{hint}"
        )
    fresh = []
    for name, layer in layers.items():
        if name not in arrays:
            if not name.startswith("head_"):
                raise ConfigError(
                    f"model.pretrained: {weights} has no weights for {name} of {arch}"
                )
            fresh.append(name)
            continue
        values = arrays[name]
        if len(values) != len(layer.weights):
            raise ConfigError(
                f"model.pretrained: {weights} has {len(values)} weights for {name}, "
                f"the model {len(layer.weights)}"
            )
        for variable, value in zip(layer.weights, values, strict=True):
            if tuple(variable.shape) != tuple(value.shape):
                raise ConfigError(
                    f"model.pretrained: {weights} has {variable.path} of shape "
                    f"{tuple(value.shape)}, the model {tuple(variable.shape)} "
                    f"(model.width_multiplier {width_multiplier}?)"
                )
    from pipeline.models.saved import set_layer_weights

    for name, values in arrays.items():
        set_layer_weights(layers[name], values)
    return LoadedWeights(tuple(arrays), tuple(fresh))


def _register(name: str, adapter: Adapter) -> None:
    def builder(input_shape, num_classes, **options):
        return build_application(name, input_shape, num_classes, **options)

    builder.__name__ = name
    builder.__doc__ = f"keras.applications.{adapter.constructor} (see the module docstring)."
    register_model(
        name,
        family=adapter.family,
        min_size=adapter.min_size,
        hand_written=False,
        imagenet_size=adapter.imagenet_size,
        small_input=bool(adapter.stride_one or adapter.drop_small),
        pretrained_norm=adapter.pretrained_norm,
    )(builder)


for _name, _adapter in ADAPTERS.items():
    _register(_name, _adapter)
