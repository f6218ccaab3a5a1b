"""Segmentation losses that skip void pixels, in Keras ops (every backend).

The model's output is per-pixel class probabilities (a float32 softmax, as for
the classifiers); labels are integer maps whose `ignore_index` pixels (void)
add nothing to the loss or its gradient. Every loss is a mean over the
labelled pixels of the whole batch, so a batch mostly void is not scaled down.
Import this module before loading a model compiled with these losses.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

LOSSES = ("ce", "dice", "focal", "ce_dice")
EPSILON = 1e-7


@keras.saving.register_keras_serializable(package="pipeline")
class SegmentationLoss(keras.losses.Loss):
    """`ce`, `dice`, `focal` or `ce_dice` (the sum), with an ignore index and class weights."""

    def __init__(
        self,
        kind="ce",
        num_classes=2,
        ignore_index=None,
        class_weights=None,
        focal_gamma=2.0,
        name=None,
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        super().__init__(name=name or f"{kind}_loss", reduction=reduction, dtype=dtype)
        self.kind = kind
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.focal_gamma = float(focal_gamma)

    def call(self, y_true, y_pred):
        labels = ops.cast(y_true, "int32")
        if len(labels.shape) == len(y_pred.shape):  # (..., 1) label maps
            labels = ops.squeeze(labels, axis=-1)
        probs = ops.cast(y_pred, "float32")
        valid = ops.ones_like(labels, dtype="float32")
        if self.ignore_index is not None:
            labelled = ops.not_equal(labels, self.ignore_index)
            valid = ops.cast(labelled, "float32")
            labels = ops.where(labelled, labels, 0)
        onehot = ops.one_hot(labels, self.num_classes, dtype="float32")
        loss = 0.0
        if self.kind in ("ce", "focal", "ce_dice"):
            loss = loss + self._cross_entropy(probs, onehot, labels, valid)
        if self.kind in ("dice", "ce_dice"):
            loss = loss + self._dice(probs, onehot, valid)
        return loss

    def _cross_entropy(self, probs, onehot, labels, valid):
        picked = ops.sum(probs * onehot, axis=-1)
        per_pixel = -ops.log(ops.clip(picked, EPSILON, 1.0))
        if self.kind == "focal":
            per_pixel = per_pixel * ops.power(1.0 - picked, self.focal_gamma)
        weight = valid
        if self.class_weights is not None:
            weight = weight * ops.take(ops.convert_to_tensor(self.class_weights), labels)
        # As PyTorch's weighted mean: divide by the weight of the labelled pixels.
        return ops.sum(per_pixel * weight) / ops.maximum(ops.sum(weight), EPSILON)

    def _dice(self, probs, onehot, valid):
        valid = ops.expand_dims(valid, -1)
        axes = tuple(range(len(probs.shape) - 1))
        overlap = ops.sum(probs * onehot * valid, axis=axes)
        sizes = ops.sum(probs * valid, axis=axes) + ops.sum(onehot * valid, axis=axes)
        dice = (2.0 * overlap + 1.0) / (sizes + 1.0)  # +1: absent and unpredicted scores 1
        return 1.0 - ops.mean(dice)

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "class_weights": self.class_weights,
            "focal_gamma": self.focal_gamma,
        }


def median_frequency_weights(
    masks: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> list[float]:
    """Class weights by median frequency balancing (Eigen & Fergus 2015, as in SegNet).

    freq(c) = pixels of c / pixels of the images where c occurs; weight(c) =
    median(freq) / freq(c). A class that never occurs gets weight 0.
    """
    masks = np.asarray(masks)
    class_pixels = np.zeros(num_classes, dtype=np.float64)
    image_pixels = np.zeros(num_classes, dtype=np.float64)
    for mask in masks:
        labelled = mask[mask != ignore_index] if ignore_index is not None else mask.reshape(-1)
        counts = np.bincount(labelled.astype(np.int64), minlength=num_classes)[:num_classes]
        class_pixels += counts
        image_pixels[counts > 0] += labelled.size
    present = class_pixels > 0
    freq = np.zeros(num_classes)
    freq[present] = class_pixels[present] / image_pixels[present]
    weights = np.zeros(num_classes)
    weights[present] = np.median(freq[present]) / freq[present]
    return [float(w) for w in weights]
