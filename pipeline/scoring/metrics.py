"""Classification metrics from predicted probabilities, in numpy only.

The evaluate stage runs these on the model's softmax outputs. They use no
sklearn, TensorFlow or Keras so they run (and are tested) anywhere; the tests
check them against sklearn.

Conventions shared by every function here:
- `probs` is a 2-D array (rows = images, columns = classes);
- `labels` and `preds` are 1-D integer class indices in [0, num_classes);
- ties between equal probabilities go to the lower class index, so the
  top-1 prediction is `probs.argmax(axis=1)` and results are deterministic.
Bad shapes or out-of-range labels raise ValueError: they are programming
errors in the caller, not something a user can fix in params.yaml.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_probs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return `probs` as 2-D float and `labels` as 1-D int64, or raise ValueError."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must be 2-D (images, classes), got shape {probs.shape}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one entry per row of probs ({probs.shape[0]}), "
            f"got shape {labels.shape}"
        )
    if probs.shape[0] == 0:
        raise ValueError("no rows: metrics of an empty test set are undefined")
    return probs, _check_indices(labels, probs.shape[1], "labels")


def _check_indices(values: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """Return `values` as 1-D int64 class indices in [0, num_classes), or raise ValueError."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    is_int = np.issubdtype(values.dtype, np.integer)
    if values.size and not is_int and not np.all(np.equal(np.mod(values, 1), 0)):
        raise ValueError(f"{name} must be integer class indices")
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(
            f"{name} must be in [0, {num_classes}), got values in [{values.min()}, {values.max()}]"
        )
    return values


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest probabilities.

    k above the number of classes is clamped to it (every label is then a hit).
    Ties are broken deterministically by a stable argsort of `-probs`: among
    equal probabilities the lower class index ranks first, so k=1 agrees with
    `probs.argmax(axis=1)`.
    """
    probs, labels = _check_probs(probs, labels)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    hits = (top == labels[:, None]).any(axis=1)
    return float(hits.mean())


def cross_entropy(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean of -log p[label]; p is clipped to [eps, 1] so a zero gives a finite loss."""
    probs, labels = _check_probs(probs, labels)
    picked = probs[np.arange(labels.shape[0]), labels]
    return float(-np.log(np.clip(picked, eps, 1.0)).mean())


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts as int64 (num_classes, num_classes): rows = true class, columns = predicted."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = _check_indices(labels, num_classes, "labels")
    preds = _check_indices(preds, num_classes, "preds")
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in length")
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _safe_divide(num: np.ndarray, den: np.ndarray, undefined: float = 0.0) -> np.ndarray:
    """num / den elementwise, `undefined` where den == 0, without a division warning."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full_like(num, undefined)
    np.divide(num, den, out=out, where=den != 0)
    return out


def per_class_precision_recall(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (precision, recall, f1) from a confusion matrix; 0 where undefined.

    Undefined means a class never predicted (precision), absent from the labels
    (recall), or with precision + recall == 0 (f1). This matches sklearn's
    `zero_division=0` and emits no warnings.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_divide(tp, cm.sum(axis=0))
    recall = _safe_divide(tp, cm.sum(axis=1))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return precision, recall, f1


def classification_report(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> tuple[dict, np.ndarray]:
    """Test metrics as a JSON-ready dict, plus the confusion matrix.

    The dict holds `test_top1`, `test_top5` (k = min(5, classes)), `test_loss`
    (cross-entropy), `test_macro_f1` (unweighted mean over all classes, absent
    ones count as 0), `num_test_images` and `per_class` {name: {precision,
    recall, f1, support}}. Every value is a plain Python float or int, so
    `json.dumps` takes it as is (DVC reads it as a metrics file).
    """
    probs, labels = _check_probs(probs, labels)
    names = [str(n) for n in class_names]
    num_classes = probs.shape[1]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} probability columns")
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique")

    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, num_classes)
    precision, recall, f1 = per_class_precision_recall(cm)
    support = cm.sum(axis=1)
    report = {
        "test_top1": top_k_accuracy(probs, labels, 1),
        "test_top5": top_k_accuracy(probs, labels, min(5, num_classes)),
        "test_loss": cross_entropy(probs, labels),
        "test_macro_f1": float(f1.mean()),
        "num_test_images": int(labels.shape[0]),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
    }
    return report, cm


class PixelConfusion:
    """A confusion matrix of label maps, summed over batches; void pixels are never counted.

    Segmentation scores of a split come from one matrix over all its pixels, not
    from a mean of per-batch or per-image scores, which would weigh a class by
    how often it happens to share a batch.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, labels: np.ndarray, preds: np.ndarray) -> None:
        """Add label maps and predicted maps of the same shape (any number of dimensions)."""
        labels = np.asarray(labels).reshape(-1)
        preds = np.asarray(preds).reshape(-1)
        if labels.shape != preds.shape:
            raise ValueError(f"labels ({labels.size} pixels) and preds ({preds.size}) differ")
        if self.ignore_index is not None:
            keep = labels != self.ignore_index
            labels, preds = labels[keep], preds[keep]
        self.matrix += confusion_matrix(labels, preds, self.num_classes)


def segmentation_report(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """Split-level segmentation scores from a pixel confusion matrix (void already excluded).

    - `test_miou`: mean IoU over the classes that occur in the labels or the
      predictions; a class in neither has no IoU (null) and is left out, a class
      predicted but absent from the labels scores 0.
    - `test_mean_dice`: the same mean of per-class Dice (= F1).
    - `test_pixel_accuracy`: correct pixels / labelled pixels.
    - `test_mean_class_accuracy`: mean recall over the classes present in the labels.
    - `per_class`: {name: {iou, dice, accuracy, pixels}}, null where undefined.
    """
    cm = np.asarray(cm, dtype=np.int64)
    names = [str(n) for n in class_names]
    if cm.ndim != 2 or cm.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(names)} class names")
    total = int(cm.sum())
    if total == 0:
        raise ValueError("no labelled pixels: segmentation metrics are undefined")
    tp = np.diag(cm).astype(np.float64)
    in_labels = cm.sum(axis=1).astype(np.float64)
    in_preds = cm.sum(axis=0).astype(np.float64)
    union = in_labels + in_preds - tp
    iou = _safe_divide(tp, union, np.nan)
    dice = _safe_divide(2 * tp, in_labels + in_preds, np.nan)
    accuracy = _safe_divide(tp, in_labels, np.nan)
    return {
        "test_miou": float(np.nanmean(iou)),
        "test_mean_dice": float(np.nanmean(dice)),
        "test_pixel_accuracy": float(tp.sum() / total),
        "test_mean_class_accuracy": float(np.nanmean(accuracy)),
        "num_test_pixels": total,
        "per_class": {
            name: {
                "iou": _float_or_none(iou[i]),
                "dice": _float_or_none(dice[i]),
                "accuracy": _float_or_none(accuracy[i]),
                "pixels": int(in_labels[i]),
            }
            for i, name in enumerate(names)
        },
    }


def _float_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
