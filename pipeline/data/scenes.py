"""Digit scenes: the offline default segmentation data, generated from scikit-learn's digits.

Each scene is a grayscale canvas with a few digits pasted at random places and
scales, without overlap, on faint noise. Its mask holds the digit's class + 1
on the digit's ink, 0 (background) elsewhere, and `VOID` on the faint rim of
each stroke, where neither answer is right: the default job exercises the
ignore index as CamVid's void does. Everything depends only on the seed.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("background", *(str(d) for d in range(10)))
VOID = 255
INK = 0.5  # glyph intensity (0..1) from which a pixel is the digit's
RIM = 0.15  # fainter than INK but above RIM: void
NUM_GLYPHS = 1797  # scikit-learn's digits (load_digits is slow to import; the count is fixed)
# Scenes per split of the fetch stage's `digit_scenes` source (64x64 each).
SPLIT_SIZES = {"train": 1000, "val": 200, "test": 200}


def digit_scenes(
    num_scenes: int,
    *,
    size: int = 64,
    digits_per_scene: tuple[int, int] = (2, 4),
    scales: tuple[int, ...] = (2, 3),
    seed: int = 0,
    glyph_pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`num_scenes` images and masks, both uint8 (num_scenes, size, size).

    A digit is an 8x8 scikit-learn glyph (from `glyph_pool`, indices into the
    NUM_GLYPHS, default all) enlarged by an integer factor from `scales` (nearest
    neighbour, so the mask follows the pixels exactly).
    """
    from sklearn.datasets import load_digits  # slow import; only this source needs it

    digits = load_digits()
    pool = np.arange(len(digits.target)) if glyph_pool is None else np.asarray(glyph_pool)
    glyphs = digits.images[pool] / 16.0
    labels = digits.target[pool]
    rng = np.random.default_rng(seed)
    images = np.empty((num_scenes, size, size), dtype=np.uint8)
    masks = np.zeros((num_scenes, size, size), dtype=np.uint8)
    for n in range(num_scenes):
        canvas = np.clip(rng.normal(0.08, 0.04, (size, size)), 0, 1)
        taken = np.zeros((size, size), dtype=bool)
        wanted = rng.integers(digits_per_scene[0], digits_per_scene[1] + 1)
        for _ in range(wanted):
            pick = rng.integers(len(glyphs))
            scale = rng.choice(scales)
            glyph = np.kron(glyphs[pick], np.ones((scale, scale)))
            place = _free_place(taken, glyph.shape[0], rng)
            if place is None:
                continue  # the canvas is too full: fewer digits in this scene
            rows, cols = place
            taken[rows, cols] = True
            canvas[rows, cols] = np.maximum(canvas[rows, cols], glyph)
            region = masks[n, rows, cols]
            region[glyph >= INK] = labels[pick] + 1
            region[(glyph > RIM) & (glyph < INK)] = VOID
        images[n] = np.rint(canvas * 255).astype(np.uint8)
    return images, masks


def split_glyph_pools(seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint glyph indices per split, in proportion to SPLIT_SIZES: test scenes show
    handwriting that training never saw."""
    permutation = np.random.default_rng(seed).permutation(NUM_GLYPHS)
    total = sum(SPLIT_SIZES.values())
    pools, start = {}, 0
    for split, count in SPLIT_SIZES.items():
        end = start + round(NUM_GLYPHS * count / total)
        pools[split] = np.sort(permutation[start:end])
        start = end
    return pools


def _free_place(taken: np.ndarray, side: int, rng: np.random.Generator, tries: int = 50):
    """Row and column slices of a free `side` x `side` square, or None after `tries` misses."""
    limit = taken.shape[0] - side + 1
    for _ in range(tries):
        top, left = rng.integers(0, limit, size=2)
        rows, cols = slice(top, top + side), slice(left, left + side)
        if not taken[rows, cols].any():
            return rows, cols
    return None
