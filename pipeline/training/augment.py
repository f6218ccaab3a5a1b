"""Training-time augmentation of whole batches, in the input pipeline, on any backend.

Augmentations run on batches as the loader cuts them (`ArrayBatches`), not
inside the model: MixUp and CutMix change the labels too, the saved model
stays the plain inference graph, and the loader's threads run them beside
the training step. The layers are Keras 3 core layers (TensorFlow, JAX and
torch backends alike), with two exceptions written here:

- pad-and-random-crop, because Keras's RandomCrop takes one offset for the
  whole batch, where the CIFAR recipe needs one per image;
- the choice per batch between MixUp and CutMix and its probability (timm's
  `mix_prob` and 50/50 switch), which Keras leaves to the caller.

Every batch's randomness is a function of (seed, epoch, batch index) alone: a
resumed run and any number of loader threads see the same augmented batches.
"""

from __future__ import annotations

import threading

import numpy as np

from pipeline.config import AugmentConfig
from pipeline.errors import ConfigError

MAX_SEED = 2**31 - 1


def check_augment(cfg: AugmentConfig, image_shape: tuple[int, int, int]) -> None:
    """Refuse colour augmentations on grayscale data (one line naming the key)."""
    if image_shape[-1] == 3:
        return
    for key in ("color_jitter", "randaugment_ops"):
        if getattr(cfg, key):
            raise ConfigError(
                f"augment.{key} needs RGB images; set prepare.channels: 3 or augment.{key}: 0"
            )


def is_identity(cfg: AugmentConfig) -> bool:
    """True when `cfg` changes nothing (the loader then skips augmentation)."""
    per_image = (cfg.flip, cfg.crop_padding, cfg.translate, cfg.rotate, cfg.zoom)
    colour = (cfg.color_jitter, cfg.randaugment_ops, cfg.erasing)
    return not (any(per_image) or any(colour) or cfg.mixes)


class BatchAugmenter:
    """`augment(images, onehot_labels, epoch, index)` -> augmented float32 batch and labels."""

    def __init__(self, cfg: AugmentConfig, image_shape: tuple[int, int, int], seed: int):
        check_augment(cfg, image_shape)
        self.cfg, self.image_shape, self.seed = cfg, image_shape, seed
        self._local = threading.local()  # Keras layers hold random state: one set per thread

    def __call__(self, images: np.ndarray, labels: np.ndarray, epoch: int, index: int):
        rng = np.random.default_rng([self.seed, epoch, index])
        cfg = self.cfg
        images = images.astype(np.float32, copy=False)
        labels = labels.astype(np.float32, copy=False)
        if cfg.crop_padding:
            images = pad_and_random_crop(images, cfg.crop_padding, rng)
        layers = self._layers()
        if layers["per_image"] is not None:
            _reseed(layers["per_image"], rng)
            images = _to_numpy(layers["per_image"](images, training=True))
        if cfg.mixes and rng.random() < cfg.mix_prob:
            mixers = [layers[k] for k in ("mixup", "cutmix") if layers[k] is not None]
            mixer = mixers[int(rng.integers(len(mixers)))]
            _reseed(mixer, rng)
            mixed = mixer({"images": images, "labels": labels}, training=True)
            images, labels = _to_numpy(mixed["images"]), _to_numpy(mixed["labels"])
        return np.clip(images, 0, 255, out=images), labels.astype(np.float32)

    def _layers(self) -> dict:
        if not hasattr(self._local, "layers"):
            self._local.layers = build_layers(self.cfg)
        return self._local.layers


def build_layers(cfg: AugmentConfig) -> dict:
    """The Keras layers of `cfg`: a per-image Sequential (or None) and the two mixers.

    All in float32 whatever the global precision policy: they work on the loader's
    float32 batches (under mixed_bfloat16, MixUp's float32 weights met bfloat16 images)."""
    import keras
    from keras import layers

    f32 = {"dtype": "float32"}

    per_image = []
    if cfg.flip:
        per_image.append(layers.RandomFlip("horizontal", **f32))
    if cfg.translate:
        per_image.append(layers.RandomTranslation(cfg.translate, cfg.translate, "reflect", **f32))
    if cfg.rotate:
        per_image.append(layers.RandomRotation(cfg.rotate / 360, fill_mode="reflect", **f32))
    if cfg.zoom:
        per_image.append(layers.RandomZoom(cfg.zoom, fill_mode="reflect", **f32))
    if cfg.color_jitter:
        strength = cfg.color_jitter
        per_image.append(
            layers.RandomColorJitter(
                value_range=(0, 255),
                brightness_factor=strength,
                contrast_factor=strength,
                saturation_factor=(max(0.0, 0.5 - strength / 2), 0.5 + strength / 2),
                **f32,
            )
        )
    if cfg.randaugment_ops:
        per_image.append(
            layers.RandAugment(
                value_range=(0, 255),
                num_ops=cfg.randaugment_ops,
                factor=cfg.randaugment_magnitude,
                **f32,
            )
        )
    if cfg.erasing:
        per_image.append(layers.RandomErasing(factor=cfg.erasing, value_range=(0, 255), **f32))
    return {
        "per_image": keras.Sequential(per_image) if per_image else None,
        "mixup": layers.MixUp(alpha=cfg.mixup_alpha, **f32) if cfg.mixup_alpha > 0 else None,
        "cutmix": layers.CutMix(factor=cfg.cutmix_alpha, **f32) if cfg.cutmix_alpha > 0 else None,
    }


def pad_and_random_crop(images: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Reflect-pad each image by `padding` and crop it back at its own random offset."""
    return _pad_and_crop(images, None, padding, 0, rng)[0]


def _pad_and_crop(images, masks, padding: int, void: int, rng: np.random.Generator):
    """Reflect-pad images (and void-pad masks, if given) by `padding`; crop each pair back
    at one random offset per image."""
    n, h, w = images.shape[:3]
    pad = ((0, 0), (padding, padding), (padding, padding))
    dy = rng.integers(0, 2 * padding + 1, n)
    dx = rng.integers(0, 2 * padding + 1, n)
    picked = np.arange(n)[:, None, None]
    rows = (dy[:, None] + np.arange(h)[None, :])[:, :, None]
    cols = (dx[:, None] + np.arange(w)[None, :])[:, None, :]
    images = np.pad(images, (*pad, (0, 0)), "reflect")[picked, rows, cols]
    if masks is not None:
        masks = np.pad(masks, pad, constant_values=void)[picked, rows, cols]
    return images, masks


def _reseed(layer, rng: np.random.Generator) -> None:
    """Point every seed generator inside `layer` at a fresh state drawn from `rng`."""
    for variable in layer.variables:
        if "seed_generator_state" in variable.path:
            variable.assign(np.array([rng.integers(MAX_SEED), 0], dtype=variable.dtype))


def _to_numpy(x) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float32)


# --------------------------------------------------------------------------- segmentation

# Keys that move pixels apply to image and mask alike; the rest are classification-only.
MASK_AUGMENTATIONS = ("flip", "zoom", "crop_padding")


def check_mask_augment(cfg: AugmentConfig) -> None:
    """Segmentation takes flip, zoom (random scale) and crop_padding; refuse the others."""
    for key in ("translate", "rotate", "color_jitter", "randaugment_ops", "erasing"):
        if getattr(cfg, key):
            raise ConfigError(
                f"augment.{key} is not supported for task: segmentation; "
                f"use {', '.join(MASK_AUGMENTATIONS)}"
            )
    if cfg.mixes:
        raise ConfigError("augment.mixup_alpha/cutmix_alpha mix labels: classification only")


class MaskAugmenter:
    """`augment(images, masks, epoch, index)`: the same random flip, scale and crop for each
    image and its mask. Images are resampled bilinearly, masks by nearest neighbour (a
    blended class index is another class); pixels scaled in from outside are void."""

    def __init__(self, cfg: AugmentConfig, void: int, seed: int):
        check_mask_augment(cfg)
        self.cfg, self.void, self.seed = cfg, void, seed

    def __call__(self, images: np.ndarray, masks: np.ndarray, epoch: int, index: int):
        rng = np.random.default_rng([self.seed, epoch, index])
        images = images.astype(np.float32, copy=True)
        masks = masks.copy()
        for i in range(len(images)):
            if self.cfg.flip and rng.random() < 0.5:
                images[i], masks[i] = images[i, :, ::-1], masks[i, :, ::-1]
            if self.cfg.zoom:
                scale = rng.uniform(1 - self.cfg.zoom, 1 + self.cfg.zoom)
                images[i], masks[i] = _scale_and_crop(images[i], masks[i], scale, self.void, rng)
        if self.cfg.crop_padding:
            images, masks = _pad_and_crop(images, masks, self.cfg.crop_padding, self.void, rng)
        return images, masks


def _scale_and_crop(image, mask, scale: float, void: int, rng: np.random.Generator):
    """Resize by `scale`, then a random crop (larger) or a random placement (smaller)
    back to the original size; uncovered pixels are 0 in the image and void in the mask."""
    from PIL import Image

    h, w = mask.shape
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    channels = [
        np.asarray(Image.fromarray(image[..., c]).resize((sw, sh), Image.Resampling.BILINEAR))
        for c in range(image.shape[-1])
    ]
    scaled = np.stack(channels, axis=-1)
    scaled_mask = np.asarray(Image.fromarray(mask).resize((sw, sh), Image.Resampling.NEAREST))
    out = np.zeros_like(image)
    out_mask = np.full_like(mask, void)
    # offsets of the scaled map relative to the output (negative: cropped)
    oy = int(rng.integers(min(0, h - sh), max(0, h - sh) + 1))
    ox = int(rng.integers(min(0, w - sw), max(0, w - sw) + 1))
    ys, xs = slice(max(0, oy), min(h, oy + sh)), slice(max(0, ox), min(w, ox + sw))
    src = (slice(ys.start - oy, ys.stop - oy), slice(xs.start - ox, xs.stop - ox))
    out[ys, xs] = scaled[src]
    out_mask[ys, xs] = scaled_mask[src]
    return out, out_mask
