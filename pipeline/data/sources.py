"""Where raw images come from: scikit-learn's digits, the seeded digit scenes, or an
image-folder archive whose layout is read and normalised here.

Output for classification: `work/[<split>/]<class>/<image files>`; for
segmentation: `work/[<split>/]{images,masks}/<id>.*` and `classes.txt`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import FetchConfig
from pipeline.data.archive import archive_kind, archive_name, download, safe_extract
from pipeline.data.listing import (
    class_images,
    has_image_suffix,
    image_mask_pairs,
    is_data,
    refuse_loose_images,
)
from pipeline.errors import DataError
from pipeline.redact import mask_uri

# Folder names that mean "split layout", and the name each one is written as.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


# Root-level files worth keeping beside the class folders.
CLASSES_FILE = "classes.txt"


KEEP_FILES = (CLASSES_FILE,)


def fetch_digits(work: Path) -> dict:
    """scikit-learn's bundled 8x8 digits (offline) as grayscale PNGs, one folder per digit."""
    from sklearn.datasets import load_digits  # slow import; only this source needs it

    digits = load_digits()
    pixels = np.rint(digits.images * 255 / 16).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    classes = [str(c) for c in np.unique(labels)]
    for name in classes:
        (work / name).mkdir()
    for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        Image.fromarray(image).save(work / str(label) / f"{index:04d}.png")
    digest = hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest()
    return _source_info("digits", "sklearn.datasets.load_digits", digest, len(labels), classes, [])


def fetch_digit_scenes(work: Path) -> dict:
    """The offline segmentation default: seeded digit scenes (pipeline.data.scenes)."""
    from pipeline.data.scenes import CLASSES, SPLIT_SIZES, VOID, digit_scenes, split_glyph_pools

    digest = hashlib.sha256()
    pools = split_glyph_pools()
    for offset, (split, count) in enumerate(SPLIT_SIZES.items()):
        images, masks = digit_scenes(count, seed=offset, glyph_pool=pools[split])
        for kind, arrays in (("images", images), ("masks", masks)):
            (work / split / kind).mkdir(parents=True)
            for index, array in enumerate(arrays):
                Image.fromarray(array).save(work / split / kind / f"{index:04d}.png")
            digest.update(arrays.tobytes())
    (work / CLASSES_FILE).write_text("\n".join(CLASSES) + "\n")
    return _source_info(
        "digit_scenes",
        "pipeline.data.scenes",
        digest.hexdigest(),
        sum(SPLIT_SIZES.values()),
        list(CLASSES),
        list(SPLIT_SIZES),
        task="segmentation",
        ignore_index=VOID,
    )


def _source_info(
    source: str,
    url: str,
    sha256: str,
    num_images: int,
    classes: list[str],
    splits: list[str],
    *,
    task: str = "classification",
    ignore_index: int | None = None,
) -> dict:
    info = {
        "source": source,
        "url": mask_uri(url),  # DVC outputs are shared (dvc push): no credentials in them
        "sha256": sha256,
        "task": task,
        "num_images": num_images,
        "classes": classes,
        "splits": splits,
    }
    if ignore_index is not None:
        info["ignore_index"] = ignore_index
    return info


@dataclass
class Layout:
    """What was found at the dataset root inside an archive."""

    root: Path
    # output name -> folder (classes, or splits when `split` is true)
    folders: dict[str, Path] = field(default_factory=dict)
    split: bool = False
    classes: list[str] = field(default_factory=list)
    num_images: int = 0
    task: str = "classification"


def fetch_archive(cfg: FetchConfig, work: Path) -> dict:
    """Download, extract, find the image-folder root and move its content into `work`."""
    archive_kind(cfg.url)  # an unsupported type fails before a long download
    archive = work / f".download-{archive_name(cfg.url)}"
    digest = download(cfg.url, archive, sha256=cfg.sha256, timeout_s=cfg.timeout_s)
    extracted = work / ".extracted"
    safe_extract(archive, extracted, label=cfg.url)
    archive.unlink()
    _copy_linked_files(extracted)
    layout = read_layout(_dataset_root(extracted), extracted, cfg.url)
    _move_layout(layout, work)
    shutil.rmtree(extracted)
    splits = sorted(layout.folders) if layout.split else []
    segmentation = layout.task == "segmentation"
    return _source_info(
        "archive",
        cfg.url,
        digest,
        layout.num_images,
        layout.classes,
        splits,
        task=layout.task,
        ignore_index=cfg.ignore_index if segmentation else None,
    )


def read_folder(folder: Path, label: str) -> Layout:
    """The layout of an image folder already on disk (`score` reads new data so), found
    as fetch finds an archive's: lone wrapper folders descended; `label` names it in errors."""
    return read_layout(_dataset_root(folder), folder, label)


def _visible_dirs(folder: Path) -> list[Path]:
    """Subfolders, minus hidden ones and macOS zip litter (__MACOSX)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and is_data(p.name))


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder`."""
    return [p for p in folder.iterdir() if p.is_file() and is_data(p.name) and has_image_suffix(p)]


def _copy_linked_files(extracted: Path) -> None:
    """Each link to a file (safe_extract kept only links inside the archive) replaced by
    a copy of the file: once the class folders move into data/raw, a link to a file
    left behind would point at nothing, counted here and missing at prepare."""
    for dirpath, _, filenames in os.walk(extracted):
        for name in filenames:
            link = Path(dirpath, name)
            if link.is_symlink() and link.is_file():
                target = link.resolve()
                link.unlink()
                shutil.copy2(target, link)


def _dataset_root(top: Path) -> Path:
    """Descend through lone wrapper folders (e.g. `cifar10/`) down to the dataset root.

    Stops at a folder with images, with several subfolders, or whose lone subfolder
    is a split name (so `cifar10/train/<class>` keeps its `train` split).
    """
    current = top
    while True:
        dirs = _visible_dirs(current)
        if len(dirs) != 1 or _images_in(current) or dirs[0].name.lower() in SPLIT_NAMES:
            return current
        current = dirs[0]


def _shown(folder: Path, top: Path, url: str) -> str:
    """A folder as the user knows it: its path inside the archive, and the archive."""
    rel = folder.relative_to(top).as_posix()
    slash = "/" if folder.is_dir() else ""
    return f"the top level of {url}" if rel == "." else f"{rel}{slash} (in {url})"


def _shower(top: Path, url: str):
    return lambda path: _shown(path, top, url)


def read_layout(root: Path, top: Path, url: str) -> Layout:
    """Classify root as split or class layout and validate it; DataError names the folder."""
    dirs = _visible_dirs(root)
    if not dirs:
        raise DataError(f"fetch: no class folders found at {_shown(root, top, url)}")
    shown = _shower(top, url)
    refuse_loose_images(root, "fetch", shown)
    if _has_masks(root) or all(d.name.lower() in SPLIT_NAMES and _has_masks(d) for d in dirs):
        return _read_mask_layout(root, dirs, top, url)
    split_dirs = [d.name for d in dirs if d.name.lower() in SPLIT_NAMES]
    if len(split_dirs) == len(dirs):
        return _read_split_layout(root, dirs, top, url)
    if split_dirs:  # read as classes, `train` would be a class holding every class
        others = [d.name for d in dirs if d.name.lower() not in SPLIT_NAMES]
        raise DataError(
            f"fetch: {shown(root)} has split folders ({', '.join(split_dirs)}) beside other "
            f"folders ({', '.join(others)}); expected <split>/<class>/<image> or "
            "<class>/<image> only"
        )
    classes, count = _read_classes(root, top, url)
    return Layout(root, {d.name: d for d in dirs}, False, classes, count)


def _has_masks(folder: Path) -> bool:
    return {d.name for d in _visible_dirs(folder)} == {"images", "masks"}


def _read_mask_layout(root: Path, dirs: list[Path], top: Path, url: str) -> Layout:
    """Segmentation: `[<split>/]images/<id>.*` each with `masks/<id>.png`, and classes.txt."""
    classes_file = root / CLASSES_FILE
    if not classes_file.is_file():
        raise DataError(
            f"fetch: {_shown(root, top, url)} has images/ and masks/ but no {CLASSES_FILE} "
            "(one class name per line, in mask-value order)"
        )
    classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    if len(classes) < 2:
        raise DataError(f"fetch: {CLASSES_FILE} in {url} names fewer than 2 classes")
    split = not _has_masks(root)
    folders = (
        {SPLIT_NAMES[d.name.lower()]: d for d in dirs}
        if split
        else {
            "images": root / "images",
            "masks": root / "masks",
        }
    )
    total = 0
    for folder in [*folders.values()] if split else [root]:
        total += len(image_mask_pairs(folder, "fetch", _shower(top, url)))
    return Layout(root, folders, split, classes, total, task="segmentation")


def _read_split_layout(root: Path, dirs: list[Path], top: Path, url: str) -> Layout:
    """`<split>/<class>/<img>`: every split must hold the same set of classes."""
    splits: dict[str, Path] = {}
    for folder in dirs:
        name = SPLIT_NAMES[folder.name.lower()]
        if name in splits:
            raise DataError(
                f"fetch: {_shown(root, top, url)} has two folders for split {name!r}: "
                f"{splits[name].name} and {folder.name}"
            )
        splits[name] = folder
    per_split = {}
    total = 0
    for name, folder in sorted(splits.items()):
        per_split[name], count = _read_classes(folder, top, url)
        total += count
    _check_same_classes(per_split, root, top, url)
    classes = next(iter(per_split.values()))
    return Layout(root, splits, True, classes, total)


def _read_classes(folder: Path, top: Path, url: str) -> tuple[list[str], int]:
    """Sorted class names under `folder` and their image count, as prepare will read them
    (`listing.class_images`); each class needs images."""
    found = class_images(folder, "fetch", _shower(top, url))
    if len(found) < 2:
        raise DataError(
            f"fetch: {_shown(folder, top, url)} has only one class folder ({next(iter(found))}); "
            "a classifier needs at least 2"
        )
    return sorted(found), sum(len(images) for images in found.values())


def _check_same_classes(per_split: dict[str, list[str]], root: Path, top: Path, url: str) -> None:
    every = sorted(set().union(*per_split.values()))
    for split, classes in per_split.items():
        missing = sorted(set(every) - set(classes))
        if missing:
            raise DataError(
                f"fetch: splits at {_shown(root, top, url)} have different classes: "
                f"{split} lacks {', '.join(missing)}"
            )


def _move_layout(layout: Layout, work: Path) -> None:
    """Rename class (or split) folders and kept files from the root into `work`."""
    for name, folder in layout.folders.items():
        os.replace(folder, work / name)
    for name in KEEP_FILES:
        kept = layout.root / name
        if kept.is_file():
            os.replace(kept, work / name)
