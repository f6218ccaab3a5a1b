"""Batches for Keras `fit` on any backend, read from the prepared `.npy` arrays.

A `keras.utils.PyDataset` needs no TensorFlow, so the same loader feeds the
TensorFlow, JAX and torch backends. Images stay uint8 until a batch is cut
(the model scales them itself); the shuffle order of epoch `e` is a pure
function of (seed, e), so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

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

    Data parallel (`replicas` > 1): every batch splits evenly between the replicas. A
    last training batch that does not is cut to a multiple of them (at most
    `replicas - 1` images of an epoch left out, other ones each epoch), while a last
    evaluation batch (`pad`) is padded with rows that count for nothing: sample weight 0
    (classification) or void pixels (masks, `ignore_index`). `process` (index, count):
    each process of a multi-process job yields its own slice of every global batch, the
    same rows in the same order for any process count.
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
        replicas: int = 1,
        process: tuple[int, int] = (0, 1),
        pad: bool = False,
        ignore_index: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment = augment
        # one-hot rows, looked up per batch
        self.onehot = None if num_classes is None else np.eye(num_classes, dtype=np.float32)
        self.replicas, self.process = replicas, process
        self.pad = pad and replicas > 1
        self.ignore_index = ignore_index
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s order; called by `fit` via EpochOrder, and when resuming."""
        self.epoch = epoch
        if self.shuffle:
            self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
        else:
            self.order = np.arange(len(self.labels))

    def __len__(self) -> int:
        full, last = divmod(len(self.labels), self.batch_size)
        if last and (self.pad or last >= self.replicas):
            return full + 1
        return full

    def __getitem__(self, index: int):
        picked = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        if not self.pad:
            picked = picked[: len(picked) - len(picked) % self.replicas]
        images, labels = self.images[picked].astype(np.float32), self.labels[picked]
        if self.onehot is not None:
            labels = self.onehot[labels]
        if self.augment is not None:
            images, labels = self.augment(images, labels, self.epoch, index)
        if self.pad:
            return self._padded(images, labels)
        return self._slice(images), self._slice(labels)

    def _padded(self, images: np.ndarray, labels: np.ndarray):
        """The batch padded to a multiple of the replicas with rows that count for nothing."""
        missing = -len(images) % self.replicas
        images = np.concatenate([images, np.zeros((missing, *images.shape[1:]), images.dtype)])
        filler = 0 if self.ignore_index is None else self.ignore_index
        labels = np.concatenate(
            [labels, np.full((missing, *labels.shape[1:]), filler, labels.dtype)]
        )
        if self.onehot is None and self.ignore_index is not None:  # masks: padded pixels void
            return self._slice(images), self._slice(labels)
        weights = np.concatenate([np.ones(len(images) - missing), np.zeros(missing)])
        return self._slice(images), self._slice(labels), self._slice(weights.astype(np.float32))

    def _slice(self, rows: np.ndarray) -> np.ndarray:
        index, count = self.process
        if count == 1:
            return rows
        share = len(rows) // count
        return rows[index * share : (index + 1) * share]


class EpochOrder(keras.callbacks.Callback):
    """Tells the training batches which epoch begins, so shuffles follow the epoch number."""

    def __init__(self, batches: ArrayBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)
