"""ShuffleNet v2 (Ma et al., 2018), built as torchvision's `shufflenet_v2_x*`.

Stem conv 24@3x3/2 and 3x3/2 max pool, three stages of 4/8/4 units, a 1x1 conv
to 1024 channels (2048 at 2x), global pooling, dropout, dense. A unit splits its
channels in two, passes one half through (1x1 conv-norm-act, 3x3 depthwise
conv-norm, 1x1 conv-norm-act), concatenates it with the untouched half and
shuffles the channels (2 groups); each stage's first unit halves the resolution
and feeds the whole input to two branches instead of splitting.

The split and the shuffle are built from Keras's own Reshape, Permute and
Cropping3D layers rather than a custom Layer: a saved model then loads in safe
mode anywhere (the evaluate stage, an MLflow pyfunc server) without importing
this package first. Shuffle: view the C channels as (2, C/2), transpose to
(C/2, 2), flatten; split: view as (2, C/2), crop one of the two groups.

Width: torchvision's channel tables for 0.5x, 1.0x, 1.5x and 2.0x (the paper's);
other multipliers scale the three stage widths with `scaled_width` and keep the
stem at 24 and the last conv at 1024 (2048 above 1.5x), the tables' own rule.
`small_input` makes the stem 3x3/1 without the max pool.

Operator choices: the conv type applies to the stem only (the 1x1 convs stay
standard and the 3x3 convs are depthwise by design); norm, activation and
padding apply everywhere, the padding mode to the depthwise convs too.
"""

from __future__ import annotations

from pipeline.models.blocks import (
    DEFAULT_CHOICES,
    LayerChoices,
    centred_max_pool,
    classifier_head,
    conv_norm_act,
    image_input,
    kernel,
    norm,
    pad,
    resolve_head,
    scaled_width,
)
from pipeline.models.registration import register_model

STAGE_REPEATS = (4, 8, 4)
# torchvision's `stages_out_channels`: stem, three stages, last 1x1 conv.
CHANNEL_TABLE = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
SHUFFLE_GROUPS = 2


def channels(width_multiplier: float) -> tuple[int, int, int, int, int]:
    """(stem, stage 1, stage 2, stage 3, last conv) channels for a width multiplier."""
    if float(width_multiplier) in CHANNEL_TABLE:
        return CHANNEL_TABLE[float(width_multiplier)]
    stages = tuple(scaled_width(c, width_multiplier) for c in CHANNEL_TABLE[1.0][1:4])
    return (24, *stages, 2048 if width_multiplier > 1.5 else 1024)


def _grouped(x, name: str):
    """View NHWC channels as (groups, C / groups): a 5-D (N, H, W, groups, C / groups)."""
    from keras import layers

    h, w, c = x.shape[1:]
    return layers.Reshape((h, w, SHUFFLE_GROUPS, c // SHUFFLE_GROUPS), name=name)(x)


def channel_split(x, name: str):
    """The first and second halves of the channels (torch's `x.chunk(2, dim=1)`)."""
    from keras import layers

    h, w, c = x.shape[1:]
    grouped = _grouped(x, f"{name}_groups")
    halves = []
    for side, cropping in (("left", (0, 1)), ("right", (1, 0))):
        half = layers.Cropping3D(
            ((0, 0), (0, 0), cropping), data_format="channels_last", name=f"{name}_{side}_crop"
        )(grouped)
        halves.append(layers.Reshape((h, w, c // 2), name=f"{name}_{side}")(half))
    return halves


def channel_shuffle(x, name: str):
    """Interleave the channel groups: (groups, C / groups) -> (C / groups, groups) -> C."""
    from keras import layers

    h, w, c = x.shape[1:]
    x = _grouped(x, f"{name}_groups")
    x = layers.Permute((1, 2, 4, 3), name=f"{name}_transpose")(x)
    return layers.Reshape((h, w, c), name=f"{name}_merge")(x)


def depthwise_norm(x, *, strides: int, name: str, choices: LayerChoices):
    """3x3 depthwise conv (model.kernel_size; padding mode of the choices) and norm, no
    activation.

    Strided, it pads (k - 1) / 2 on every side as PyTorch does (`blocks.conv`).
    """
    from keras import layers

    size = kernel(3, choices)
    padding = "same"
    if choices.padding != "zeros" or strides > 1:
        x = pad(x, (size - 1) // 2, choices, name)
        padding = "valid"
    x = layers.DepthwiseConv2D(
        size,
        strides=strides,
        padding=padding,
        use_bias=choices.norm == "none",
        name=f"{name}_dwconv",
    )(x)
    return norm(x, choices, name)


def shuffle_unit(x, filters: int, *, strides: int, name: str, choices: LayerChoices):
    """One ShuffleNet v2 unit (torchvision's InvertedResidual) with `filters` output channels."""
    from keras import layers

    branch = filters // 2
    if strides == 1:
        if x.shape[-1] != filters:
            raise ValueError(f"{name}: a stride-1 unit keeps its {x.shape[-1]} channels")
        left, right = channel_split(x, f"{name}_split")
    else:
        left = depthwise_norm(x, strides=strides, name=f"{name}_branch1_dw", choices=choices)
        left = conv_norm_act(left, branch, 1, name=f"{name}_branch1_1x1", choices=choices)
        right = x
    right = conv_norm_act(right, branch, 1, name=f"{name}_branch2_1x1a", choices=choices)
    right = depthwise_norm(right, strides=strides, name=f"{name}_branch2_dw", choices=choices)
    right = conv_norm_act(right, branch, 1, name=f"{name}_branch2_1x1b", choices=choices)
    x = layers.Concatenate(name=f"{name}_concat")([left, right])
    return channel_shuffle(x, f"{name}_shuffle")


@register_model(
    "shufflenet_v2",
    family="shufflenet",
    fixed_choices=(("downsample", "its units downsample by strided convs; the stem pool is max"),),
    conv_reach="stem",
)
def shufflenet_v2(
    input_shape,
    num_classes,
    *,
    dropout,
    width_multiplier,
    small_input,
    choices=DEFAULT_CHOICES,
    input_norm="unit",
):
    """ShuffleNet v2 at `width_multiplier` (1.0: torchvision's shufflenet_v2_x1_0, 2.28M params)."""
    import keras

    stem_filters, *stage_filters, last_filters = channels(width_multiplier)
    inputs, x = image_input(input_shape, input_norm)
    if small_input:
        x = conv_norm_act(x, stem_filters, 3, name="stem", choices=choices)
    else:
        x = conv_norm_act(x, stem_filters, 3, strides=2, name="stem", choices=choices)
        x = centred_max_pool(x, 3, strides=2, name="stem_pool")
    for stage, (repeats, filters) in enumerate(zip(STAGE_REPEATS, stage_filters, strict=True)):
        for unit in range(repeats):
            x = shuffle_unit(
                x,
                filters,
                strides=2 if unit == 0 else 1,
                name=f"stage{stage + 1}_unit{unit + 1}",
                choices=choices,
            )
    x = conv_norm_act(x, last_filters, 1, name="head_conv5", choices=choices)
    outputs = classifier_head(x, num_classes, dropout=dropout, head=resolve_head(choices))
    return keras.Model(inputs, outputs, name="shufflenet_v2")
