"""Prepare stage: decode raw images, resize, split, and store them as NumPy arrays.

Storage format: one uint8 `.npy` array of images (N, H, W, C) and one int32 array
of labels per split. `.npy` needs nothing but NumPy to read, memory-maps (a
data set larger than RAM streams from disk page by page), and decodes at copy
speed, so the trainer feeds any Keras backend (JAX has no TensorFlow) without
an input pipeline that could starve the accelerator. TFRecord would tie the
trainer to TensorFlow; JPEG folders would be decoded again every epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.config import PrepareConfig
from pipeline.data.atomic import atomic_dir, write_json
from pipeline.data.layout import (
    IGNORED_DIRS,
    IMAGE_SUFFIXES,
    PREPARED_DIR,
    RAW_DIR,
    SPLITS,
    data_card_file,
    images_file,
    labels_file,
)
from pipeline.errors import DataError


def list_images(raw_dir: Path) -> dict[str, list[tuple[Path, str]]]:
    """Map split name ("all" when the archive has no splits) to (image path, class name).

    A class folder without images is an error, not skipped: dropping it would give every
    class after it another label. Hidden folders and files are not data (as in fetch).
    """
    source = _read_source(raw_dir)
    splits = source.get("splits") or []
    roots = {s: raw_dir / s for s in splits} if splits else {"all": raw_dir}
    found: dict[str, list[tuple[Path, str]]] = {}
    for split, root in roots.items():
        if not root.is_dir():
            raise DataError(
                f"prepare: split folder {root} is missing ({raw_dir / 'source.json'} lists it); "
                "rerun `python -m pipeline fetch`"
            )
        items = []
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
            images = [
                (path, class_dir.name)
                for path in sorted(class_dir.iterdir())
                if path.is_file() and _visible(path) and path.suffix.lower() in IMAGE_SUFFIXES
            ]
            if not images:
                raise DataError(
                    f"prepare: class folder {class_dir} has no images "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove the folder"
                )
            items += images
        if not items:
            raise DataError(f"prepare: no images under {root}")
        found[split] = items
    return found


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name not in IGNORED_DIRS


def _read_source(raw_dir: Path) -> dict:
    path = raw_dir / "source.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"prepare: {path} not found; run `python -m pipeline fetch` first"
        ) from None
    except json.JSONDecodeError:
        raise DataError(
            f"prepare: {path} is not valid JSON; rerun `python -m pipeline fetch`"
        ) from None


class CorruptImage(DataError):
    """An image or mask file that cannot be decoded; `prepare.on_corrupt` fails or skips."""

    def __init__(self, path: Path, kind: str, exc: BaseException, stage: str = "prepare") -> None:
        if isinstance(exc, UnidentifiedImageError):
            why = "not a recognised image format"
        else:
            lines = str(exc).strip().splitlines()
            why = lines[0] if lines else exc.__class__.__name__
        super().__init__(f"{stage}: cannot decode {kind} {path}: {why}")
        self.path = path


# What PIL raises on a damaged file (struct.error and EOFError from some format plugins).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)
_strict = threading.Lock()
_strict_users = 0
_strict_saved = False


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """PIL raises on a truncated file while this is open, whatever the process set.

    With `ImageFile.LOAD_TRUNCATED_IMAGES` (process-wide; some libraries turn it on), PIL
    fills the missing part of a truncated JPEG or PNG with grey and reports success: a
    damaged file would be trained on. The flag is off from the first decode that enters
    to the last that leaves (decodes run in threads), then restored.
    """
    global _strict_users, _strict_saved
    with _strict:
        if _strict_users == 0:
            _strict_saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _strict_saved


def load_image(
    path: Path, size: tuple[int, int], channels: int, *, stage: str = "prepare"
) -> np.ndarray:
    """Decode one image to uint8 (height, width, channels) for `size` = (height, width),
    whatever its mode or bit depth. A file that does not decode completely (truncated
    included) raises CorruptImage."""
    try:
        with strict_decoding(), Image.open(path) as img:
            img.load()
            return to_model_input(img, size, channels)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{stage}: refusing image {path}: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise CorruptImage(path, "image", exc, stage) from None


def to_model_input(img: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """A decoded image as the model's uint8 (height, width, channels) input: 8-bit, grey or
    RGB (alpha dropped), bilinear resize to `size` = (height, width). Training, evaluate,
    predict and the served model all go through here."""
    height, width = size
    img = _to_8bit(img)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grayscale would be clipped by convert("L"): rescale instead."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
        return Image.fromarray(np.clip(wide * 255.0 / peak, 0, 255).astype(np.uint8))
    if img.mode == "P":
        return img.convert("RGBA")
    return img


def in_threads(func: Callable[[Any], Any], items: list) -> Iterator[Any]:
    """func(item) for each item, in order, run in threads (PIL releases the GIL while it
    decodes); after a failure, no further item is started."""
    pool = ThreadPoolExecutor()
    try:
        yield from pool.map(func, items)
    finally:
        pool.shutdown(cancel_futures=True)


def decode_each(items: list, decode: Callable[[Any], Any]) -> Iterator[Any]:
    """decode(item) for each item, in order; an undecodable file raises, naming it and
    the way out."""

    def attempt(item):
        try:
            return decode(item)
        except CorruptImage as exc:
            raise DataError(
                f"{exc}; replace or delete it, or set prepare.on_corrupt: skip"
            ) from None

    return in_threads(attempt, items)


def decode_all(paths: list[Path], size: tuple[int, int], channels: int) -> np.ndarray:
    """The images as one uint8 (N, height, width, channels) array."""
    images = np.empty((len(paths), *size, channels), dtype=np.uint8)
    decode = lambda path: load_image(path, size, channels)  # noqa: E731
    for i, image in enumerate(decode_each(paths, decode)):
        images[i] = image
    return images


def find_corrupt(items: list, decode: Callable[[Any], Any]) -> list[Path]:
    """The files among `items` that `decode` finds corrupt, in order (for prepare.on_corrupt:
    skip; the decoded arrays are dropped). Other data errors raise."""

    def corrupt_file(item) -> Path | None:
        try:
            decode(item)
        except CorruptImage as exc:
            return exc.path
        return None

    return [path for path in in_threads(corrupt_file, items) if path is not None]


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, carved): `fraction` of every class carved out, seeded and deterministic."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    if fraction == 0:
        return indices, indices[:0]
    try:
        keep, carved = train_test_split(
            indices, test_size=fraction, random_state=seed, stratify=labels
        )
    except ValueError as exc:
        raise DataError(
            f"prepare: cannot split {len(labels)} images stratified by class ({exc})"
        ) from None
    return np.sort(keep), np.sort(carved)


def assign_splits(
    found: dict[str, list[tuple[Path, str]]], classes: list[str], cfg: PrepareConfig
) -> dict[str, tuple[list[Path], np.ndarray]]:
    """Keep the archive's own splits; carve the missing val/test from train, stratified."""
    index = {name: i for i, name in enumerate(classes)}
    pool_name = "train" if "train" in found else "all"
    pool = found[pool_name]
    paths = [p for p, _ in pool]
    labels = np.array([index[c] for _, c in pool], dtype=np.int32)
    result = {}
    for split, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if split in found:
            continue
        # Fractions are of the whole pool: carve test first, then val from what remains.
        share = fraction * len(pool) / len(paths)
        keep, carved = stratified_split(labels, share, cfg.seed)
        result[split] = ([paths[i] for i in carved], labels[carved])
        paths, labels = [paths[i] for i in keep], labels[keep]
    result["train"] = (paths, labels)
    for split in SPLITS:
        if split in found and split != pool_name:  # the pool's own split lost val/test above
            items = found[split]
            unknown = sorted({c for _, c in items} - set(index))
            if unknown:
                raise DataError(f"prepare: split {split} has classes not in train: {unknown}")
            result[split] = (
                [p for p, _ in items],
                np.array([index[c] for _, c in items], dtype=np.int32),
            )
    return result


def run(cfg: PrepareConfig, raw_dir: Path = RAW_DIR, out_dir: Path = PREPARED_DIR) -> dict:
    """Write train/val/test arrays and the data card to `out_dir`; return the card.

    With `prepare.on_corrupt: skip`, every file is decoded once first, and those that do
    not decode are left out before the split: the result is what the raw folder without
    them gives. The card counts and names them (`skipped_corrupt`, `skipped_files`).
    """
    source = _read_source(raw_dir)
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
        found = _without(found, set(skipped))
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


def _without(
    found: dict[str, list[tuple[Path, str]]], corrupt: set[Path]
) -> dict[str, list[tuple[Path, str]]]:
    """`found` less the corrupt files; a class folder left without images is refused, as
    an empty one is."""
    kept = {}
    for split, items in found.items():
        kept[split] = [(path, name) for path, name in items if path not in corrupt]
        emptied = sorted({p.parent for p, _ in items} - {p.parent for p, _ in kept[split]})
        if emptied:
            raise DataError(
                f"prepare: every image in class folder {emptied[0]} is corrupt; "
                "replace them or remove the folder"
            )
    return kept


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

VOID = 255  # void pixels in prepared masks, whatever value the source used


def list_pairs(raw_dir: Path, source: dict) -> dict[str, list[tuple[Path, Path]]]:
    """Map split name ("all" when unsplit) to (image, mask) paths paired by file stem."""
    splits = source.get("splits") or []
    roots = {s: raw_dir / s for s in splits} if splits else {"all": raw_dir}
    found = {}
    for split, root in roots.items():
        masks = {
            p.stem: p for p in (root / "masks").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        }
        images = sorted(
            p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        missing = [p.name for p in images if p.stem not in masks]
        if missing or not images:
            raise DataError(f"prepare: {root} has images without masks: {missing[:3]}")
        found[split] = [(p, masks[p.stem]) for p in images]
    return found


def load_mask(path: Path, size: tuple[int, int], num_classes: int, ignore_index: int) -> np.ndarray:
    """Decode a class-index mask to uint8 (height, width): nearest-neighbour resize only (an
    interpolated class index is another class), source void mapped to VOID."""
    height, width = size
    try:
        with strict_decoding(), Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(
                    f"prepare: mask {path} is {img.mode}; masks hold one class index per "
                    "pixel (a grayscale or palette PNG)"
                )
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.NEAREST)
            values = np.asarray(img).astype(np.int64)
    except _DECODE_ERRORS as exc:
        raise CorruptImage(path, "mask", exc) from None
    void = values == ignore_index
    bad = (values >= num_classes) & ~void
    if bad.any():
        raise DataError(
            f"prepare: mask {path} has value {int(values[bad][0])}, but there are "
            f"{num_classes} classes and void is {ignore_index} (fetch.ignore_index)"
        )
    return np.where(void, VOID, values).astype(np.uint8)


def check_same_size(image: Path, mask: Path) -> None:
    """A mask labels its image pixel for pixel: a different size means a mismatched pair."""
    try:
        with Image.open(image) as img, Image.open(mask) as lab:  # headers only
            image_size, mask_size = img.size, lab.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return  # the decoders below name the unreadable file
    if image_size != mask_size:
        raise DataError(
            f"prepare: mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image.name} "
            f"is {image_size[0]}x{image_size[1]}; a mask must match its image pixel for pixel"
        )


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
        found = _without_pairs(found, set(skipped))
    splits = _carve_pairs(found, cfg)
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


def _without_pairs(
    found: dict[str, list[tuple[Path, Path]]], corrupt: set[Path]
) -> dict[str, list[tuple[Path, Path]]]:
    """`found` less the pairs with a corrupt image or mask; a split left empty is refused."""
    kept = {}
    for split, pairs in found.items():
        kept[split] = [pair for pair in pairs if not corrupt.intersection(pair)]
        if not kept[split]:
            raise DataError(
                f"prepare: every image or mask under {pairs[0][0].parent.parent} is corrupt; "
                "replace them"
            )
    return kept


def _carve_pairs(
    found: dict[str, list[tuple[Path, Path]]], cfg: PrepareConfig
) -> dict[str, list[tuple[Path, Path]]]:
    """Keep the source's splits; carve missing val/test from train by a seeded shuffle."""
    pool_name = "train" if "train" in found else "all"
    pool = found[pool_name]
    order = np.random.default_rng(cfg.seed).permutation(len(pool))
    result = {s: found[s] for s in SPLITS if s in found and s != pool_name}
    start = 0
    for split, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if split in found:
            continue
        count = round(fraction * len(pool))
        result[split] = [pool[i] for i in sorted(order[start : start + count])]
        start += count
    result["train"] = [pool[i] for i in sorted(order[start:])]
    if not result["train"]:
        raise DataError("prepare: no training images left after carving val and test")
    return result


def read_card(prepared_dir: Path = PREPARED_DIR) -> dict:
    """The data card written by `run`; a missing card means prepare has not run."""
    path = data_card_file(prepared_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found; run `python -m pipeline prepare` first") from None
