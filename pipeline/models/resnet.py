"""ResNet with basic blocks (He et al., 2016).

`small_input` swaps the 7x7/2 stem and max pool for one 3x3/1 conv, the usual
CIFAR-style stem, so 32x32 and smaller images keep their resolution.
"""

from __future__ import annotations

from pipeline.models.blocks import (
    DEFAULT_CHOICES,
    LayerChoices,
    activation,
    classifier_head,
    conv_norm_act,
    image_input,
    resolve_head,
    scaled_width,
)
from pipeline.models.registry import register_model


def basic_block(x, filters: int, *, strides: int, name: str, choices: LayerChoices):
    """Two 3x3 convs with an identity shortcut (1x1 projection when the shape changes)."""
    from keras import layers

    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_norm_act(
            x, filters, 1, strides=strides, act=False, name=f"{name}_proj", choices=choices
        )
    x = conv_norm_act(x, filters, 3, strides=strides, name=f"{name}_1", choices=choices)
    x = conv_norm_act(x, filters, 3, act=False, name=f"{name}_2", choices=choices)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return activation(x, choices, name=f"{name}_out")


def stem(x, filters: int, *, small_input: bool, choices: LayerChoices):
    """3x3/1 conv for small inputs; else the 7x7/2 conv and 3x3/2 max pool of the paper."""
    from keras import layers

    if small_input:
        return conv_norm_act(x, filters, 3, name="stem", choices=choices)
    x = conv_norm_act(x, filters, 7, strides=2, name="stem", choices=choices)
    return layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)


def basic_resnet(
    input_shape,
    num_classes,
    blocks_per_stage,
    *,
    dropout,
    width_multiplier,
    small_input,
    choices,
    name,
):
    import keras

    inputs, x = image_input(input_shape)
    x = stem(x, scaled_width(64, width_multiplier), small_input=small_input, choices=choices)
    for stage, num_blocks in enumerate(blocks_per_stage):
        filters = scaled_width(64 * 2**stage, width_multiplier)
        for block in range(num_blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = basic_block(
                x,
                filters,
                strides=strides,
                choices=choices,
                name=f"stage{stage + 1}_block{block + 1}",
            )
    outputs = classifier_head(x, num_classes, dropout=dropout, head=resolve_head(choices))
    return keras.Model(inputs, outputs, name=name)


@register_model("resnet18", family="resnet")
def resnet18(input_shape, num_classes, choices=DEFAULT_CHOICES, **options):
    return basic_resnet(
        input_shape, num_classes, (2, 2, 2, 2), name="resnet18", choices=choices, **options
    )
