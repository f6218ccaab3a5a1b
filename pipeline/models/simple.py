"""SimpleCNN (the seeds'): stacked conv-norm-activation blocks with downsampling, a pooled head."""

from __future__ import annotations

from pipeline.models.blocks import (
    DEFAULT_CHOICES,
    classifier_head,
    conv_norm_act,
    downsample,
    image_input,
    resolve_head,
    scaled_width,
)
from pipeline.models.registration import register_model

STAGE_FILTERS = (32, 64, 128)


@register_model("simple_cnn", family="simple")
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
