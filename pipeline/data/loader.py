"""Batches for Keras `fit` on any backend, read from the prepared `.npy` arrays.

A `keras.utils.PyDataset` needs no TensorFlow, so the same loader feeds the
TensorFlow, JAX and torch backends. Images stay uint8 until a batch is cut
(the model scales them itself); the shuffle order of epoch `e` is a pure
function of (seed, e), so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np

from pipeline.artifacts import damaged, read_array
from pipeline.data.data_card import read_card
from pipeline.layout import images_file, labels_file


def load_split(prepared_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped images (N, H, W, C) uint8 and labels (N,) int32 (masks: (N, H, W)
    uint8) of one split, checked against each other and against the data card: a damaged or
    mismatched file is a DataError naming it."""
    card = read_card(prepared_dir)
    segmentation = card.get("task") == "segmentation"
    images_path, labels_path = images_file(prepared_dir, split), labels_file(prepared_dir, split)
    images = read_array(images_path, kind="u", ndim=4, mmap=True)
    labels = read_array(
        labels_path, kind="u" if segmentation else "i", ndim=3 if segmentation else 1
    )
    expected = card["totals"].get(split)
    if len(images) != expected:
        raise damaged(images_path, f"holds {len(images)} images, the data card {expected}")
    if len(labels) != len(images):
        raise damaged(labels_path, f"holds {len(labels)} labels for {len(images)} images")
    if list(images.shape[1:]) != card["image_shape"]:
        raise damaged(
            images_path,
            f"holds images of {list(images.shape[1:])}, the data card {card['image_shape']}",
        )
    if segmentation and labels.shape[1:] != images.shape[1:3]:
        raise damaged(
            labels_path,
            f"holds masks of {list(labels.shape[1:])}, the images {list(images.shape[1:3])}",
        )
    if (
        not segmentation
        and len(labels)
        and not 0 <= labels.min() <= labels.max() < card["num_classes"]
    ):
        raise damaged(
            labels_path,
            f"holds labels outside 0..{card['num_classes'] - 1} (the data card's classes)",
        )
    return images, labels


class ArrayBatches(keras.utils.PyDataset):
    """(float32 images, labels) batches; shuffled per epoch when `shuffle`.

    Labels are int32 class ids, or float32 one-hot rows when `num_classes` is
    given (what label smoothing, MixUp and CutMix need). `augment`, a
    `pipeline.training.augment.BatchAugmenter`, is applied to each batch;
    `workers` > 1 cuts and augments batches in that many threads.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        num_classes: int | None = None,
        augment=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment = augment
        # one-hot rows, looked up per batch
        self.onehot = None if num_classes is None else np.eye(num_classes, dtype=np.float32)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s order; called by `fit` via EpochOrder, and when resuming."""
        self.epoch = epoch
        if self.shuffle:
            self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
        else:
            self.order = np.arange(len(self.labels))

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index: int):
        picked = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        images, labels = self.images[picked].astype(np.float32), self.labels[picked]
        if self.onehot is not None:
            labels = self.onehot[labels]
        if self.augment is not None:
            images, labels = self.augment(images, labels, self.epoch, index)
        return images, labels


class EpochOrder(keras.callbacks.Callback):
    """Tells the training batches which epoch begins, so shuffles follow the epoch number."""

    def __init__(self, batches: ArrayBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)
