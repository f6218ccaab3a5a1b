"""Architectures from keras.applications behind the registry's builder signature.

Each adapter builds its Keras application headless (`include_top=False,
weights=None`: no internet, random init) on our raw-pixel input and [0, 1]
rescaling, then replays the application's graph once through
`keras.models.clone_model`, recreating every layer from its config, in order to:

- name its layers `backbone_<Keras's name>` (the application's own names less
  a leading model name; Keras's counter names such as `conv2d_57` renumbered
  from zero, so names do not depend on what the session built before);
- drop the application's own input preprocessing (EfficientNet's Rescaling and
  Normalization: `image_input` already maps pixels to [0, 1]) and its identity
  layers (ConvNeXt), and flatten nested Sequential blocks (ConvNeXt's stem and
  downsampling blocks);
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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.models.blocks import (
    BN_MOMENTUM,
    DEFAULT_CHOICES,
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


ADAPTERS: dict[str, Adapter] = {
    # No small_input: the stem's 'valid' convolutions and pools need 75x75 anyway.
    "inception_v3": Adapter("InceptionV3", "inception", min_size=75, imagenet_size=299),
    "densenet121": Adapter(
        "DenseNet121", "densenet", stride_one=("conv1_conv",), drop_small=("pool1",)
    ),
    "mobilenet_v1": Adapter(
        "MobileNet", "mobilenet", alpha=True, stride_one=("conv1", "conv_dw_2")
    ),
    "mobilenet_v2": Adapter(
        "MobileNetV2", "mobilenet_v2", alpha=True, stride_one=("Conv1", "block_1_depthwise")
    ),
    "mobilenet_v3_small": Adapter(
        "MobileNetV3Small",
        "mobilenet_v3",
        alpha=True,
        preprocessing_flag=True,
        stride_one=("conv", "expanded_conv_depthwise"),
        head_hidden=1024,
    ),
    "mobilenet_v3_large": Adapter(
        "MobileNetV3Large",
        "mobilenet_v3",
        alpha=True,
        preprocessing_flag=True,
        stride_one=("conv", "expanded_conv_1_depthwise"),
        head_hidden=1280,
    ),
    **{
        f"efficientnet_b{k}": Adapter(
            f"EfficientNetB{k}",
            "efficientnet",
            imagenet_size=size,
            stride_one=("stem_conv", "block2a_dwconv"),
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

    def __init__(self, app, adapter: Adapter, *, small_input: bool, width_multiplier: float):
        from keras import layers

        self.app_prefix = f"{app.name}_"
        self.scale = 1.0 if adapter.alpha else width_multiplier
        self.stride_one = set(adapter.stride_one) if small_input else set()
        self.counts: dict[str, int] = {}
        self.skipped: set[int] = set()  # ids of the original layers left out

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
        config["name"] = self._rename(layer)
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


def backbone(adapter: Adapter, input_shape, *, width_multiplier: float, small_input: bool):
    """(inputs, feature map): the headless application on raw pixels, replayed (see above)."""
    import keras

    _, x = image_input(input_shape)
    options = {"include_top": False, "weights": None, "input_tensor": x}
    if adapter.alpha:
        options["alpha"] = width_multiplier
    if adapter.preprocessing_flag:
        options["include_preprocessing"] = False
    app = getattr(keras.applications, adapter.constructor)(**options)
    replay = _Replay(app, adapter, small_input=small_input, width_multiplier=width_multiplier)
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
):
    """Registered architecture `name` from keras.applications with our input and head."""
    import keras

    adapter = ADAPTERS[name]
    inputs, x = backbone(
        adapter, input_shape, width_multiplier=width_multiplier, small_input=small_input
    )
    outputs = head(x, adapter, num_classes, dropout=dropout, width_multiplier=width_multiplier)
    return keras.Model(inputs, outputs, name=name)


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
    )(builder)


for _name, _adapter in ADAPTERS.items():
    _register(_name, _adapter)
