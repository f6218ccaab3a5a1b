"""GoogLeNet / Inception v1 (Szegedy et al., 2015), without the auxiliary classifiers.

Layout of torchvision's `googlenet(aux_logits=False)` (batch norm after every
conv, no conv bias), including its 3x3 convolution in the third branch where the
paper's table has a 5x5 (THIRD_BRANCH_KERNEL): 6,624,904 parameters at 224x224,
1000 classes, torchvision's figure. The paper's 5x5 would add 16 * sum(5x5 reduce
* 5x5) = 380,928 (7.01M), which matches neither torchvision nor the paper's own
rounded table total (6.8M), so the zoo follows torchvision.

Stem: conv 64@7x7/2, pool 3/2, conv 64@1x1, conv 192@3x3, pool 3/2; inception
3a, 3b, pool, 4a-4e, pool, 5a, 5b; global average pool, dropout, dense. The
between-stage pools are 3x3/2 as in the paper's table except the last, 2x2/2 as
torchvision's (same output size, no weights, but a 3x3 window would not compute
what imported torchvision weights expect: 1.9e-5 of the logits' scale apart on
random weights, 1.6e-7 with 2x2); they follow the downsample choice. Batch norm
keeps torchvision's epsilon 1e-3 (BN_EPSILON). Convolutions follow the operator
choices (`conv_norm_act`); each module's pool branch is the paper's 3x3/1 max pool.

`small_input`: a 3x3/1 stem conv and neither of the stem's pools, so 32x32 inputs
reach the last modules at 8x8.
"""

from __future__ import annotations

from pipeline.models.blocks import (
    DEFAULT_CHOICES,
    LayerChoices,
    classifier_head,
    conv_norm_act,
    downsample,
    image_input,
    resolve_head,
    scaled_width,
)
from pipeline.models.registration import register_model

# torchvision's kernel for the third branch; the paper's table says 5x5 (module docstring).
THIRD_BRANCH_KERNEL = 3
# torchvision's BasicConv2d: BatchNorm2d(eps=0.001), not PyTorch's default 1e-5
BN_EPSILON = 1e-3
# Paper, table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION_STAGES = {
    3: {"a": (64, 96, 128, 16, 32, 32), "b": (128, 128, 192, 32, 96, 64)},
    4: {
        "a": (192, 96, 208, 16, 48, 64),
        "b": (160, 112, 224, 24, 64, 64),
        "c": (128, 128, 256, 24, 64, 64),
        "d": (112, 144, 288, 32, 64, 64),
        "e": (256, 160, 320, 32, 128, 128),
    },
    5: {"a": (256, 160, 320, 32, 128, 128), "b": (384, 192, 384, 48, 128, 128)},
}


def basic_conv(x, filters: int, kernel_size: int, **options):
    """`conv_norm_act` with torchvision GoogLeNet's batch-norm epsilon (its BasicConv2d)."""
    return conv_norm_act(x, filters, kernel_size, norm_epsilon=BN_EPSILON, **options)


def inception_block(x, widths: tuple[int, ...], *, name: str, choices: LayerChoices):
    """Four branches, concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (paper: 5x5); pool -> 1x1."""
    from keras import layers

    n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_proj = widths
    branch1 = basic_conv(x, n1x1, 1, name=f"{name}_1x1", choices=choices)
    branch2 = basic_conv(x, n3x3_reduce, 1, name=f"{name}_3x3_reduce", choices=choices)
    branch2 = basic_conv(branch2, n3x3, 3, name=f"{name}_3x3", choices=choices)
    branch3 = basic_conv(x, n5x5_reduce, 1, name=f"{name}_branch3_reduce", choices=choices)
    branch3 = basic_conv(
        branch3, n5x5, THIRD_BRANCH_KERNEL, name=f"{name}_branch3", choices=choices
    )
    branch4 = layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    branch4 = basic_conv(branch4, pool_proj, 1, name=f"{name}_pool_proj", choices=choices)
    return layers.Concatenate(name=f"{name}_concat")([branch1, branch2, branch3, branch4])


def stem(x, *, width, small_input: bool, choices: LayerChoices):
    if small_input:
        x = basic_conv(x, width(64), 3, name="stem_1", choices=choices)
    else:
        x = basic_conv(x, width(64), 7, strides=2, name="stem_1", choices=choices)
        x = downsample(x, choices, name="stem_down1", pool_size=3)
    x = basic_conv(x, width(64), 1, name="stem_2", choices=choices)
    x = basic_conv(x, width(192), 3, name="stem_3", choices=choices)
    if not small_input:
        x = downsample(x, choices, name="stem_down2", pool_size=3)
    return x


# torchvision's googlenet weights run with transform_input=True, which turns its
# ImageNet-normalized input into (x - 0.5) / 0.5: the network itself sees [-1, 1] pixels
@register_model("googlenet", family="inception", pretrained_norm="symmetric")
def googlenet(
    input_shape,
    num_classes,
    *,
    dropout,
    width_multiplier,
    small_input,
    choices=DEFAULT_CHOICES,
    input_norm="unit",
):
    """Inception v1; `width_multiplier` scales every branch's channels."""
    import keras

    def width(filters: int) -> int:
        return scaled_width(filters, width_multiplier)

    inputs, x = image_input(input_shape, input_norm)
    x = stem(x, width=width, small_input=small_input, choices=choices)
    for stage, blocks in INCEPTION_STAGES.items():
        for letter, widths in blocks.items():
            x = inception_block(
                x,
                tuple(width(w) for w in widths),
                name=f"stage{stage}_{letter}",
                choices=choices,
            )
        if stage != max(INCEPTION_STAGES):
            x = downsample(x, choices, name=f"stage{stage}_down", pool_size=2 if stage == 4 else 3)
    outputs = classifier_head(x, num_classes, dropout=dropout, head=resolve_head(choices))
    return keras.Model(inputs, outputs, name="googlenet")
