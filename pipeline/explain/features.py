"""What the layers compute: a layer's feature maps for an image, the first layer's
filters as images, and activation maximization (the input that excites a channel most).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError
from pipeline.explain import gradients, graph

MAXIMIZE_STEPS = 64
MAXIMIZE_STEP = 8.0  # pixels (of 0..255) per step, along the normalised gradient
MAXIMIZE_JITTER = 2  # pixels of random shift each step
MAXIMIZE_BLUR_EVERY = 8  # steps between blurs


def feature_maps(model, images, layer: str | None = None) -> np.ndarray:
    """`layer`'s output (N, h, w, channels) for `images` (default: the last spatial map).
    Any spatial layer: no cut needed, a skip connection may pass it by."""
    import keras

    target = graph.find_layer(model, layer)
    sub = keras.Model(model.inputs[0], target.output, name=f"{model.name}_maps")
    return np.asarray(gradients.predict(sub, np.asarray(images, np.float32)), np.float32)


def first_conv(model):
    """The first 2-D convolution (a kernel of rank 4) after the input and its scaling."""
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and len(kernel.shape) == 4 and "Conv2D" in type(layer).__name__:
            return layer
    raise ConfigError(f"--method filters: {model.name} has no 2-D convolution")


def first_layer_filters(model) -> tuple[np.ndarray, str]:
    """(filters, layer name): the first convolution's kernels as images (K, kh, kw, 3)
    when it reads 3 channels (RGB), else (K, kh, kw) grey (the mean over its inputs);
    each filter scaled to [0, 1] on its own, 0.5 meaning a zero weight."""
    import keras

    layer = first_conv(model)
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float32)  # kh, kw, in, K
    filters = np.moveaxis(kernel, -1, 0)
    if filters.shape[-1] != 3:
        filters = filters.mean(axis=-1)
    reach = np.abs(filters).reshape(len(filters), -1).max(axis=1)
    reach = np.where(reach > 0, reach, 1).reshape(-1, *([1] * (filters.ndim - 1)))
    return 0.5 + 0.5 * filters / reach, layer.name


def maximize(
    model,
    layer: str | None,
    channels,
    *,
    steps: int = MAXIMIZE_STEPS,
    step: float = MAXIMIZE_STEP,
    jitter: int = MAXIMIZE_JITTER,
    blur_every: int = MAXIMIZE_BLUR_EVERY,
    seed: int = 0,
) -> np.ndarray:
    """Activation maximization: for each channel of `layer`, an input (uint8, the
    model's input shape) found by gradient ascent on the channel's mean activation,
    from faint noise around mid-grey. Regularised as Yosinski et al. (2015) and
    Olah et al. (2017): a random shift each step (jitter) and a 3x3 blur every few
    steps keep the image from a high-frequency pattern that only fools the network."""
    import keras

    target = graph.find_layer(model, layer)
    sub = keras.Model(model.inputs[0], target.output, name=f"{model.name}_maps")
    width = int(target.output.shape[-1])
    channels = np.asarray(channels, dtype=np.int64)
    if channels.size == 0 or channels.min() < 0 or channels.max() >= width:
        raise ConfigError(
            f"--layer {target.name}: channels {channels.tolist()} outside 0..{width - 1}"
        )
    onehot = np.eye(width, dtype=np.float32)[channels]

    def score(maps):
        return keras.ops.mean(keras.ops.sum(maps * onehot[:, None, None, :], axis=-1), axis=(1, 2))

    rng = np.random.default_rng(seed)
    shape = (len(channels), *(int(d) for d in model.inputs[0].shape[1:]))
    x = (128 + rng.normal(0, 8, shape)).astype(np.float32)
    for i in range(steps):
        dy, dx = rng.integers(-jitter, jitter + 1, size=2) if jitter else (0, 0)
        shifted = np.roll(x, (dy, dx), axis=(1, 2))
        _, grad = gradients.value_and_gradient(sub, shifted, score)
        grad = np.roll(grad, (-dy, -dx), axis=(1, 2))
        scale = grad.reshape(len(grad), -1).std(axis=1).reshape(-1, 1, 1, 1) + 1e-8
        x = np.clip(x + step * grad / scale, 0, 255)
        if blur_every and (i + 1) % blur_every == 0:
            x = _blur(x)
    return np.rint(x).astype(np.uint8)


def channel_activation(model, layer: str | None, images) -> np.ndarray:
    """Mean activation of each channel of `layer` per image: (N, channels)."""
    return feature_maps(model, images, layer).mean(axis=(1, 2))


def _blur(x: np.ndarray) -> np.ndarray:
    """A 3x3 binomial blur ([1 2 1]/4 each way), edges repeated."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4
    return ((rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4).astype(np.float32)
