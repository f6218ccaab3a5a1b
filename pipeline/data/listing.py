"""Which files of a data folder are its images: the one rule by which fetch counts them
and prepare reads them, so that the two cannot disagree.

- A class folder's images are every image file under it, in its subfolders too, as
  Keras's `image_dataset_from_directory` and torchvision's `ImageFolder` read a class
  folder (`cat/indoor/1.jpg` is a cat).
- An image file is a file whose suffix, in any case, is one of `IMAGE_SUFFIXES`
  (`.JPG` too); a folder named like an image is a subfolder like any other.
- Hidden names (starting with ".") and `__MACOSX` are not data, files or folders.
- A link to a file is read as that file; a link to a folder, a link that points at
  nothing and anything else that is not a plain file are refused by name, never left out.

Segmentation pairs an image under `images/` with the mask under `masks/` at the same
relative path and name without suffix (`images/a/1.jpg` with `masks/a/1.png`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import DataError
from pipeline.layout import IGNORED_DIRS, IMAGE_SUFFIXES

Shown = Callable[[Path], str]  # how an error names a path (fetch: inside the archive)

EXPECTED = "expected <class>/<image> or <split>/<class>/<image>"


def is_data(name: str) -> bool:
    """False for hidden names and macOS zip litter."""
    return not name.startswith(".") and name not in IGNORED_DIRS


def has_image_suffix(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path, stage: str, shown: Shown = str) -> list[Path]:
    """Every image file under `folder`, subfolders included, sorted by path."""
    found = []

    def unreadable(exc: OSError) -> None:
        raise DataError(f"{stage}: cannot read {shown(Path(exc.filename))} ({exc.strerror})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if is_data(d))
        for name in dirnames:
            if (here / name).is_symlink():
                raise DataError(
                    f"{stage}: {shown(here / name)} is a link to a folder; "
                    "put the folder itself there or remove the link"
                )
        for name in filenames:
            path = here / name
            if not (is_data(name) and has_image_suffix(path)):
                continue
            if not path.is_file():
                what = "a link that points at no file" if path.is_symlink() else "not a file"
                raise DataError(f"{stage}: {shown(path)} is {what}; replace or remove it")
            found.append(path)
    return sorted(found)


def refuse_loose_images(folder: Path, stage: str, shown: Shown = str) -> None:
    """An image directly in a folder of class (or split) folders belongs to no class."""
    loose = sorted(p.name for p in folder.iterdir() if is_data(p.name) and has_image_suffix(p))
    loose = [name for name in loose if not (folder / name).is_dir()]
    if loose:
        raise DataError(
            f"{stage}: {shown(folder)} holds image files outside class folders "
            f"({loose[0]}{', ...' if len(loose) > 1 else ''}; {EXPECTED})"
        )


def class_images(root: Path, stage: str, shown: Shown = str) -> dict[str, list[Path]]:
    """Class name -> its image files, for each class folder directly in `root`.

    A class folder without images is refused, not skipped: dropped, it would give every
    class after it another label. So is an image outside the class folders.
    """
    refuse_loose_images(root, stage, shown)
    folders = sorted(p for p in root.iterdir() if is_data(p.name) and p.is_dir())
    if not folders:
        raise DataError(f"{stage}: no class folders found at {shown(root)} ({EXPECTED})")
    found = {}
    for folder in folders:
        if folder.is_symlink():
            raise DataError(
                f"{stage}: {shown(folder)} is a link to a folder; "
                "put the folder itself there or remove the link"
            )
        found[folder.name] = image_files(folder, stage, shown)
        if not found[folder.name]:
            raise DataError(
                f"{stage}: class folder {shown(folder)} has no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove the folder"
            )
    return found


def image_mask_pairs(folder: Path, stage: str, shown: Shown = str) -> list[tuple[Path, Path]]:
    """(image, mask) for every image under `folder/images`, sorted; an image without a
    mask, a mask without an image, and two files of one name are refused by name."""
    images = _by_name(folder / "images", stage, shown)
    masks = _by_name(folder / "masks", stage, shown)
    if not images:
        raise DataError(f"{stage}: {shown(folder / 'images')} has no images")
    unpaired = sorted(set(images) ^ set(masks))
    if unpaired:
        name = unpaired[0]
        kind, other = ("image", "masks") if name in images else ("mask", "images")
        raise DataError(f"{stage}: {kind} {name!r} in {shown(folder)} has no match in {other}/")
    return [(images[name], masks[name]) for name in sorted(images)]


def _by_name(folder: Path, stage: str, shown: Shown) -> dict[str, Path]:
    """Relative path without suffix -> image file, for the images under `folder`."""
    if not folder.is_dir():
        raise DataError(f"{stage}: {shown(folder)} is missing")
    found: dict[str, Path] = {}
    for path in image_files(folder, stage, shown):
        name = path.relative_to(folder).with_suffix("").as_posix()
        if name in found:
            raise DataError(
                f"{stage}: {shown(found[name])} and {path.name} are one name twice "
                "(images and masks pair by name without the suffix); keep one"
            )
        found[name] = path
    return found
