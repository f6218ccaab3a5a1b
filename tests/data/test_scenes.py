"""Digit scenes, the offline segmentation default: masks follow the pasted digits."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from pipeline.data.scenes import CLASSES, INK, VOID, digit_scenes


def test_scenes_are_seeded_and_shaped():
    images, masks = digit_scenes(20, size=48, seed=3)
    again, again_masks = digit_scenes(20, size=48, seed=3)
    other, _ = digit_scenes(20, size=48, seed=4)
    assert images.shape == masks.shape == (20, 48, 48)
    assert images.dtype == masks.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(masks, again_masks)
    assert not np.array_equal(images, other)


def test_mask_marks_each_digit_with_its_class_and_void_on_the_rim():
    images, masks = digit_scenes(200, seed=0)
    values = set(np.unique(masks).tolist())
    assert values <= set(range(len(CLASSES))) | {VOID}
    assert set(range(1, 11)) <= values  # every digit class occurs
    labelled = masks != VOID
    # Ink is bright, background dark: a threshold on the image alone nearly gives the mask.
    ink = masks[labelled] > 0
    assert images[labelled][ink].min() >= 0.5 * 255 - 1
    assert np.mean(images[labelled][~ink] < 0.5 * 255) > 0.999
    void_share = np.mean(masks == VOID)
    assert 0.005 < void_share < 0.2


def test_each_digit_mask_is_the_ink_of_a_real_glyph_of_that_class():
    """Single-digit scenes: the labelled ink, shrunk back by its scale, is the thresholded
    ink of one of scikit-learn's glyphs, and the mask's class is that glyph's digit + 1."""
    digits = load_digits()
    patterns: dict[bytes, set[int]] = {}
    for glyph, label in zip(digits.images / 16.0, digits.target, strict=True):
        patterns.setdefault(_key(_cropped(glyph >= INK)), set()).add(int(label))
    _, masks = digit_scenes(40, digits_per_scene=(1, 1), seed=2)
    for mask in masks:
        (cls,) = set(np.unique(mask).tolist()) - {0, VOID}
        ink = _cropped((mask > 0) & (mask != VOID))
        found = set()
        for scale in (2, 3):
            small = ink[::scale, ::scale]
            if np.array_equal(np.kron(small, np.ones((scale, scale), dtype=bool)), ink):
                found |= patterns.get(_key(small), set())
        assert cls - 1 in found


def _cropped(ink: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(ink)
    return ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _key(pattern: np.ndarray) -> bytes:
    return bytes(pattern.shape) + pattern.tobytes()


def test_fetch_writes_scene_splits_with_masks_classes_and_void(tmp_path):
    from PIL import Image

    from pipeline.config import FetchConfig
    from pipeline.data.scenes import SPLIT_SIZES, split_glyph_pools
    from pipeline.stages import fetch

    info = fetch.run(FetchConfig(source="digit_scenes"), tmp_path / "raw")
    assert info["task"] == "segmentation" and info["ignore_index"] == VOID
    assert info["classes"] == list(CLASSES) and info["splits"] == ["train", "val", "test"]
    raw = tmp_path / "raw"
    assert (raw / "classes.txt").read_text().split() == list(CLASSES)
    for split, count in SPLIT_SIZES.items():
        images = sorted(p.name for p in (raw / split / "images").iterdir())
        masks = sorted(p.name for p in (raw / split / "masks").iterdir())
        assert images == masks and len(images) == count
    mask = np.asarray(Image.open(raw / "test" / "masks" / "0000.png"))
    assert mask.dtype == np.uint8 and VOID in mask and mask.max() == VOID
    again = fetch.run(FetchConfig(source="digit_scenes"), tmp_path / "again")
    assert again["sha256"] == info["sha256"]
    pools = split_glyph_pools()
    assert not set(pools["train"]) & set(pools["test"])
    assert sum(len(p) for p in pools.values()) == 1797
