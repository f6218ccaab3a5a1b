"""Layers every hand-written family shares, with the seeds' operator choices.

`LayerChoices` picks the convolution type, normalization, activation, padding
mode, downsampling and head; `conv_norm_act`, `downsample` and
`classifier_head` apply them, so every hand-written family (and SimpleCNN)
offers the same choices. Families from keras.applications keep their own
operators.

keras is imported inside the functions so that importing the registry (for
names and config validation) does not start TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import ConfigError

CONV_TYPES = ("standard", "separable", "group", "dilated", "spatial_separable")
# layer: the seeds' layer norm, over each sample's features (H, W and C), a scale and shift
# per feature; layer_channels: ConvNeXt's, over each pixel's channels, per channel
NORMS = ("batch", "group", "layer", "layer_channels", "none")
# sigmoid and tanh: the saturating activations the seeds explain were abandoned
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh")
# max_avg: the seeds' ConcatPool2d, max and average pools concatenated (channels doubled)
DOWNSAMPLES = ("max", "avg", "strided", "max_avg")
HEADS = ("default", "gap", "flatten", "max_avg")

# PyTorch's default (its momentum=0.1): moving statistics settle within a few hundred
# steps, where Keras's 0.99 leaves short runs evaluating with near-initial statistics.
BN_MOMENTUM = 0.9
# PyTorch's BatchNorm2d epsilon (Keras's is 1e-3), so that imported torchvision/timm
# statistics normalize exactly as they did there.
BN_EPSILON = 1e-5
# PyTorch's LeakyReLU default slope.
LEAKY_SLOPE = 0.01
# The layer every model's first convolution reads: raw pixels scaled (`input_scaling`).
IMAGE_LAYER = "rescale"
INPUT_NORMS = ("unit", "imagenet", "symmetric", "caffe", "raw")
# torchvision's (and Keras's "torch" mode) ImageNet statistics, RGB, of pixels in [0, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Caffe's ImageNet pixel means (Keras's "caffe" mode, VGG's weights), in RGB order
CAFFE_MEAN = (123.68, 116.779, 103.939)


@dataclass(frozen=True)
class LayerChoices:
    """Operator choices for hand-written families; the defaults are the classic ones."""

    conv: str = "standard"
    groups: int = 4  # for conv="group"
    norm: str = "batch"
    activation: str = "relu"
    padding: str = "zeros"  # zeros | reflect | replicate | circular | valid (none)
    downsample: str = "max"
    head: str = "default"
    kernel_size: int = 3  # the kernel of every 3x3 convolution (`kernel`)
    dilation_rate: int = 2  # for conv="dilated"

    def is_default(self) -> bool:
        return self == LayerChoices()


DEFAULT_CHOICES = LayerChoices()


def scaled_width(filters: int, width_multiplier: float, divisor: int = 8) -> int:
    """Channels after the width multiplier, rounded to a multiple of `divisor` (at least one)."""
    return max(divisor, int(filters * width_multiplier + divisor / 2) // divisor * divisor)


def input_scaling(norm: str, channels: int = 3) -> tuple:
    """(scale, offset) with which `image_input` maps 0..255 pixels for `norm`, per channel.

    Pretrained weights expect the scaling they were trained with (Keras's
    `preprocess_input` modes): "unit" [0, 1] (this zoo's own); "imagenet"
    (x / 255 - mean) / std, torchvision's and Keras's "torch" mode; "symmetric"
    [-1, 1], Keras's "tf" mode and timm's augreg ViTs; "caffe" x - mean (RGB order:
    the importer flips BGR kernels); "raw" the pixels as they are, for a model whose
    own layers scale them. Images that are not RGB take the scalar forms.
    """
    if norm not in INPUT_NORMS:
        raise ValueError(f"input norm must be one of {INPUT_NORMS}, got {norm!r}")
    rgb = channels == 3
    if norm == "imagenet":
        if not rgb:
            mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
            return 1 / (255 * std), -mean / std
        return (
            [1 / (255 * s) for s in IMAGENET_STD],
            [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)],
        )
    if norm == "caffe":
        means = list(CAFFE_MEAN)
        return 1.0, ([-m for m in means] if rgb else -sum(means) / 3)
    return {"unit": (1 / 255, 0.0), "symmetric": (1 / 127.5, -1.0), "raw": (1.0, 0.0)}[norm]


def image_input(input_shape: tuple[int, int, int], norm: str = "unit"):
    """Model input taking raw 0..255 pixels, so the saved model carries its own scaling
    (`input_scaling`): training, evaluation and serving all feed it the same pixels."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    scale, offset = input_scaling(norm, input_shape[-1])
    x = layers.Rescaling(scale, offset, name=IMAGE_LAYER)(inputs)
    return inputs, x


def pad(x, amount: int, choices: LayerChoices, name: str):
    """Symmetric spatial padding in the chosen mode (a no-op for 0, and for "valid": the
    seeds' unpadded convolutions, each shrinking the map by k - 1)."""
    from pipeline.models.layers import Pad2D

    if amount == 0 or choices.padding == "valid":
        return x
    return Pad2D(amount, mode=choices.padding, name=f"{name}_pad")(x)


def reads_image(x) -> bool:
    """Whether `x` is the model's scaled image (the first convolution's input)."""
    history = getattr(x, "_keras_history", None)
    return history is not None and history.operation.name == IMAGE_LAYER


def kernel(kernel_size: int, choices: LayerChoices) -> int:
    """The kernel a conv gets: model.kernel_size replaces every 3x3 (the families' own
    larger kernels, AlexNet's 11 and 5, LeNet's 5, and every 1x1 stay)."""
    return choices.kernel_size if kernel_size == 3 else kernel_size


def dilation(kind: str, strides: int, choices: LayerChoices) -> int:
    """The dilation a conv of `kind` gets: model.dilation_rate for "dilated" at stride 1."""
    return choices.dilation_rate if kind == "dilated" and strides == 1 else 1


def conv_kind(x, kernel_size: int, choices: LayerChoices, groups: int | None = None) -> str:
    """The conv type a layer gets: `groups` (ResNeXt) forces a group conv; 1x1 convs, and
    group convs on the image itself (its 1 or 3 colour channels), stay standard."""
    if groups:
        return "group"
    if kernel_size == 1 or (choices.conv == "group" and reads_image(x)):
        return "standard"
    return choices.conv


def group_count(x, filters: int, choices: LayerChoices, name: str, groups: int | None) -> int:
    """`groups` (a family's own), else model.groups, refused unless it divides the layer's
    input and output channels (Keras would fail; lowering it would change it silently)."""
    if groups:
        return groups
    count, channels = choices.groups, x.shape[-1]
    if channels % count or filters % count:
        raise ConfigError(
            f"model.groups {count} does not divide the {channels} input and {filters} output "
            f"channels of {name}_conv (the largest that does: {math.gcd(count, channels, filters)})"
        )
    return count


def conv(
    x,
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    name: str,
    choices: LayerChoices = DEFAULT_CHOICES,
    use_bias: bool = False,
    groups: int | None = None,
):
    """A convolution of the chosen type and padding mode, output size ceil(input / strides).

    1x1 convolutions are always standard (the types differ only in the spatial part), and
    so is a group conv on the image (`conv_kind`). `groups` forces a group convolution
    (ResNeXt) whatever the choice. "dilated" dilates stride-1 convs only
    (model.dilation_rate). A 3x3 kernel is model.kernel_size (`kernel`). Strided
    convolutions pad (k - 1) / 2 on every side as PyTorch does (Keras's 'same' pads an
    even side 0 before and 1 after), so imported torchvision weights see the same
    pixels under each kernel.
    """
    from keras import layers

    common = {"use_bias": use_bias, "name": f"{name}_conv"}
    kernel_size = kernel(kernel_size, choices)
    kind = conv_kind(x, kernel_size, choices, groups)
    rate = dilation(kind, strides, choices)
    if kernel_size == 1 or (choices.padding == "zeros" and strides == 1):
        padding = "same"
    else:
        x = pad(x, rate * (kernel_size - 1) // 2, choices, name)
        padding = "valid"
    if kind == "separable":
        return layers.SeparableConv2D(
            filters, kernel_size, strides=strides, padding=padding, **common
        )(x)
    if kind == "spatial_separable":
        x = layers.Conv2D(
            filters,
            (kernel_size, 1),
            strides=(strides, 1),
            padding=padding,
            use_bias=use_bias,
            name=f"{name}_conv_kx1",
        )(x)
        return layers.Conv2D(
            filters, (1, kernel_size), strides=(1, strides), padding=padding, **common
        )(x)
    groups = group_count(x, filters, choices, name, groups) if kind == "group" else 1
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        groups=groups,
        dilation_rate=rate,
        kernel_initializer="he_normal",
        **common,
    )(x)


def norm(x, choices: LayerChoices, name: str, *, epsilon: float = BN_EPSILON):
    """The chosen normalization (none: identity); `epsilon`: batch norm's."""
    from keras import layers

    if choices.norm == "batch":
        bn = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=epsilon, name=f"{name}_bn")
        return bn(x)
    if choices.norm == "group":
        groups = math.gcd(32, x.shape[-1])
        return layers.GroupNormalization(groups=groups, name=f"{name}_gn")(x)
    if choices.norm == "layer":  # the seeds' (PyTorch's LayerNorm([C, H, W])): per feature
        return layers.LayerNormalization(axis=(1, 2, 3), name=f"{name}_ln")(x)
    if choices.norm == "layer_channels":  # ConvNeXt's: over each pixel's channels
        return layers.LayerNormalization(axis=-1, name=f"{name}_lnc")(x)
    return x


def activation(x, choices: LayerChoices, name: str):
    from keras import layers

    if choices.activation == "leaky_relu":
        return layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=f"{name}_leaky_relu")(x)
    return layers.Activation(choices.activation, name=f"{name}_{choices.activation}")(x)


def conv_norm_act(
    x,
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    name: str,
    choices: LayerChoices = DEFAULT_CHOICES,
    act: bool = True,
    groups: int | None = None,
    norm_epsilon: float = BN_EPSILON,
):
    """Convolution, normalization, then activation (`act=False`: none, e.g. before a residual add).

    Without normalization the convolution gets a bias. `norm_epsilon`: batch norm's epsilon.
    """
    x = conv(
        x,
        filters,
        kernel_size,
        strides=strides,
        name=name,
        choices=choices,
        use_bias=choices.norm == "none",
        groups=groups,
    )
    x = norm(x, choices, name, epsilon=norm_epsilon)
    return activation(x, choices, name) if act else x


def downsample(x, choices: LayerChoices, name: str, *, pool_size: int = 2, strides: int = 2):
    """Halve H and W by max pool, average pool, a strided 3x3 conv (these keep the
    channels), or max and average pools concatenated (channels doubled)."""
    if choices.downsample == "strided":
        return conv_norm_act(x, x.shape[-1], 3, strides=strides, name=name, choices=choices)
    return pool(x, choices, name, pool_size=pool_size, strides=strides, padding="same")


def pool(x, choices: LayerChoices, name: str, *, pool_size: int, strides: int, padding: str):
    """The pooling downsample choices: "max", "avg", or "max_avg", the seeds' ConcatPool2d
    (torch.cat([max_pool(x), avg_pool(x)], dim=1): max channels first, then average)."""
    from keras import layers

    kinds = ("max", "avg") if choices.downsample == "max_avg" else (choices.downsample,)
    pools = [
        {"max": layers.MaxPooling2D, "avg": layers.AveragePooling2D}[kind](
            pool_size, strides=strides, padding=padding, name=f"{name}_{kind}pool"
        )(x)
        for kind in kinds
    ]
    return pools[0] if len(pools) == 1 else layers.Concatenate(name=f"{name}_max_avg")(pools)


def centred_max_pool(x, pool_size: int, *, strides: int, name: str):
    """Max pool with (pool_size - 1) / 2 pixels of padding on every side, PyTorch's
    MaxPool2d(k, s, padding=k // 2): output ceil(side / strides) as with 'same', whose
    strided pool pads an even side after only. The padding repeats the edge, which
    equals PyTorch's -inf for a max: the edge pixel is in that window anyway."""
    from keras import layers

    from pipeline.models.layers import Pad2D

    x = Pad2D((pool_size - 1) // 2, mode="replicate", name=f"{name}_pad")(x)
    return layers.MaxPooling2D(pool_size, strides=strides, padding="valid", name=name)(x)


def classifier_head(x, num_classes: int, *, dropout: float, head: str = "gap"):
    """Pool (global average, flatten, or concatenated global max + average), dropout, dense.

    The softmax runs in float32 so mixed precision stays numerically stable.
    """
    from keras import layers

    if head == "flatten":
        x = layers.Flatten(name="head_flatten")(x)
    elif head == "max_avg":
        x = layers.Concatenate(name="head_max_avg")(
            [
                layers.GlobalMaxPooling2D(name="head_maxpool")(x),
                layers.GlobalAveragePooling2D(name="head_pool")(x),
            ]
        )
    else:
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return probabilities(x, num_classes)


def stochastic_depth_rates(final: float, count: int) -> list[float]:
    """timm's per-block stochastic depth: 0 at the first block, `final` at the last."""
    if count < 2:
        return [final] * count
    return [final * k / (count - 1) for k in range(count)]


def drop_branch(x, rate: float, name: str):
    """`x` (a residual branch) dropped per sample at `rate` in training; identity at 0."""
    if rate == 0:
        return x
    from pipeline.models.layers import StochasticDepth

    return StochasticDepth(rate, name=name)(x)


def probabilities(x, num_classes: int):
    """The last dense layer and a float32 softmax: every model's output."""
    from keras import layers

    x = layers.Dense(num_classes, name="head_dense")(x)
    return layers.Activation("softmax", dtype="float32", name="probs")(x)


def resolve_head(choices: LayerChoices, family_default: str = "gap") -> str:
    return family_default if choices.head == "default" else choices.head
