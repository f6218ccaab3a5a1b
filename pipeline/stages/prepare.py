"""Prepare stage: decode raw images, resize, split, and store them as NumPy arrays.

Storage format: one uint8 `.npy` array of images (N, H, W, C) and one int32 array
of labels per split. `.npy` needs nothing but NumPy to read, memory-maps (a
data set larger than RAM streams from disk page by page), and decodes at copy
speed, so the trainer feeds any Keras backend (JAX has no TensorFlow) without
an input pipeline that could starve the accelerator. TFRecord would tie the
trainer to TensorFlow; JPEG folders would be decoded again every epoch.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir, write_json
from pipeline.config import PrepareConfig
from pipeline.data.decode import (
    VOID,
    check_same_size,
    decode_all,
    decode_each,
    find_corrupt,
    load_image,
    load_mask,
)
from pipeline.data.folders import (
    list_images,
    list_pairs,
    read_source,
    split_roots,
    without_corrupt,
    without_corrupt_pairs,
)
from pipeline.data.splits import assign_splits, carve_pairs
from pipeline.errors import DataError
from pipeline.layout import PREPARED_DIR, RAW_DIR, SPLITS, data_card_file, images_file, labels_file


def run(cfg: PrepareConfig, raw_dir: Path = RAW_DIR, out_dir: Path = PREPARED_DIR) -> dict:
    """Write train/val/test arrays and the data card to `out_dir`; return the card.

    With `prepare.on_corrupt: skip`, every file is decoded once first, and those that do
    not decode are left out before the split: the result is what the raw folder without
    them gives. The card counts and names them (`skipped_corrupt`, `skipped_files`).
    """
    source = read_source(raw_dir)
    if source.get("task") == "segmentation":
        return run_segmentation(cfg, source, raw_dir, out_dir)
    found = list_images(raw_dir)
    classes = sorted({c for items in found.values() for _, c in items})
    if len(classes) < 2:
        raise DataError(
            f"prepare: {raw_dir} has one class folder ({classes[0]}); a classifier needs at least 2"
        )
    skipped: list[Path] = []
    if cfg.on_corrupt == "skip":
        skipped = find_corrupt(
            [path for items in found.values() for path, _ in items],
            lambda path: load_image(path, cfg.height_width, cfg.channels),
        )
        found = without_corrupt(found, set(skipped), split_roots(raw_dir, source))
    splits = assign_splits(found, classes, cfg)
    card = {
        "task": "classification",
        "source": source,
        "classes": classes,
        "num_classes": len(classes),
        "image_shape": [*cfg.height_width, cfg.channels],
        "prepare": asdict(cfg),
        "counts": {},
        "sha256": {},
    }
    _note_skipped(card, skipped, raw_dir)
    digest = hashlib.sha256()
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            paths, labels = splits[split]
            images = decode_all(paths, cfg.height_width, cfg.channels)
            np.save(images_file(tmp, split), images)
            np.save(labels_file(tmp, split), labels.astype(np.int32))
            counts = Counter(int(v) for v in labels)
            card["counts"][split] = {name: counts.get(i, 0) for i, name in enumerate(classes)}
            split_digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
            card["sha256"][split] = split_digest
            digest.update(split_digest.encode())
        card["totals"] = {s: int(sum(card["counts"][s].values())) for s in SPLITS}
        card["data_hash"] = digest.hexdigest()
        write_json(data_card_file(tmp), card)
    _report_skipped(skipped, out_dir)
    return card


SHOWN_SKIPPED = 5  # corrupt files named in the warning line (the data card lists all)


def _note_skipped(card: dict, skipped: list[Path], raw_dir: Path) -> None:
    card["skipped_corrupt"] = len(skipped)
    card["skipped_files"] = sorted(p.relative_to(raw_dir).as_posix() for p in skipped)


def _report_skipped(skipped: list[Path], out_dir: Path) -> None:
    """One warning line: how many were skipped, the first few by name, where the rest are."""
    if not skipped:
        return
    names = sorted(map(str, skipped))
    shown = ", ".join(names[:SHOWN_SKIPPED])
    more = f" and {len(names) - SHOWN_SKIPPED} more" if len(names) > SHOWN_SKIPPED else ""
    print(
        f"warning: prepare: skipped {len(names)} corrupt file(s) (prepare.on_corrupt: skip): "
        f"{shown}{more}; all in {data_card_file(out_dir)} (skipped_files)",
        file=sys.stderr,
    )


# --------------------------------------------------------------------------- segmentation


def run_segmentation(cfg: PrepareConfig, source: dict, raw_dir: Path, out_dir: Path) -> dict:
    """Images as for classification, masks as uint8 (N, H, W) class maps in the labels file.
    With on_corrupt skip, a pair whose image or mask does not decode is left out."""
    classes = list(source["classes"])
    ignore_index = int(source.get("ignore_index", VOID))
    size = cfg.height_width

    def decode(pair: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
        check_same_size(*pair)
        image = load_image(pair[0], size, cfg.channels)
        return image, load_mask(pair[1], size, len(classes), ignore_index)

    found = list_pairs(raw_dir, source)
    skipped: list[Path] = []
    if cfg.on_corrupt == "skip":
        skipped = find_corrupt([pair for pairs in found.values() for pair in pairs], decode)
        found = without_corrupt_pairs(found, set(skipped))
    splits = carve_pairs(found, cfg)
    card = {
        "task": "segmentation",
        "source": source,
        "classes": classes,
        "num_classes": len(classes),
        "ignore_index": VOID,
        "image_shape": [*cfg.height_width, cfg.channels],
        "prepare": asdict(cfg),
        "counts": {},
        "class_pixels": {},
        "sha256": {},
    }
    _note_skipped(card, skipped, raw_dir)
    digest = hashlib.sha256()
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            pairs = splits.get(split, [])
            images = np.zeros((len(pairs), *size, cfg.channels), np.uint8)
            masks = np.zeros((len(pairs), *size), np.uint8)
            for i, (image, mask) in enumerate(decode_each(pairs, decode)):
                images[i], masks[i] = image, mask
            np.save(images_file(tmp, split), images)
            np.save(labels_file(tmp, split), masks)
            pixels = np.bincount(masks.reshape(-1), minlength=VOID + 1)
            card["counts"][split] = len(pairs)
            card["class_pixels"][split] = {
                **{name: int(pixels[i]) for i, name in enumerate(classes)},
                "void": int(pixels[VOID]),
            }
            split_digest = hashlib.sha256(images.tobytes() + masks.tobytes()).hexdigest()
            card["sha256"][split] = split_digest
            digest.update(split_digest.encode())
        card["totals"] = dict(card["counts"])
        card["data_hash"] = digest.hexdigest()
        write_json(data_card_file(tmp), card)
    _report_skipped(skipped, out_dir)
    return card
