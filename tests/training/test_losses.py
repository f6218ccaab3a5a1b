"""Segmentation losses: void pixels count for nothing, and each loss is its formula."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.training.losses import SegmentationLoss, median_frequency_weights

VOID = 11
NUM_CLASSES = 4


def batch(seed: int = 0):
    """Random probabilities and labels (N, H, W) with about a quarter void pixels."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 5, 6, NUM_CLASSES))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, NUM_CLASSES, size=(2, 5, 6))
    labels[rng.random(labels.shape) < 0.25] = VOID
    return probs.astype("float32"), labels


def value(loss, labels, probs) -> float:
    return float(keras.ops.convert_to_numpy(loss(labels, probs)))


def reference_cross_entropy(probs, labels, weights=None, gamma=0.0):
    keep = labels != VOID
    p = probs[keep][np.arange(keep.sum()), labels[keep]]
    per_pixel = -np.log(p) * (1 - p) ** gamma
    w = np.ones_like(p) if weights is None else np.asarray(weights)[labels[keep]]
    return (per_pixel * w).sum() / w.sum()


def test_cross_entropy_is_the_mean_over_labelled_pixels():
    probs, labels = batch()
    loss = SegmentationLoss("ce", NUM_CLASSES, ignore_index=VOID)
    assert value(loss, labels, probs) == pytest.approx(reference_cross_entropy(probs, labels))
    # Channel-last label maps (N, H, W, 1) are the same thing.
    assert value(loss, labels[..., None], probs) == pytest.approx(value(loss, labels, probs))


@pytest.mark.parametrize("kind", ["ce", "dice", "focal", "ce_dice"])
def test_predictions_on_void_pixels_change_nothing(kind):
    probs, labels = batch(1)
    shuffled = probs.copy()
    void = labels == VOID
    shuffled[void] = shuffled[void][:, ::-1]
    loss = SegmentationLoss(kind, NUM_CLASSES, ignore_index=VOID)
    assert value(loss, labels, shuffled) == pytest.approx(value(loss, labels, probs), abs=1e-6)
    assert value(loss, labels, probs) > 0


def test_class_weights_follow_pytorchs_weighted_mean():
    probs, labels = batch(2)
    weights = [0.5, 1.0, 2.0, 4.0]
    loss = SegmentationLoss("ce", NUM_CLASSES, ignore_index=VOID, class_weights=weights)
    expected = reference_cross_entropy(probs, labels, weights)
    assert value(loss, labels, probs) == pytest.approx(expected, rel=1e-5)


def test_focal_down_weights_easy_pixels_and_is_ce_at_gamma_zero():
    probs, labels = batch(3)
    focal = SegmentationLoss("focal", NUM_CLASSES, ignore_index=VOID, focal_gamma=2.0)
    flat = SegmentationLoss("focal", NUM_CLASSES, ignore_index=VOID, focal_gamma=0.0)
    ce = SegmentationLoss("ce", NUM_CLASSES, ignore_index=VOID)
    assert value(flat, labels, probs) == pytest.approx(value(ce, labels, probs))
    expected = reference_cross_entropy(probs, labels, gamma=2.0)
    assert value(focal, labels, probs) == pytest.approx(expected, rel=1e-5)


def test_dice_is_zero_for_a_perfect_prediction_and_matches_its_formula():
    probs, labels = batch(4)
    dice = SegmentationLoss("dice", NUM_CLASSES, ignore_index=VOID)
    perfect = np.eye(NUM_CLASSES, dtype="float32")[np.where(labels == VOID, 0, labels)]
    assert value(dice, labels, perfect) == pytest.approx(0.0, abs=1e-6)

    keep = (labels != VOID)[..., None]
    onehot = np.eye(NUM_CLASSES)[np.where(labels == VOID, 0, labels)]
    overlap = (probs * onehot * keep).sum((0, 1, 2))
    sizes = (probs * keep).sum((0, 1, 2)) + (onehot * keep).sum((0, 1, 2))
    expected = 1 - np.mean((2 * overlap + 1) / (sizes + 1))
    assert value(dice, labels, probs) == pytest.approx(expected, rel=1e-5)
    both = SegmentationLoss("ce_dice", NUM_CLASSES, ignore_index=VOID)
    ce = SegmentationLoss("ce", NUM_CLASSES, ignore_index=VOID)
    total = value(ce, labels, probs) + value(dice, labels, probs)
    assert value(both, labels, probs) == pytest.approx(total, rel=1e-5)


def test_loss_round_trips_through_its_config():
    loss = SegmentationLoss("focal", 5, ignore_index=255, class_weights=[1, 2, 3, 4, 5])
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, SegmentationLoss)
    assert restored.get_config() == loss.get_config()
    with pytest.raises(ValueError, match="loss must be one of"):
        SegmentationLoss("hinge", 5)


def test_median_frequency_weights():
    """Class 0 fills image 1 and 6 pixels of image 2; class 1 has 8 pixels of image 2,
    class 2 one, one more is void; class 3 never occurs."""
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[1, 2:] = 1
    masks[1, 0, 0] = 2
    masks[1, 0, 1] = VOID
    weights = median_frequency_weights(masks, 4, ignore_index=VOID)
    labelled = [16, 15]  # labelled pixels per image
    freq = np.array([(16 + 6) / sum(labelled), 8 / 15, 1 / 15])
    np.testing.assert_allclose(weights[:3], np.median(freq) / freq)
    assert weights[3] == 0.0
