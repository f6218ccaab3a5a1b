"""SimpleCNN: stacked conv-BN-ReLU blocks with max pooling, a global-pool head."""

from __future__ import annotations

from pipeline.models.blocks import classifier_head, conv_bn_act, image_input, scaled_width
from pipeline.models.registry import register_model

STAGE_FILTERS = (32, 64, 128)


@register_model("simple_cnn")
def simple_cnn(input_shape, num_classes, *, dropout, width_multiplier, small_input):
    """Three stages of two 3x3 convs and a 2x2 max pool; a strided stem for large inputs."""
    import keras
    from keras import layers

    inputs, x = image_input(input_shape)
    if not small_input:
        x = conv_bn_act(x, scaled_width(32, width_multiplier), 5, strides=2, name="stem")
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        width = scaled_width(filters, width_multiplier)
        x = conv_bn_act(x, width, 3, name=f"stage{stage}_1")
        x = conv_bn_act(x, width, 3, name=f"stage{stage}_2")
        x = layers.MaxPooling2D(2, name=f"stage{stage}_pool")(x)
    outputs = classifier_head(x, num_classes, dropout=dropout)
    return keras.Model(inputs, outputs, name="simple_cnn")
