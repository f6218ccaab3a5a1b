"""Two small plain CNNs: the seeds' SimpleCNN as written, and this zoo's own simple_cnn.

* `seeds_simple_cnn`, the seeds' SimpleCNN exactly: three blocks of a 3x3 conv,
  batch norm, ReLU and a 2x2 max pool, of 64, 128 and 256 channels; global average
  pool, dense 128, ReLU, dropout (the seeds' 0.5: `model.dropout`), dense. Its
  convolutions have no bias: batch norm's shift makes one redundant (the seeds'
  `nn.Conv2d` keeps it, 448 parameters more). It has no stem, at any input size.
* `simple_cnn`, the zoo's default and fastest CNN: three stages of two 3x3 convs
  (32, 64, 128 channels) and a downsampling each, global average pool, dropout,
  dense; a strided 5x5 stem for inputs larger than 32x32 (`model.small_input: false`).
"""

from __future__ import annotations

from pipeline.models.blocks import (
    DEFAULT_CHOICES,
    activation,
    classifier_head,
    conv_norm_act,
    downsample,
    image_input,
    probabilities,
    resolve_head,
    scaled_width,
)
from pipeline.models.registration import register_model

STAGE_FILTERS = (32, 64, 128)
SEEDS_FILTERS = (64, 128, 256)
SEEDS_HIDDEN = 128


@register_model("simple_cnn", family="simple", valid_padding=True)
def simple_cnn(
    input_shape,
    num_classes,
    *,
    dropout,
    width_multiplier,
    small_input,
    choices=DEFAULT_CHOICES,
    input_norm="unit",
):
    """Three stages of two 3x3 convs and a 2x downsampling; a strided 5x5 stem for large inputs."""
    import keras

    inputs, x = image_input(input_shape, input_norm)
    if not small_input:
        x = conv_norm_act(
            x, scaled_width(32, width_multiplier), 5, strides=2, name="stem", choices=choices
        )
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        width = scaled_width(filters, width_multiplier)
        x = conv_norm_act(x, width, 3, name=f"stage{stage}_1", choices=choices)
        x = conv_norm_act(x, width, 3, name=f"stage{stage}_2", choices=choices)
        x = downsample(x, choices, name=f"stage{stage}_down")
    outputs = classifier_head(x, num_classes, dropout=dropout, head=resolve_head(choices))
    return keras.Model(inputs, outputs, name="simple_cnn")


@register_model(
    "seeds_simple_cnn",
    family="simple",
    default_head="classic",
    small_input=False,
    valid_padding=True,
)
def seeds_simple_cnn(
    input_shape,
    num_classes,
    *,
    dropout,
    width_multiplier,
    small_input,
    choices=DEFAULT_CHOICES,
    input_norm="unit",
):
    """The seeds' SimpleCNN: three conv-BN-ReLU-maxpool blocks, GAP, dense 128, ReLU,
    dropout, dense. `model.head` other than default replaces the dense 128 stack."""
    import keras
    from keras import layers

    inputs, x = image_input(input_shape, input_norm)
    for block, filters in enumerate(SEEDS_FILTERS, start=1):
        x = conv_norm_act(
            x, scaled_width(filters, width_multiplier), 3, name=f"block{block}", choices=choices
        )
        x = downsample(x, choices, name=f"block{block}_down")
    head = resolve_head(choices, "classic")
    if head != "classic":
        outputs = classifier_head(x, num_classes, dropout=dropout, head=head)
        return keras.Model(inputs, outputs, name="seeds_simple_cnn")
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = layers.Dense(scaled_width(SEEDS_HIDDEN, width_multiplier), name="head_hidden")(x)
    x = activation(x, choices, "head_hidden")
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = probabilities(x, num_classes)
    return keras.Model(inputs, outputs, name="seeds_simple_cnn")
