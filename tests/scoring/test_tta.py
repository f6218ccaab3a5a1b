"""Test-time augmentation (`scoring.tta`): the views are the mirrored and shifted images,
the average is over them, and a segmentation model's flipped outputs are mirrored back."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import EvaluateConfig, check_evaluate
from pipeline.errors import ConfigError
from pipeline.scoring import tta


def ramp(n: int = 2, side: int = 8, channels: int = 1) -> np.ndarray:
    """Images whose every pixel is distinct, so a shift or a flip is visible."""
    values = np.arange(n * side * side * channels, dtype=np.uint8)
    return values.reshape(n, side, side, channels)


def test_translate_moves_pixels_and_reflects_the_border():
    images = ramp()
    moved = tta.translate(images, 1, 2)
    assert moved.shape == images.shape
    np.testing.assert_array_equal(moved[:, 1:, 2:], images[:, :-1, :-2])
    # the uncovered top row is the reflection of the row below the edge
    np.testing.assert_array_equal(moved[:, 0, 2:], images[:, 1, :-2])
    back = tta.translate(images, -1, -2)
    np.testing.assert_array_equal(back[:, :-1, :-2], images[:, 1:, 2:])


def test_views_are_the_image_its_mirror_and_their_diagonal_shifts():
    images = ramp(side=32)
    assert len(tta.views(images, "none")) == 1
    flip = tta.views(images, "flip")
    assert len(flip) == 2
    np.testing.assert_array_equal(flip[1], images[:, :, ::-1])
    six = tta.views(images, "flip_translate")
    assert len(six) == 6
    assert tta.shift_px(32, 32) == 2
    np.testing.assert_array_equal(six[2][:, 2:, 2:], images[:, :-2, :-2])
    np.testing.assert_array_equal(six[4][:, 2:, 2:], images[:, :, ::-1][:, :-2, :-2])


def test_average_is_the_mean_over_views():
    images = ramp(n=3)

    def left_half(batch):  # a "classifier" that looks at the left half only
        left = batch[:, :, : batch.shape[2] // 2].mean(axis=(1, 2, 3))
        return np.stack([left, -left], axis=1)

    plain = tta.average(left_half, images, "none")
    flipped = left_half(images[:, :, ::-1].astype(np.float32))
    np.testing.assert_allclose(tta.average(left_half, images, "flip"), (plain + flipped) / 2)


def test_segmentation_outputs_are_mirrored_back_before_averaging():
    images = ramp(n=2, side=6)

    def per_pixel(batch):  # each pixel's "probabilities" are its own value: position-bound
        return np.repeat(batch, 2, axis=-1)

    plain = tta.average(per_pixel, images, "none", pixels=True)
    np.testing.assert_allclose(tta.average(per_pixel, images, "flip", pixels=True), plain)
    with pytest.raises(ValueError, match="classifiers"):
        tta.average(per_pixel, images, "flip_translate", pixels=True)


def test_evaluate_tta_is_checked_against_the_task():
    check_evaluate("classification", EvaluateConfig(tta="flip_translate"))
    check_evaluate("segmentation", EvaluateConfig(tta="flip"))
    with pytest.raises(ConfigError, match="evaluate.tta: flip_translate is for classifiers"):
        check_evaluate("segmentation", EvaluateConfig(tta="flip_translate"))
