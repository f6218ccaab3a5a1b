"""ResNet with basic blocks (He et al., 2016); keras.applications has only the bottleneck ones.

`small_input` swaps the 7x7/2 stem and max pool for one 3x3/1 conv, the usual
CIFAR-style stem, so 32x32 and smaller images keep their resolution.
"""

from __future__ import annotations

from pipeline.models.blocks import classifier_head, conv_bn_act, image_input, scaled_width
from pipeline.models.registry import register_model


def basic_block(x, filters: int, *, strides: int, name: str):
    """Two 3x3 convs with an identity shortcut (1x1 projection when the shape changes)."""
    from keras import layers

    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_bn_act(x, filters, 1, strides=strides, activation=None, name=f"{name}_proj")
    x = conv_bn_act(x, filters, 3, strides=strides, name=f"{name}_1")
    x = conv_bn_act(x, filters, 3, activation=None, name=f"{name}_2")
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def stem(x, filters: int, *, small_input: bool):
    from keras import layers

    if small_input:
        return conv_bn_act(x, filters, 3, name="stem")
    x = conv_bn_act(x, filters, 7, strides=2, name="stem")
    return layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)


def basic_resnet(
    input_shape, num_classes, blocks_per_stage, *, dropout, width_multiplier, small_input, name
):
    import keras

    inputs, x = image_input(input_shape)
    x = stem(x, scaled_width(64, width_multiplier), small_input=small_input)
    for stage, num_blocks in enumerate(blocks_per_stage):
        filters = scaled_width(64 * 2**stage, width_multiplier)
        for block in range(num_blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = basic_block(x, filters, strides=strides, name=f"stage{stage + 1}_block{block + 1}")
    outputs = classifier_head(x, num_classes, dropout=dropout)
    return keras.Model(inputs, outputs, name=name)


@register_model("resnet18")
def resnet18(input_shape, num_classes, **options):
    return basic_resnet(input_shape, num_classes, (2, 2, 2, 2), name="resnet18", **options)
