"""Every custom Keras layer of the zoo (serializable, every backend).

Import this module before loading a saved model: it registers the classes
(`load_trained_model` does it). Keras convolutions pad with zeros only
("same"); the seeds' other padding modes are built here from slices so they run
identically on TensorFlow, JAX and torch.
"""

from __future__ import annotations

import keras
from keras import ops

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@keras.saving.register_keras_serializable(package="pipeline")
class Pad2D(keras.layers.Layer):
    """Pad H and W of NHWC tensors like `np.pad` modes constant(0)/reflect/edge/wrap.

    Reflect on a side no longer than the padding (e.g. a 1x1 map) repeats the edge.

    `padding` is ((top, bottom), (left, right)) or one int for all four sides.
    """

    def __init__(self, padding=1, mode: str = "zeros", **kwargs):
        super().__init__(**kwargs)
        if mode not in PADDING_MODES:
            raise ValueError(f"padding mode must be one of {PADDING_MODES}, got {mode!r}")
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        self.padding = tuple(tuple(int(p) for p in side) for side in padding)
        self.mode = mode

    def call(self, x):
        for axis, (before, after) in zip((1, 2), self.padding, strict=True):
            x = self._pad_axis(x, axis, before, after)
        return x

    def _pad_axis(self, x, axis: int, before: int, after: int):
        if not before and not after:
            return x
        size = x.shape[axis]
        mode = self.mode
        if mode == "reflect" and max(before, after) >= size:
            # Undefined (np.pad and torch refuse): deep stages of small inputs reach 1x1 maps,
            # where repeating the edge is the natural reading.
            mode = "replicate"
        if mode == "circular" and max(before, after) > size:
            raise ValueError(f"circular padding {max(before, after)} exceeds the side {size}")

        def take(start, stop):
            index = [slice(None)] * 4
            index[axis] = slice(start, stop)
            return x[tuple(index)]

        parts = []
        if before:
            parts.append(self._edge(take, x, axis, before, mode, leading=True))
        parts.append(x)
        if after:
            parts.append(self._edge(take, x, axis, after, mode, leading=False))
        return ops.concatenate(parts, axis=axis)

    @staticmethod
    def _edge(take, x, axis: int, width: int, mode: str, *, leading: bool):
        if mode == "zeros":
            shape = list(ops.shape(x))
            shape[axis] = width
            return ops.zeros(shape, dtype=x.dtype)
        if mode == "replicate":
            return ops.repeat(take(0, 1) if leading else take(-1, None), width, axis=axis)
        if mode == "circular":
            return take(-width, None) if leading else take(0, width)
        # reflect: mirror without repeating the edge row, like np.pad(mode="reflect")
        return ops.flip(take(1, width + 1) if leading else take(-width - 1, -1), axis=axis)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        (top, bottom), (left, right) = self.padding
        return (
            n,
            None if h is None else h + top + bottom,
            None if w is None else w + left + right,
            c,
        )

    def get_config(self):
        return {**super().get_config(), "padding": self.padding, "mode": self.mode}


@keras.saving.register_keras_serializable(package="pipeline")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learnable embedding to each position of (batch, tokens, dim) inputs (ViT).

    The number of tokens and the width come from the input shape when built.
    """

    def __init__(self, stddev: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.stddev = stddev

    def build(self, input_shape):
        self.embedding = self.add_weight(
            name="embedding",
            shape=(1, *input_shape[1:]),
            initializer=keras.initializers.TruncatedNormal(stddev=self.stddev),
        )

    def call(self, x):
        return x + ops.cast(self.embedding, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "stddev": self.stddev}


@keras.saving.register_keras_serializable(package="pipeline")
class StochasticDepth(keras.layers.Layer):
    """Drop a residual branch for whole samples (Huang et al., 2016; timm's DropPath).

    In training each sample's branch is zeroed with probability `rate` and the
    survivors scaled by 1 / (1 - rate); at inference it is the identity.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}")
        self.rate, self.seed = float(rate), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training or self.rate == 0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        kept = keras.random.uniform(shape, seed=self.seed_generator) < keep
        return x * ops.cast(kept, x.dtype) / ops.cast(keep, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
