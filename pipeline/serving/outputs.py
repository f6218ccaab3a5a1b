"""What a model answers for one image: a classifier's ranked classes, a segmenter's mask at
the image's own size. `predict` writes these; the served model returns them."""

from __future__ import annotations

import numpy as np

TOP = 5


def ranked(prob: np.ndarray, classes: list[str]) -> dict:
    """A classifier's answer for one image: best class, top-5 and every class's probability
    (also what the served model returns)."""
    top = np.argsort(-prob, kind="stable")[:TOP]
    return {
        "class": classes[int(top[0])],
        "probability": float(prob[top[0]]),
        "top5": [classes[int(i)] for i in top],
        "top5_probabilities": [float(prob[i]) for i in top],
        "probabilities": {name: float(p) for name, p in zip(classes, prob, strict=True)},
    }


def mask_at_size(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Per-pixel classes (uint8) of a segmentation output, nearest-neighbour resized to
    `size` = (width, height), the image's own."""
    from PIL import Image

    small = Image.fromarray(prob.argmax(axis=-1).astype(np.uint8))
    return np.asarray(small.resize(size, Image.Resampling.NEAREST))
