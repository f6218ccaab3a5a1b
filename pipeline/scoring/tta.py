"""Test-time augmentation: a model's outputs averaged over flipped and shifted copies of
each image (`evaluate.tta`, `score --tta`), in numpy on the uint8 images, so any model
that maps a batch to probabilities (Keras on any backend, an exported copy) can use it.

- `flip`: the image and its horizontal mirror (2 views).
- `flip_translate`: those two, each also shifted diagonally by `shift_px` pixels both
  ways with reflected borders (6 views); classifiers only.

A segmentation model's per-pixel probabilities are mapped back (mirrored again) before
they are averaged, so each pixel's views agree on where it is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MODES = ("none", "flip", "flip_translate")


def shift_px(height: int, width: int) -> int:
    """The translation of `flip_translate`: 2 pixels at 32x32 (CIFAR's usual), a sixteenth
    of the shorter side elsewhere, at least 1."""
    return max(1, round(min(height, width) / 16))


def views(images: np.ndarray, mode: str) -> list[np.ndarray]:
    """The copies of a (N, H, W, C) batch that `mode` averages over, the batch first."""
    if mode == "none":
        return [images]
    flipped = images[:, :, ::-1]
    if mode == "flip":
        return [images, flipped]
    if mode != "flip_translate":
        raise ValueError(f"unknown TTA mode {mode!r}; known: {', '.join(MODES)}")
    step = shift_px(*images.shape[1:3])
    return [images, flipped] + [
        translate(batch, dy, dx)
        for batch in (images, flipped)
        for dy, dx in ((step, step), (-step, -step))
    ]


def translate(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The batch moved down `dy` and right `dx` pixels (negative: up, left), the uncovered
    border filled by reflection, the size unchanged."""
    pad_y, pad_x = abs(dy), abs(dx)
    padded = np.pad(images, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect")
    height, width = images.shape[1:3]
    top, left = pad_y - dy, pad_x - dx
    return padded[:, top : top + height, left : left + width]


def average(
    predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, mode: str, *, pixels=False
) -> np.ndarray:
    """The mean over `mode`'s views of `predict(float32 batch)`. With `pixels` (segmentation:
    outputs (N, H, W, classes)), each flipped view's output is mirrored back first."""
    if pixels and mode == "flip_translate":
        raise ValueError("flip_translate is for classifiers")
    total = None
    batches = views(images, mode)
    for i, batch in enumerate(batches):
        out = np.asarray(predict(np.ascontiguousarray(batch, dtype=np.float32)), np.float64)
        if pixels and i % 2:
            out = out[:, :, ::-1]
        total = out if total is None else total + out
    return total / len(batches)
