"""The classic plain CNNs: LeNet-5, AlexNet and VGG (11/13 hand-written, 16/19 from Keras).

Published layouts:

* LeNet-5 (LeCun et al., 1998) as usually implemented: conv 6@5x5, downsample,
  conv 16@5x5 (valid), downsample, dense 120, dense 84, dense classes; 61,706
  parameters on 32x32x1 with 10 classes.
* AlexNet as torchvision builds it (the one-GPU variant of Krizhevsky et al.,
  2012): conv 64@11x11/4 p2, max pool 3/2, conv 192@5x5, max pool 3/2, convs
  384, 256, 256 @3x3, max pool 3/2, 6x6 pool, dropout, dense 4096, dropout,
  dense 4096, dense classes; 61,100,840 parameters at 224x224, 1000 classes.
* VGG (Simonyan & Zisserman, 2015) configurations A (VGG-11) and B (VGG-13),
  3x3 convs with a 2x downsampling between stages and the classic head: 7x7x512
  map, flatten, dense 4096, dropout, dense 4096, dropout, dense classes. VGG-16
  and VGG-19 use `keras.applications.VGG16/VGG19` as the feature extractor
  (flat layers named `block1_conv1`...; Keras' operators, so the seeds' choices
  do not apply) under the same head.

Shared conventions:

* The classic head pools the last feature map to the published size (5x5, 6x6,
  7x7) with `AdaptiveAveragePooling2D`, PyTorch's `AdaptiveAvgPool2d` (same bins),
  so the dense layers have the published shapes at any input size: an identity
  at the published input size, an average over bins on larger maps, a
  replication of cells on smaller ones. No resizing. It is named `head_pool`,
  its input is the last feature map. `choices.head` other than "default"
  replaces the whole dense stack by the shared one-dense `classifier_head`.
* `dropout` (the argument, 0 = none) is used wherever torchvision has its 0.5
  dropout (LeNet: after each hidden dense layer).
* `width_multiplier` scales every hidden width: conv channels and the hidden
  dense units (120/84, 4096), not the class count. For VGG-16/19 only the head
  scales (Keras builds the convolutions).
* Convolutions that torchvision pads explicitly (AlexNet's 11x11/4 p2 giving
  55x55 at 224, LeNet's valid 5x5, AlexNet's 3/2 pools without padding) are
  built here with the padding mode of the choices then a 'valid' convolution,
  as `blocks.conv` always pads to 'same'.
* `small_input`: LeNet pads its first conv (the 28x28 MNIST variant, whose map
  is 5x5 at 28x28) where the paper's is valid on 32x32; AlexNet starts with a
  3x3/1 conv and no first pool; VGG leaves out the last (stage 5) downsampling.
  The registry's `min_size` is the smallest side with `small_input` true (the
  default); with it false LeNet (13) and AlexNet (63) raise a ConfigError below
  theirs. VGG-16/19 need Keras' 32 either way.
"""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.models.blocks import (
    DEFAULT_CHOICES,
    LayerChoices,
    activation,
    classifier_head,
    conv_kind,
    conv_norm_act,
    dilation,
    downsample,
    group_count,
    image_input,
    kernel,
    norm,
    pad,
    pool,
    probabilities,
    scaled_width,
)
from pipeline.models.registration import register_model

# Channels per stage ("M": downsampling), the paper's configurations A and B.
VGG_CONFIGS = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}
# Smallest side with small_input=False (with True: the registry's min_size).
LENET_MIN_SIDE = 13  # 13 -valid 5x5-> 9 -pool-> 5 -valid 5x5-> 1
ALEXNET_MIN_SIDE = 63  # 63 -11x11/4 p2-> 15 -pool-> 7 -pool-> 3 -pool-> 1


def require_side(input_shape, minimum: int, arch: str) -> None:
    """The large-input (small_input=False) layout needs at least `minimum` pixels a side."""
    if min(input_shape[0], input_shape[1]) < minimum:
        raise ConfigError(
            f"model.arch {arch} with model.small_input false needs images of at least "
            f"{minimum}x{minimum}, got {input_shape[0]}x{input_shape[1]} "
            "(raise prepare.image_size or set model.small_input true)"
        )


def explicit_conv(
    x,
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    padding: int = 0,
    name: str,
    choices: LayerChoices,
    use_bias: bool,
):
    """PyTorch-style convolution: pad `padding` pixels (choices' mode), then a valid conv.

    Output side floor((side + 2 * padding - kernel_size) / strides) + 1 for every conv
    type; "dilated" (model.dilation_rate, stride 1 only, as in `blocks.conv`) pads the
    extra pixels so that it keeps the undilated output size, and so does a 3x3 conv that
    model.kernel_size widens.
    """
    from keras import layers

    if kernel(kernel_size, choices) != kernel_size:  # model.kernel_size: pad for the same size
        padding += (choices.kernel_size - kernel_size) // 2
        kernel_size = choices.kernel_size
    kind = conv_kind(x, kernel_size, choices)
    rate = dilation(kind, strides, choices)
    x = pad(x, padding + (rate - 1) * (kernel_size - 1) // 2, choices, name)
    common = {"padding": "valid", "use_bias": use_bias, "name": f"{name}_conv"}
    if kind == "separable":
        return layers.SeparableConv2D(filters, kernel_size, strides=strides, **common)(x)
    if kind == "spatial_separable":
        x = layers.Conv2D(
            filters,
            (kernel_size, 1),
            strides=(strides, 1),
            padding="valid",
            use_bias=use_bias,
            name=f"{name}_conv_kx1",
        )(x)
        return layers.Conv2D(filters, (1, kernel_size), strides=(1, strides), **common)(x)
    groups = group_count(x, filters, choices, name, None) if kind == "group" else 1
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        groups=groups,
        dilation_rate=rate,
        kernel_initializer="he_normal",
        **common,
    )(x)


def explicit_conv_norm_act(
    x, filters: int, kernel_size: int, *, strides=1, padding=0, name, choices
):
    """`explicit_conv`, normalization, activation (a bias only without normalization)."""
    x = explicit_conv(
        x,
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        name=name,
        choices=choices,
        use_bias=choices.norm == "none",
    )
    return activation(norm(x, choices, name), choices, name)


def overlapping_downsample(x, choices: LayerChoices, name: str):
    """AlexNet's 3x3/2 pooling without padding (side -> floor((side - 3) / 2) + 1).

    The downsample choice picks max pool, average pool, both concatenated (channels
    doubled) or a strided 3x3 conv (same output size, channels kept).
    """
    if choices.downsample == "strided":
        return explicit_conv_norm_act(
            x, x.shape[-1], 3, strides=2, padding=0, name=name, choices=choices
        )
    return pool(x, choices, name, pool_size=3, strides=2, padding="valid")


def classic_head(
    x,
    num_classes: int,
    *,
    pool_size: int,
    hidden: tuple[int, ...],
    dropout: float,
    dropout_before: bool,
    choices: LayerChoices,
):
    """Adaptive pool to `pool_size`, flatten, hidden dense layers with dropout, dense classes.

    `dropout_before`: dropout ahead of each hidden dense layer (AlexNet), else after
    its activation (VGG, LeNet). Any head choice but "default" uses the shared head.
    """
    from keras import layers

    if choices.head != "default":
        return classifier_head(x, num_classes, dropout=dropout, head=choices.head)
    if tuple(x.shape[1:3]) == (1, 1):
        # Adaptive average pooling of one cell replicates it; Keras 3.15's TensorFlow
        # graph of AdaptiveAveragePooling2D fails on a 1x1 input (eager works).
        x = layers.UpSampling2D(pool_size, name="head_pool")(x)
    else:
        x = layers.AdaptiveAveragePooling2D(pool_size, name="head_pool")(x)
    x = layers.Flatten(name="head_flatten")(x)
    for index, units in enumerate(hidden, start=1):
        if dropout > 0 and dropout_before:
            x = layers.Dropout(dropout, name=f"head_dropout{index}")(x)
        x = layers.Dense(units, name=f"head_fc{index}")(x)
        x = activation(x, choices, f"head_fc{index}")
        if dropout > 0 and not dropout_before:
            x = layers.Dropout(dropout, name=f"head_dropout{index}")(x)
    return probabilities(x, num_classes)


@register_model(
    "lenet5",
    family="lenet",
    min_size=9,
    imagenet_size=32,
    default_head="classic",
    valid_convs=True,
    valid_padding=True,
    fixed_choices=(("kernel_size", "its convolutions are the paper's 5x5"),),
)
def lenet5(
    input_shape,
    num_classes,
    *,
    dropout,
    width_multiplier,
    small_input,
    choices=DEFAULT_CHOICES,
    input_norm="unit",
):
    """LeNet-5; `small_input` pads the first conv (28x28 -> 5x5 map), else it is valid (32x32).

    Widths are scaled without rounding to multiples of 8 (6 and 16 channels stay so).
    """
    import keras

    if not small_input:
        require_side(input_shape, LENET_MIN_SIDE, "lenet5")

    def width(filters: int) -> int:
        return scaled_width(filters, width_multiplier, divisor=1)

    inputs, x = image_input(input_shape, input_norm)
    if small_input:
        x = conv_norm_act(x, width(6), 5, name="stage1", choices=choices)
    else:
        x = explicit_conv_norm_act(x, width(6), 5, name="stage1", choices=choices)
    x = downsample(x, choices, name="stage1_down")
    x = explicit_conv_norm_act(x, width(16), 5, name="stage2", choices=choices)
    x = downsample(x, choices, name="stage2_down")
    outputs = classic_head(
        x,
        num_classes,
        pool_size=5,
        hidden=(width(120), width(84)),
        dropout=dropout,
        dropout_before=False,
        choices=choices,
    )
    return keras.Model(inputs, outputs, name="lenet5")


@register_model("alexnet", family="alexnet", min_size=7, default_head="classic", valid_padding=True)
def alexnet(
    input_shape,
    num_classes,
    *,
    dropout,
    width_multiplier,
    small_input,
    choices=DEFAULT_CHOICES,
    input_norm="unit",
):
    """torchvision's AlexNet; `small_input`: a 3x3/1 first conv and no first pool."""
    import keras

    if not small_input:
        require_side(input_shape, ALEXNET_MIN_SIDE, "alexnet")

    def width(filters: int) -> int:
        return scaled_width(filters, width_multiplier)

    inputs, x = image_input(input_shape, input_norm)
    if small_input:
        x = conv_norm_act(x, width(64), 3, name="stem", choices=choices)
    else:
        x = explicit_conv_norm_act(
            x, width(64), 11, strides=4, padding=2, name="stem", choices=choices
        )
        x = overlapping_downsample(x, choices, name="stem_down")
    x = conv_norm_act(x, width(192), 5, name="stage1", choices=choices)
    x = overlapping_downsample(x, choices, name="stage1_down")
    for index, filters in enumerate((384, 256, 256), start=1):
        x = conv_norm_act(x, width(filters), 3, name=f"stage2_{index}", choices=choices)
    x = overlapping_downsample(x, choices, name="stage2_down")
    outputs = classic_head(
        x,
        num_classes,
        pool_size=6,
        hidden=(width(4096), width(4096)),
        dropout=dropout,
        dropout_before=True,
        choices=choices,
    )
    return keras.Model(inputs, outputs, name="alexnet")


def vgg_head(x, num_classes: int, *, dropout, width_multiplier, choices: LayerChoices):
    hidden = scaled_width(4096, width_multiplier)
    return classic_head(
        x,
        num_classes,
        pool_size=7,
        hidden=(hidden, hidden),
        dropout=dropout,
        dropout_before=False,
        choices=choices,
    )


def hand_written_vgg(
    input_shape,
    num_classes,
    *,
    dropout,
    width_multiplier,
    small_input,
    choices,
    name,
    input_norm="unit",
):
    """3x3 conv stages with a downsampling after each (small_input: not after the last)."""
    import keras

    inputs, x = image_input(input_shape, input_norm)
    stages = VGG_CONFIGS[name]
    for stage, widths in enumerate(stages, start=1):
        for index, filters in enumerate(widths, start=1):
            x = conv_norm_act(
                x,
                scaled_width(filters, width_multiplier),
                3,
                name=f"stage{stage}_{index}",
                choices=choices,
            )
        if not (small_input and stage == len(stages)):
            x = downsample(x, choices, name=f"stage{stage}_down")
    outputs = vgg_head(
        x, num_classes, dropout=dropout, width_multiplier=width_multiplier, choices=choices
    )
    return keras.Model(inputs, outputs, name=name)


@register_model("vgg11", family="vgg", default_head="classic", valid_padding=True)
def vgg11(input_shape, num_classes, choices=DEFAULT_CHOICES, **options):
    return hand_written_vgg(input_shape, num_classes, choices=choices, name="vgg11", **options)


@register_model("vgg13", family="vgg", default_head="classic", valid_padding=True)
def vgg13(input_shape, num_classes, choices=DEFAULT_CHOICES, **options):
    return hand_written_vgg(input_shape, num_classes, choices=choices, name="vgg13", **options)


def keras_vgg(
    application,
    input_shape,
    num_classes,
    *,
    dropout,
    width_multiplier,
    small_input,
    name,
    input_norm="unit",
):
    """keras.applications' VGG convolutions (flat, on our input), then the classic head.

    `small_input` ends at `block5_conv*` instead of `block5_pool` (Keras still builds
    that pool, so the minimum side stays its 32). Only the head's hidden units follow
    the width multiplier. Keras's weights load by Keras's layer names
    (`applications.load_application_weights`): they want input_norm "caffe"
    (x - mean, RGB; the first kernel is flipped from Keras's BGR when loaded).
    """
    import keras

    inputs, x = image_input(input_shape, input_norm)
    # input_tensor: Keras builds its layers on our rescaled tensor (no nested model).
    features = application(include_top=False, weights=None, input_tensor=x)
    x = features.output
    if small_input:
        last_conv = [layer for layer in features.layers if layer.name.startswith("block5_conv")]
        x = last_conv[-1].output
    outputs = vgg_head(
        x,
        num_classes,
        dropout=dropout,
        width_multiplier=width_multiplier,
        choices=DEFAULT_CHOICES,
    )
    return keras.Model(inputs, outputs, name=name)


@register_model("vgg16", family="vgg", min_size=32, hand_written=False, pretrained_norm="caffe")
def vgg16(input_shape, num_classes, choices=DEFAULT_CHOICES, **options):
    import keras

    return keras_vgg(keras.applications.VGG16, input_shape, num_classes, name="vgg16", **options)


@register_model("vgg19", family="vgg", min_size=32, hand_written=False, pretrained_norm="caffe")
def vgg19(input_shape, num_classes, choices=DEFAULT_CHOICES, **options):
    import keras

    return keras_vgg(keras.applications.VGG19, input_shape, num_classes, name="vgg19", **options)
