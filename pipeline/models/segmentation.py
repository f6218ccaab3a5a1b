"""Segmentation models: U-Net (the paper's, or on a zoo encoder) and DeepLabV3+ on a zoo encoder.

An encoder is any zoo classifier, built by name and cut at its feature maps:
for each output stride (2, 4, 8, 16, 32) the last layer at exactly that
resolution, that is the map right before the next downsampling (timm's
`features_only`). The decoder reuses those layers in place, so encoder layers
keep their names and a trained classifier's weights load into them by name
(`train.init_from`).

Every model takes raw 0..255 pixels and returns per-pixel float32
probabilities (N, H, W, classes), like the classifiers.

Operator choices (LayerChoices) are the whole model's: the encoder takes them as its
classifier does (the plain U-Net's encoder takes conv, groups, norm, activation,
padding and downsample), and every decoder convolution takes the conv type, groups,
padding, norm and activation, the ASPP's atrous convs (their own dilation, zero
padding) norm and activation. `pipeline.models.from_config.check_model` refuses the
choices a keras.applications encoder cannot take, and model.head.
"""

from __future__ import annotations

from pipeline.config import SEGMENTATION_ARCHS
from pipeline.errors import ConfigError
from pipeline.models.blocks import (
    DEFAULT_CHOICES,
    LayerChoices,
    activation,
    conv_norm_act,
    downsample,
    image_input,
    norm,
    scaled_width,
)

UPSAMPLING = ("transpose", "bilinear")
PLAIN = "plain"  # model.encoder of the paper's U-Net
# Name prefixes of every layer that is not encoder: the "head" that `train.finetune:
# frozen` trains alone (pipeline.training.transfer); encoder layers keep the classifier's names.
DECODER_PREFIXES = ("dec", "aspp_", "seg_head")
# U-Net decoder channels from the deepest level up (segmentation_models' defaults).
DECODER_CHANNELS = (256, 128, 64, 32, 16)


def build_segmentation_model(
    arch: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    encoder: str = PLAIN,
    upsampling: str = "bilinear",
    aspp_rates: tuple[int, ...] = (6, 12, 18),
    width_multiplier: float = 1.0,
    dropout: float = 0.0,
    choices: LayerChoices = DEFAULT_CHOICES,
    drop_path: float = 0.0,
    input_norm: str = "unit",
):
    """`arch` (unet | deeplabv3plus) for images of `input_shape`; see the module docstring.

    `drop_path`: the encoder's stochastic depth (encoders with residual blocks);
    `input_norm`: the encoder's input scaling (`blocks.input_scaling`).
    """
    if arch not in SEGMENTATION_ARCHS:
        raise ConfigError(
            f"model.arch: {arch!r} is not a segmentation model ({SEGMENTATION_ARCHS})"
        )
    if upsampling not in UPSAMPLING:
        raise ConfigError(f"model.upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
    if arch == "unet" and encoder == PLAIN:
        if input_norm != "unit":
            raise ConfigError("model.pretrained: the plain U-Net has no pretrained weights")
        return plain_unet(input_shape, num_classes, upsampling, width_multiplier, dropout, choices)
    if encoder == PLAIN:
        raise ConfigError("model.encoder: deeplabv3plus needs a zoo encoder, e.g. resnet18")
    inputs, taps = encoder_features(
        encoder, input_shape, width_multiplier, choices, drop_path, input_norm
    )
    if arch == "unet":
        return encoder_unet(
            inputs,
            taps,
            input_shape,
            num_classes,
            upsampling,
            width_multiplier,
            dropout,
            encoder,
            choices,
        )
    return deeplabv3plus(
        inputs,
        taps,
        input_shape,
        num_classes,
        aspp_rates,
        width_multiplier,
        dropout,
        encoder,
        choices,
    )


def check_segmentation_buildable(arch: str, encoder: str, input_shape) -> None:
    """Refuse an input side the model cannot halve often enough, before training starts."""
    _check_divisible(input_shape, 16 if encoder == PLAIN else 32, arch)


def encoder_classifier(
    encoder: str,
    input_shape: tuple[int, int, int],
    width_multiplier: float,
    choices: LayerChoices = DEFAULT_CHOICES,
    drop_path: float = 0.0,
    input_norm: str = "unit",
):
    """The zoo classifier `encoder` as a segmentation model lays it out: ImageNet strides
    (small_input false) and its own head; what pretrained weights load into."""
    from dataclasses import replace

    from pipeline.models.architectures import build_model

    return build_model(
        encoder,
        input_shape,
        2,
        width_multiplier=width_multiplier,
        small_input=False,
        choices=replace(choices, head=DEFAULT_CHOICES.head),
        drop_path=drop_path,
        input_norm=input_norm,
    )


def encoder_features(
    encoder: str,
    input_shape: tuple[int, int, int],
    width_multiplier: float,
    choices: LayerChoices = DEFAULT_CHOICES,
    drop_path: float = 0.0,
    input_norm: str = "unit",
):
    """The zoo model `encoder`'s input and {output stride: feature map} for strides 2..32.

    Built with the ImageNet layout (small_input false, so strides reach 32) and its own
    head (cut off here)."""
    classifier = encoder_classifier(
        encoder, input_shape, width_multiplier, choices, drop_path, input_norm
    )
    height, width = input_shape[:2]
    taps = {}
    tokens_after_maps = False  # a ViT: its maps are only the patch embedding
    for layer in classifier.layers:
        shape = getattr(layer.output, "shape", ())
        tokens_after_maps = tokens_after_maps or (bool(taps) and len(shape) == 3)
        if len(shape) != 4:
            continue
        for stride in (2, 4, 8, 16, 32):
            if shape[1] * stride == height and shape[2] * stride == width:
                taps[stride] = layer.output  # the last layer at this resolution wins
    if not taps or tokens_after_maps:
        raise ConfigError(
            f"model.encoder: {encoder} has no convolutional feature maps to decode "
            f"(input {height}x{width}); pick a CNN from `python -m pipeline models`"
        )
    return classifier.input, dict(sorted(taps.items()))


def _check_divisible(input_shape, stride: int, arch: str) -> None:
    height, width = input_shape[:2]
    if height % stride or width % stride:
        raise ConfigError(
            f"prepare.image_size: {arch} needs a side divisible by {stride}, got {height}x{width}"
        )


def _upsample(x, factor: int, filters: int, upsampling: str, name: str, choices: LayerChoices):
    """Enlarge by `factor`: a transposed conv (learned; may leave checkerboard artifacts,
    Odena et al. 2016) then norm and activation, or bilinear interpolation and a 3x3 conv."""
    from keras import layers

    if upsampling == "transpose":
        x = layers.Conv2DTranspose(
            filters,
            factor,
            strides=factor,
            use_bias=choices.norm == "none",
            name=f"{name}_upconv",
        )(x)
        return activation(norm(x, choices, f"{name}_upconv"), choices, f"{name}_upconv")
    x = layers.UpSampling2D(factor, interpolation="bilinear", name=f"{name}_resize")(x)
    return conv_norm_act(x, filters, 3, name=f"{name}_upconv", choices=choices)


def _decoder_block(x, skip, filters: int, upsampling: str, name: str, choices: LayerChoices):
    """Upsample to the skip's resolution, concatenate it, then two 3x3 conv-norm-act."""
    from keras import layers

    factor = skip.shape[1] // x.shape[1] if skip is not None else 2
    x = _upsample(x, factor, filters, upsampling, name, choices)
    if skip is not None:
        x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    x = conv_norm_act(x, filters, 3, name=f"{name}_conv1", choices=choices)
    return conv_norm_act(x, filters, 3, name=f"{name}_conv2", choices=choices)


def _segmentation_head(x, num_classes: int, dropout: float, name: str = "seg_head"):
    """Optional dropout, a 1x1 conv to class scores, float32 softmax per pixel."""
    from keras import layers

    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    x = layers.Conv2D(num_classes, 1, name=f"{name}_conv")(x)
    return layers.Activation("softmax", dtype="float32", name="probs")(x)


def plain_unet(
    input_shape,
    num_classes: int,
    upsampling: str,
    width_multiplier: float,
    dropout: float,
    choices: LayerChoices = DEFAULT_CHOICES,
):
    """Ronneberger et al. (2015): four levels of two 3x3 convs (64..512) and a 2x
    downsampling (max pool by default), a 1024-channel bottom, and a mirrored decoder with
    skip concatenations. Unlike the paper, convs pad so the output has the input's size,
    and a norm (batch by default) follows each conv."""
    import keras

    _check_divisible(input_shape, 16, "unet")
    inputs, x = image_input(input_shape)
    widths = [scaled_width(f, width_multiplier) for f in (64, 128, 256, 512, 1024)]
    skips = []
    for level, filters in enumerate(widths[:-1], start=1):
        x = conv_norm_act(x, filters, 3, name=f"enc{level}_conv1", choices=choices)
        x = conv_norm_act(x, filters, 3, name=f"enc{level}_conv2", choices=choices)
        skips.append(x)
        x = downsample(x, choices, name=f"enc{level}_down")
    x = conv_norm_act(x, widths[-1], 3, name="bottom_conv1", choices=choices)
    x = conv_norm_act(x, widths[-1], 3, name="bottom_conv2", choices=choices)
    for level in range(len(skips), 0, -1):
        x = _decoder_block(
            x, skips[level - 1], widths[level - 1], upsampling, f"dec{level}", choices
        )
    return keras.Model(inputs, _segmentation_head(x, num_classes, dropout), name="unet")


def encoder_unet(
    inputs,
    taps,
    input_shape,
    num_classes,
    upsampling,
    width_multiplier,
    dropout,
    encoder,
    choices: LayerChoices = DEFAULT_CHOICES,
):
    """U-Net decoder over a zoo encoder: from the deepest feature map up through every
    shallower one as a skip, then one more block without skip to full resolution."""
    import keras

    strides = sorted(taps, reverse=True)
    _check_divisible(input_shape, strides[0], "unet")
    x = taps[strides[0]]
    levels = [*strides[1:], None]  # None: the last block up to full resolution
    channels = [scaled_width(c, width_multiplier) for c in DECODER_CHANNELS]
    channels = channels[len(channels) - len(levels) :]
    for depth, (skip_stride, filters) in enumerate(zip(levels, channels, strict=True)):
        skip = taps[skip_stride] if skip_stride else None
        if skip is None and strides[-1] > 2:  # the shallowest map is coarser than 1/2
            x = _upsample(x, strides[-1] // 2, filters, upsampling, f"dec{depth}_pre", choices)
        x = _decoder_block(x, skip, filters, upsampling, f"dec{depth}", choices)
    outputs = _segmentation_head(x, num_classes, dropout)
    return keras.Model(inputs, outputs, name=f"unet_{encoder}")


def deeplabv3plus(
    inputs,
    taps,
    input_shape,
    num_classes,
    aspp_rates,
    width_multiplier,
    dropout,
    encoder,
    choices: LayerChoices = DEFAULT_CHOICES,
):
    """Chen et al. (2018): ASPP (a 1x1 conv, one 3x3 atrous conv per rate, image pooling)
    on the stride-16 features, upsampled x4 and joined with 48 channels of the stride-4
    features, two 3x3 convs, then bilinear upsampling to the input size. Output stride
    16 comes from cutting the encoder there (as Keras' DeepLabV3+ example does), not
    from dilating its last stage."""
    import keras
    from keras import layers

    high_stride = 16 if 16 in taps else max(taps)
    low_stride = 4 if 4 in taps else min(taps)
    _check_divisible(input_shape, high_stride, "deeplabv3plus")
    high, low = taps[high_stride], taps[low_stride]
    filters = scaled_width(256, width_multiplier)

    def unit(x, width: int, kernel_size: int, name: str):
        return conv_norm_act(x, width, kernel_size, name=name, choices=choices)

    branches = [unit(high, filters, 1, "aspp_1x1")]
    for rate in aspp_rates:
        branches.append(_atrous_conv(high, filters, rate, f"aspp_rate{rate}", choices))
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(high)
    pooled = unit(pooled, filters, 1, "aspp_pool_conv")
    pooled = layers.UpSampling2D(tuple(high.shape[1:3]), name="aspp_pool_resize")(pooled)
    x = layers.Concatenate(name="aspp_concat")([*branches, pooled])
    x = unit(x, filters, 1, "aspp_project")
    if dropout > 0:
        x = layers.Dropout(dropout, name="aspp_dropout")(x)

    factor = high_stride // low_stride
    x = layers.UpSampling2D(factor, interpolation="bilinear", name="decoder_resize")(x)
    low = unit(low, scaled_width(48, width_multiplier), 1, "decoder_low")
    x = layers.Concatenate(name="decoder_concat")([x, low])
    x = unit(x, filters, 3, "decoder_conv1")
    x = unit(x, filters, 3, "decoder_conv2")
    if low_stride > 1:
        x = layers.UpSampling2D(low_stride, interpolation="bilinear", name="output_resize")(x)
    outputs = _segmentation_head(x, num_classes, 0.0)
    return keras.Model(inputs, outputs, name=f"deeplabv3plus_{encoder}")


def _atrous_conv(x, filters: int, rate: int, name: str, choices: LayerChoices):
    """A 3x3 conv dilated by `rate` (zero padding, standard), then the chosen norm and
    activation."""
    from keras import layers

    x = layers.Conv2D(
        filters,
        3,
        padding="same",
        dilation_rate=rate,
        use_bias=choices.norm == "none",
        name=f"{name}_conv",
    )(x)
    return activation(norm(x, choices, name), choices, name)
