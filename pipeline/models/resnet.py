"""ResNet (He et al., 2016) and ResNeXt (Xie et al., 2017), built as torchvision builds them.

Basic blocks (two 3x3 convs) make ResNet-18/34. Bottleneck blocks (1x1 reduce,
3x3, 1x1 expand by 4) make ResNet-50/101/152, with the stride on the 3x3 conv
("ResNet v1.5", torchvision's layout; the paper strides the first 1x1). ResNeXt
is the same bottleneck with a grouped 3x3 conv of
`int(planes * base_width / 64) * groups` channels (32x4d: 128 in the first stage).
A 1x1 conv + norm projects the shortcut wherever the shape changes.

keras.applications.ResNet50/101/152 exist, but they are fixed ImageNet networks
(7x7 stem only, stride on the first 1x1, their own operators, no ResNeXt); the
bottleneck family is written once here for both ResNet and ResNeXt so that they
get the small-input stem, the width multiplier, the seeds' operator choices and
stochastic depth, which keras.applications cannot give.

`small_input` swaps the 7x7/2 stem and max pool for one 3x3/1 conv, the usual
CIFAR-style stem, so 32x32 and smaller images keep their resolution.

Every residual branch's last norm starts at gamma = 1, torchvision's default
(`zero_init_residual=False`), for every depth alike: zero-initialising it (Goyal
et al., 2017; timm's default) helps long large-batch runs, but it would make the
bottleneck nets behave differently from ResNet-18/34 here and from torchvision.
Operator choices: the conv type applies to the stem and the 3x3 convs (1x1 convs
stay standard; ResNeXt's 3x3 convs are always grouped), norm, activation and
padding to all.
"""

from __future__ import annotations

from pipeline.models.blocks import (
    DEFAULT_CHOICES,
    LayerChoices,
    activation,
    centred_max_pool,
    classifier_head,
    conv_norm_act,
    drop_branch,
    image_input,
    resolve_head,
    scaled_width,
    stochastic_depth_rates,
)
from pipeline.models.registration import register_model

# Bottleneck blocks output 4x the channels of their 3x3 conv's `planes`.
EXPANSION = 4
# What the registry refuses rather than ignores (ModelSpec.fixed_choices).
FIXED = (("downsample", "its blocks downsample by strided convs; the stem pool is fixed max"),)


def residual_add(shortcut, branch, *, drop_rate: float, name: str):
    """shortcut + branch, the branch dropped per sample at `drop_rate` (stochastic depth)."""
    from keras import layers

    branch = drop_branch(branch, drop_rate, name=f"{name}_drop_path")
    return layers.Add(name=f"{name}_add")([shortcut, branch])


def basic_block(
    x, filters: int, *, strides: int, name: str, choices: LayerChoices, drop_rate: float = 0.0
):
    """Two 3x3 convs with an identity shortcut (1x1 projection when the shape changes)."""

    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_norm_act(
            x, filters, 1, strides=strides, act=False, name=f"{name}_proj", choices=choices
        )
    x = conv_norm_act(x, filters, 3, strides=strides, name=f"{name}_1", choices=choices)
    x = conv_norm_act(x, filters, 3, act=False, name=f"{name}_2", choices=choices)
    x = residual_add(shortcut, x, drop_rate=drop_rate, name=name)
    return activation(x, choices, name=f"{name}_out")


def bottleneck_width(planes: int, *, groups: int = 1, base_width: int = 64) -> int:
    """Channels of a bottleneck's 3x3 conv as torchvision computes them (at least 1 per group)."""
    return max(1, int(planes * base_width / 64)) * groups


def bottleneck_block(
    x,
    planes: int,
    *,
    strides: int,
    name: str,
    choices: LayerChoices,
    groups: int = 1,
    base_width: int = 64,
    drop_rate: float = 0.0,
):
    """1x1 reduce, 3x3 (strided, grouped for ResNeXt), 1x1 expand to `planes * 4`; shortcut add."""

    width = bottleneck_width(planes, groups=groups, base_width=base_width)
    filters = planes * EXPANSION
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_norm_act(
            x, filters, 1, strides=strides, act=False, name=f"{name}_proj", choices=choices
        )
    x = conv_norm_act(x, width, 1, name=f"{name}_1", choices=choices)
    x = conv_norm_act(
        x,
        width,
        3,
        strides=strides,
        name=f"{name}_2",
        choices=choices,
        groups=groups if groups > 1 else None,
    )
    x = conv_norm_act(x, filters, 1, act=False, name=f"{name}_3", choices=choices)
    x = residual_add(shortcut, x, drop_rate=drop_rate, name=name)
    return activation(x, choices, name=f"{name}_out")


def stem(x, filters: int, *, small_input: bool, choices: LayerChoices):
    """3x3/1 conv for small inputs; else the 7x7/2 conv and 3x3/2 max pool of the paper."""
    if small_input:
        return conv_norm_act(x, filters, 3, name="stem", choices=choices)
    x = conv_norm_act(x, filters, 7, strides=2, name="stem", choices=choices)
    return centred_max_pool(x, 3, strides=2, name="stem_pool")


def resnet(
    input_shape,
    num_classes,
    blocks_per_stage,
    *,
    bottleneck: bool,
    dropout,
    width_multiplier,
    small_input,
    choices,
    name,
    groups: int = 1,
    base_width: int = 64,
    drop_path: float = 0.0,
    input_norm: str = "unit",
):
    """Stem, four stages (64, 128, 256, 512 planes; stride 2 from stage 2 on), pooled head.

    Block k of n drops its residual branch at rate drop_path * k / (n - 1).
    """
    import keras

    inputs, x = image_input(input_shape, input_norm)
    drop_rates = iter(stochastic_depth_rates(drop_path, sum(blocks_per_stage)))
    x = stem(x, scaled_width(64, width_multiplier), small_input=small_input, choices=choices)
    for stage, num_blocks in enumerate(blocks_per_stage):
        planes = scaled_width(64 * 2**stage, width_multiplier)
        for block in range(num_blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            block_name = f"stage{stage + 1}_block{block + 1}"
            if bottleneck:
                x = bottleneck_block(
                    x,
                    planes,
                    strides=strides,
                    name=block_name,
                    choices=choices,
                    groups=groups,
                    base_width=base_width,
                    drop_rate=next(drop_rates),
                )
            else:
                x = basic_block(
                    x,
                    planes,
                    strides=strides,
                    name=block_name,
                    choices=choices,
                    drop_rate=next(drop_rates),
                )
    outputs = classifier_head(x, num_classes, dropout=dropout, head=resolve_head(choices))
    return keras.Model(inputs, outputs, name=name)


def basic_resnet(input_shape, num_classes, blocks_per_stage, **options):
    return resnet(input_shape, num_classes, blocks_per_stage, bottleneck=False, **options)


def bottleneck_resnet(input_shape, num_classes, blocks_per_stage, **options):
    return resnet(input_shape, num_classes, blocks_per_stage, bottleneck=True, **options)


@register_model("resnet18", family="resnet", drop_path=True, fixed_choices=FIXED)
def resnet18(input_shape, num_classes, *, choices=DEFAULT_CHOICES, **options):
    return basic_resnet(
        input_shape, num_classes, (2, 2, 2, 2), name="resnet18", choices=choices, **options
    )


@register_model("resnet34", family="resnet", drop_path=True, fixed_choices=FIXED)
def resnet34(input_shape, num_classes, *, choices=DEFAULT_CHOICES, **options):
    return basic_resnet(
        input_shape, num_classes, (3, 4, 6, 3), name="resnet34", choices=choices, **options
    )


@register_model("resnet50", family="resnet", drop_path=True, fixed_choices=FIXED)
def resnet50(input_shape, num_classes, *, choices=DEFAULT_CHOICES, **options):
    return bottleneck_resnet(
        input_shape, num_classes, (3, 4, 6, 3), name="resnet50", choices=choices, **options
    )


@register_model("resnet101", family="resnet", drop_path=True, fixed_choices=FIXED)
def resnet101(input_shape, num_classes, *, choices=DEFAULT_CHOICES, **options):
    return bottleneck_resnet(
        input_shape, num_classes, (3, 4, 23, 3), name="resnet101", choices=choices, **options
    )


@register_model("resnet152", family="resnet", drop_path=True, fixed_choices=FIXED)
def resnet152(input_shape, num_classes, *, choices=DEFAULT_CHOICES, **options):
    return bottleneck_resnet(
        input_shape, num_classes, (3, 8, 36, 3), name="resnet152", choices=choices, **options
    )


@register_model(
    "resnext50_32x4d", family="resnext", drop_path=True, fixed_choices=FIXED, conv_reach="stem"
)
def resnext50_32x4d(input_shape, num_classes, *, choices=DEFAULT_CHOICES, **options):
    """ResNet-50's layout with 32 groups of 4 channels (doubled per stage) in every 3x3 conv."""
    return bottleneck_resnet(
        input_shape,
        num_classes,
        (3, 4, 6, 3),
        name="resnext50_32x4d",
        choices=choices,
        groups=32,
        base_width=4,
        **options,
    )
