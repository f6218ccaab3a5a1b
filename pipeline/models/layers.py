"""Every custom Keras layer of the zoo (serializable, every backend).

Import this module before loading a saved model: it registers the classes
(`load_trained_model` does it). Keras convolutions pad with zeros only
("same"); the seeds' other padding modes are built here from slices so they run
identically on TensorFlow, JAX and torch.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


NP_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad_runs(size: int, before: int, after: int, mode: str) -> list[tuple[int, int, int]]:
    """The padded axis as runs (first index, step, length) of the input's indices.

    The indices are np.pad's own (`np.pad(np.arange(size), ...)`), so every mode matches
    numpy exactly, including pads longer than the side (reflected or wrapped again and
    again). Steps are +1 (a slice), -1 (a flipped slice) or 0 (an edge repeated).
    """
    index = np.pad(np.arange(size), (before, after), mode=NP_MODES[mode]).tolist()
    runs: list[tuple[int, int, int]] = []
    for i in index:
        if runs:
            first, step, length = runs[-1]
            last = first + step * (length - 1)
            if length == 1 and i - last in (-1, 0, 1):
                runs[-1] = (first, i - last, 2)
                continue
            if length > 1 and i - last == step:
                runs[-1] = (first, step, length + 1)
                continue
        runs.append((i, 1, 1))
    return runs


@keras.saving.register_keras_serializable(package="pipeline")
class Pad2D(keras.layers.Layer):
    """Pad H and W of NHWC tensors exactly like `np.pad` modes constant(0)/reflect/edge/wrap.

    Keras pads with zeros only. Pads as wide as the side or wider follow numpy too: a
    1-pixel side repeats (reflect, wrap), longer ones reflect or wrap again and again.
    Built from slices, flips, repeats and concatenations of static-size pieces, so it
    runs the same on every backend; H and W must be known when the layer is built.

    `padding` is ((top, bottom), (left, right)) or one int for all four sides.
    """

    def __init__(self, padding=1, mode: str = "zeros", **kwargs):
        super().__init__(**kwargs)
        if mode not in PADDING_MODES:
            raise ValueError(f"padding mode must be one of {PADDING_MODES}, got {mode!r}")
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        self.padding = tuple(tuple(int(p) for p in side) for side in padding)
        if any(p < 0 for side in self.padding for p in side):
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        self.mode = mode

    def build(self, input_shape):
        if self.mode != "zeros":
            for axis, (before, after) in zip((1, 2), self.padding, strict=True):
                if (before or after) and input_shape[axis] is None:
                    raise ValueError(
                        f"{self.name}: {self.mode} padding needs a known height and width, "
                        f"got input shape {tuple(input_shape)}"
                    )

    def call(self, x):
        for axis, (before, after) in zip((1, 2), self.padding, strict=True):
            if before or after:
                x = self._pad_axis(x, axis, before, after)
        return x

    def _pad_axis(self, x, axis: int, before: int, after: int):
        if self.mode == "zeros":
            parts = [self._zeros(x, axis, before), x, self._zeros(x, axis, after)]
            return ops.concatenate([p for p in parts if p is not None], axis=axis)
        return ops.concatenate(
            [_run(x, axis, *run) for run in pad_runs(x.shape[axis], before, after, self.mode)],
            axis=axis,
        )

    @staticmethod
    def _zeros(x, axis: int, width: int):
        if not width:
            return None
        shape = list(ops.shape(x))
        shape[axis] = width
        return ops.zeros(shape, dtype=x.dtype)

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


def _run(x, axis: int, first: int, step: int, length: int):
    """Indices first, first + step, ... (`length` of them) of `x` along `axis`."""
    index = [slice(None)] * 4
    if step == 0:
        index[axis] = slice(first, first + 1)
        return ops.repeat(x[tuple(index)], length, axis=axis)
    low = first if step > 0 else first - length + 1
    index[axis] = slice(low, low + length)
    piece = x[tuple(index)]
    return piece if step > 0 else ops.flip(piece, axis=axis)


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
class ClassToken(keras.layers.Layer):
    """Prepends one learned token to (batch, tokens, dim) inputs: ViT's class token.

    timm's `cls_token` (global_pool="token"): the head reads the final state of
    this token. Initialized as timm does, normal with a tiny `stddev`.
    """

    def __init__(self, stddev: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.stddev = stddev

    def build(self, input_shape):
        self.token = self.add_weight(
            name="token",
            shape=(1, 1, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=self.stddev),
        )

    def call(self, x):
        token = ops.cast(self.token, x.dtype)
        token = ops.broadcast_to(token, (ops.shape(x)[0], 1, ops.shape(x)[-1]))
        return ops.concatenate([token, x], axis=1)

    def compute_output_shape(self, input_shape):
        n, tokens, dim = input_shape
        return (n, None if tokens is None else tokens + 1, dim)

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
