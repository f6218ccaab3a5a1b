"""Augmentation: each one changes what it claims, reproducibly, on TensorFlow and JAX.

CI runs this file on both backends.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import AugmentConfig
from pipeline.errors import ConfigError
from pipeline.training.augment import BatchAugmenter, is_identity, pad_and_random_crop

SHAPE = (16, 16, 3)
CLASSES = 4


def batch(n: int = 16):
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (n, *SHAPE)).astype(np.float32)
    labels = np.eye(CLASSES, dtype=np.float32)[np.arange(n) % CLASSES]
    return images, labels


def augment(cfg: AugmentConfig, epoch: int = 0, index: int = 0, seed: int = 7):
    images, labels = batch()
    return BatchAugmenter(cfg, SHAPE, seed)(images.copy(), labels.copy(), epoch, index)


def test_defaults_change_nothing():
    assert is_identity(AugmentConfig())
    assert not is_identity(AugmentConfig(flip=True))
    assert is_identity(AugmentConfig(mixup_alpha=0.2, mix_prob=0.0))


def test_mixup_mixes_images_and_labels_with_the_same_weight():
    images, labels = batch()
    out, mixed = augment(AugmentConfig(mixup_alpha=0.4))
    assert out.shape == images.shape and mixed.shape == labels.shape
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, rtol=1e-5)
    assert ((mixed > 0.01) & (mixed < 0.99)).any(), "labels are still one-hot"
    # each output is lam * own + (1 - lam) * partner, lam = the own class's share
    for i in range(len(images)):
        own = labels[i].argmax()
        lam = mixed[i, own] if mixed[i].max() < 1 else 1.0
        partners = [j for j in range(len(images)) if labels[j].argmax() != own or j == i]
        residual = min(
            np.abs(out[i] - (lam * images[i] + (1 - lam) * images[j])).max() for j in partners
        )
        assert residual < 1.0 or mixed[i, own] > 0.99


def test_cutmix_pastes_a_box_and_mixes_labels_by_its_area():
    images, labels = batch()
    out, mixed = augment(AugmentConfig(cutmix_alpha=1.0))
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, rtol=1e-5)
    changed = 0
    for i in range(len(images)):
        from_own = np.isclose(out[i], images[i], atol=1e-3).all(axis=-1)
        if from_own.all():
            continue
        changed += 1
        # every pixel comes from this image or from one other image of the batch
        source = [
            j
            for j in range(len(images))
            if np.isclose(out[i][~from_own], images[j][~from_own], atol=1e-3).all()
        ]
        assert source, f"image {i}: pasted pixels match no image of the batch"
        # the label share of the own class is at least the share of own pixels
        kept = from_own.mean()  # Keras computes the weight from the unclipped box: close, not equal
        assert (
            mixed[i, labels[i].argmax()] == pytest.approx(kept, abs=0.05)
            or labels[source[0]].argmax() == labels[i].argmax()
        )
    assert changed > 0


def test_mix_prob_mixes_that_share_of_batches():
    cfg = AugmentConfig(mixup_alpha=0.4, mix_prob=0.5)
    augmenter = BatchAugmenter(cfg, SHAPE, seed=3)
    images, labels = batch()
    mixed = 0
    for index in range(40):
        _, out = augmenter(images.copy(), labels.copy(), 0, index)
        mixed += not np.isin(out, (0.0, 1.0)).all()
    assert 10 <= mixed <= 30


def test_flip_mirrors_some_images_and_keeps_the_others():
    images, _ = batch()
    out, _ = augment(AugmentConfig(flip=True))
    flipped = [np.allclose(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.allclose(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_pad_and_random_crop_shifts_each_image_by_its_own_offset():
    images, _ = batch()
    out = pad_and_random_crop(images, 4, np.random.default_rng(0))
    assert out.shape == images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), "reflect")
    offsets = set()
    for i in range(len(images)):
        found = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if np.array_equal(out[i], padded[i, dy : dy + 16, dx : dx + 16])
        ]
        assert found, f"image {i} is not a window of its padded self"
        offsets.add(found[0])
    assert len(offsets) > 1, "all images got the same offset"


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(translate=0.2),
        AugmentConfig(rotate=30),
        AugmentConfig(zoom=0.3),
        AugmentConfig(color_jitter=0.5),
        AugmentConfig(randaugment_ops=2, randaugment_magnitude=0.8),
        AugmentConfig(erasing=1.0),
        AugmentConfig(crop_padding=4),
    ],
    ids=["translate", "rotate", "zoom", "color_jitter", "randaugment", "erasing", "crop"],
)
def test_each_augmentation_changes_images_in_range_reproducibly(cfg):
    images, labels = batch()
    out, out_labels = augment(cfg)
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, images)
    np.testing.assert_array_equal(out_labels, labels)  # per-image augmentations keep labels
    again, _ = augment(cfg)
    np.testing.assert_array_equal(out, again)  # a pure function of (seed, epoch, index)
    other, _ = augment(cfg, index=1)
    assert not np.array_equal(out, other)


def test_batches_do_not_depend_on_what_was_augmented_before():
    """Resumed runs and loader threads see the same batch for the same (epoch, index)."""
    cfg = AugmentConfig(flip=True, translate=0.1, mixup_alpha=0.3)
    first = BatchAugmenter(cfg, SHAPE, seed=5)
    images, labels = batch()
    for index in range(3):
        first(images.copy(), labels.copy(), 0, index)
    late = first(images.copy(), labels.copy(), 1, 2)
    fresh = BatchAugmenter(cfg, SHAPE, seed=5)(images.copy(), labels.copy(), 1, 2)
    np.testing.assert_array_equal(late[0], fresh[0])
    np.testing.assert_array_equal(late[1], fresh[1])


@pytest.mark.parametrize("key", ["color_jitter", "randaugment_ops"])
def test_colour_augmentations_refuse_grayscale(key):
    cfg = AugmentConfig(**{key: 1})
    with pytest.raises(ConfigError, match=f"augment.{key} needs RGB"):
        BatchAugmenter(cfg, (16, 16, 1), seed=0)
