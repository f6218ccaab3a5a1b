"""pipeline.scoring.metrics against sklearn, computed independently on random data."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.scoring import metrics


def _random_probs(seed: int, n: int = 200, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of random logits and random labels (every class appears for n >> classes)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 2.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = rng.integers(0, classes, size=n)
    return probs, labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_matches_sklearn(seed: int, k: int) -> None:
    probs, labels = _random_probs(seed)
    expected = skm.top_k_accuracy_score(labels, probs, k=k, labels=np.arange(10))
    assert metrics.top_k_accuracy(probs, labels, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top1_is_argmax_accuracy(seed: int) -> None:
    probs, labels = _random_probs(seed)
    expected = skm.accuracy_score(labels, probs.argmax(axis=1))
    assert metrics.top_k_accuracy(probs, labels, 1) == pytest.approx(expected, abs=1e-12)


def test_top_k_clamps_k_to_num_classes() -> None:
    probs, labels = _random_probs(0, classes=3)
    assert metrics.top_k_accuracy(probs, labels, 5) == 1.0
    assert metrics.top_k_accuracy(probs, labels, 3) == 1.0


def test_top_k_ties_go_to_lower_index() -> None:
    probs = np.full((2, 4), 0.25)
    assert metrics.top_k_accuracy(probs, np.array([0, 1]), 1) == 0.5
    assert metrics.top_k_accuracy(probs, np.array([1, 1]), 2) == 1.0
    assert metrics.top_k_accuracy(probs, np.array([2, 3]), 2) == 0.0


@pytest.mark.parametrize("bad_k", [0, -1])
def test_top_k_rejects_nonpositive_k(bad_k: int) -> None:
    probs, labels = _random_probs(0)
    with pytest.raises(ValueError, match="k must be"):
        metrics.top_k_accuracy(probs, labels, bad_k)


def test_rejects_out_of_range_labels_and_bad_shapes() -> None:
    probs, labels = _random_probs(0)
    with pytest.raises(ValueError, match="labels must be in"):
        metrics.top_k_accuracy(probs, np.full_like(labels, 10), 1)
    with pytest.raises(ValueError, match="one entry per row"):
        metrics.cross_entropy(probs, labels[:-1])
    with pytest.raises(ValueError, match="2-D"):
        metrics.cross_entropy(probs[0], labels[:1])
    with pytest.raises(ValueError, match="empty"):
        metrics.cross_entropy(probs[:0], labels[:0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_entropy_matches_log_loss(seed: int) -> None:
    probs, labels = _random_probs(seed)
    expected = skm.log_loss(labels, probs, labels=np.arange(10))
    assert metrics.cross_entropy(probs, labels) == pytest.approx(expected, rel=1e-9)


def test_cross_entropy_clips_zero_probability() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    loss = metrics.cross_entropy(probs, np.array([1, 0]), eps=1e-7)
    assert np.isfinite(loss)
    assert loss == pytest.approx((-np.log(1e-7) - np.log(0.5)) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_sklearn(seed: int) -> None:
    probs, labels = _random_probs(seed)
    preds = probs.argmax(axis=1)
    cm = metrics.confusion_matrix(labels, preds, 10)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, skm.confusion_matrix(labels, preds, labels=np.arange(10)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_match_sklearn(seed: int) -> None:
    probs, labels = _random_probs(seed)
    preds = probs.argmax(axis=1)
    cm = metrics.confusion_matrix(labels, preds, 10)
    precision, recall, f1 = metrics.per_class_precision_recall(cm)
    p, r, f, support = skm.precision_recall_fscore_support(
        labels, preds, labels=np.arange(10), zero_division=0
    )
    np.testing.assert_allclose(precision, p, atol=1e-12)
    np.testing.assert_allclose(recall, r, atol=1e-12)
    np.testing.assert_allclose(f1, f, atol=1e-12)
    np.testing.assert_array_equal(cm.sum(axis=1), support)


def test_never_predicted_or_absent_class_is_zero_without_warnings() -> None:
    labels = np.array([0, 0, 1, 1, 2])  # class 3 never occurs
    preds = np.array([0, 1, 1, 0, 0])  # classes 2 and 3 never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm = metrics.confusion_matrix(labels, preds, 4)
        precision, recall, f1 = metrics.per_class_precision_recall(cm)
        report, _ = metrics.classification_report(np.eye(4)[preds], labels, ["a", "b", "c", "d"])
    assert precision[2] == 0.0 and precision[3] == 0.0
    assert recall[3] == 0.0 and f1[2] == 0.0 and f1[3] == 0.0
    assert report["per_class"]["c"]["precision"] == 0.0
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels, preds, labels=np.arange(4), zero_division=0
    )
    np.testing.assert_allclose(precision, p)
    np.testing.assert_allclose(recall, r)
    np.testing.assert_allclose(f1, f)


def test_classification_report_is_json_ready_and_consistent() -> None:
    probs, labels = _random_probs(7)
    names = [f"class_{i}" for i in range(10)]
    report, cm = metrics.classification_report(probs, labels, names)

    decoded = json.loads(json.dumps(report))
    assert decoded == report
    assert set(report) == {
        "test_top1",
        "test_top5",
        "test_loss",
        "test_macro_f1",
        "num_test_images",
        "per_class",
    }
    assert list(report["per_class"]) == names
    for entry in report["per_class"].values():
        assert set(entry) == {"precision", "recall", "f1", "support"}
        assert type(entry["support"]) is int
        assert all(type(entry[k]) is float for k in ("precision", "recall", "f1"))
    assert type(report["num_test_images"]) is int and report["num_test_images"] == 200

    preds = probs.argmax(axis=1)
    assert report["test_top1"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert report["test_top5"] == pytest.approx(
        skm.top_k_accuracy_score(labels, probs, k=5, labels=np.arange(10))
    )
    assert report["test_loss"] == pytest.approx(skm.log_loss(labels, probs, labels=np.arange(10)))
    assert report["test_macro_f1"] == pytest.approx(
        skm.f1_score(labels, preds, average="macro", labels=np.arange(10), zero_division=0)
    )
    np.testing.assert_array_equal(cm, skm.confusion_matrix(labels, preds, labels=np.arange(10)))
    assert sum(e["support"] for e in report["per_class"].values()) == 200


def test_classification_report_top5_with_fewer_classes() -> None:
    probs, labels = _random_probs(3, classes=3)
    report, cm = metrics.classification_report(probs, labels, ["x", "y", "z"])
    assert report["test_top5"] == 1.0
    assert cm.shape == (3, 3)


def test_classification_report_rejects_mismatched_names() -> None:
    probs, labels = _random_probs(0)
    with pytest.raises(ValueError, match="class names"):
        metrics.classification_report(probs, labels, ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        metrics.classification_report(probs, labels, ["a"] * 10)


def random_label_maps(seed: int, num_classes: int, void: int, absent: int):
    """Label and prediction maps with void pixels; class `absent` never occurs in the labels
    (but is predicted), and class num_classes - 1 occurs in neither."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes - 1, size=(6, 20, 30))
    labels[labels == absent] = 0
    labels[rng.random(labels.shape) < 0.2] = void
    noise = rng.integers(0, num_classes - 1, size=labels.shape)
    preds = np.where(rng.random(labels.shape) < 0.6, labels, noise)
    preds[preds == void] = 0
    return labels, preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmentation_scores_match_sklearn_with_void_and_absent_classes(seed: int) -> None:
    num_classes, void, absent = 6, 255, 2
    labels, preds = random_label_maps(seed, num_classes, void, absent)
    confusion = metrics.PixelConfusion(num_classes, ignore_index=void)
    for i in range(len(labels)):  # image by image, as evaluate streams batches
        confusion.update(labels[i], preds[i])
    keep = labels.reshape(-1) != void
    y, p = labels.reshape(-1)[keep], preds.reshape(-1)[keep]
    classes = list(range(num_classes))
    np.testing.assert_array_equal(confusion.matrix, skm.confusion_matrix(y, p, labels=classes))

    names = [f"c{i}" for i in classes]
    report = metrics.segmentation_report(confusion.matrix, names)
    occurring = np.isin(classes, np.union1d(y, p))  # IoU and Dice are defined for these
    labelled = np.isin(classes, y)  # recall is defined for these
    iou = skm.jaccard_score(y, p, labels=classes, average=None, zero_division=0)
    dice = skm.f1_score(y, p, labels=classes, average=None, zero_division=0)
    recall = skm.recall_score(y, p, labels=classes, average=None, zero_division=0)
    assert report["test_miou"] == pytest.approx(iou[occurring].mean())
    assert report["test_mean_dice"] == pytest.approx(dice[occurring].mean())
    assert report["test_pixel_accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert report["test_mean_class_accuracy"] == pytest.approx(recall[labelled].mean())
    assert report["num_test_pixels"] == keep.sum()
    # Predicted but absent from the labels: IoU 0, counted in the mean.
    assert report["per_class"]["c2"] == {"iou": 0.0, "dice": 0.0, "accuracy": None, "pixels": 0}
    # In neither labels nor predictions: undefined, left out of the means.
    assert report["per_class"]["c5"]["iou"] is None
    assert list(occurring) == [True] * 5 + [False] and not labelled[2]
    json.dumps(report, allow_nan=False)


def test_void_pixels_change_no_score() -> None:
    labels, preds = random_label_maps(0, 6, 255, 2)
    with_void = metrics.PixelConfusion(6, ignore_index=255)
    with_void.update(labels, preds)
    wrong_on_void = np.where(labels == 255, (preds + 1) % 6, preds)
    changed = metrics.PixelConfusion(6, ignore_index=255)
    changed.update(labels, wrong_on_void)
    np.testing.assert_array_equal(with_void.matrix, changed.matrix)
    with pytest.raises(ValueError, match="labels"):
        metrics.PixelConfusion(6).update(labels, preds)  # 255 is out of range without ignore


def test_split_scores_are_not_a_mean_of_batch_scores() -> None:
    """Class 1 is a few pixels in one image: per-image mIoU would weigh it as much as class 0."""
    labels = np.zeros((2, 10, 10), dtype=int)
    labels[0, :2, :2] = 1
    preds = np.zeros_like(labels)
    confusion = metrics.PixelConfusion(2)
    confusion.update(labels, preds)
    report = metrics.segmentation_report(confusion.matrix, ["bg", "thing"])
    assert report["per_class"]["thing"]["iou"] == 0.0
    assert report["per_class"]["bg"]["iou"] == pytest.approx(196 / 200)
    assert report["test_miou"] == pytest.approx((196 / 200 + 0) / 2)
