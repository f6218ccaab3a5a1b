"""Layers every family shares: input scaling, conv-BN-activation, classifier head."""

from __future__ import annotations

# PyTorch's default (its momentum=0.1): moving statistics settle within a few hundred
# steps, where Keras's 0.99 leaves short runs evaluating with near-initial statistics.
BN_MOMENTUM = 0.9


def scaled_width(filters: int, width_multiplier: float, divisor: int = 8) -> int:
    """Channels after the width multiplier, rounded to a multiple of `divisor` (at least one)."""
    return max(divisor, int(filters * width_multiplier + divisor / 2) // divisor * divisor)


def image_input(input_shape: tuple[int, int, int]):
    """Model input taking raw 0..255 pixels, so the saved model carries its own scaling."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    return inputs, x


def conv_bn_act(
    x,
    filters: int,
    kernel_size: int,
    *,
    strides: int = 1,
    name: str,
    activation: str | None = "relu",
):
    """Convolution without bias, batch norm, then the activation (None: no activation)."""
    from keras import layers

    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    if activation:
        x = layers.Activation(activation, name=f"{name}_{activation}")(x)
    return x


def classifier_head(x, num_classes: int, *, dropout: float):
    """Global average pool, dropout, dense; softmax in float32 so mixed precision stays stable."""
    from keras import layers

    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Dense(num_classes, name="head_dense")(x)
    return layers.Activation("softmax", dtype="float32", name="probs")(x)
