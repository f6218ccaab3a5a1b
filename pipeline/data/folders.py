"""What fetch left in data/raw: its source.json, the images per split and class (or
image/mask pairs), less the files prepare skips."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import damaged, read_json
from pipeline.errors import DataError
from pipeline.layout import IGNORED_DIRS, IMAGE_SUFFIXES


def list_images(raw_dir: Path) -> dict[str, list[tuple[Path, str]]]:
    """Map split name ("all" when the archive has no splits) to (image path, class name).

    A class folder without images is an error, not skipped: dropping it would give every
    class after it another label. Hidden folders and files are not data (as in fetch).
    """
    source = read_source(raw_dir)
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


def read_source(raw_dir: Path) -> dict:
    """fetch's record of the data (`data/raw/source.json`); a DataError naming it when it
    is missing (fetch has not run) or damaged."""
    source = read_json(raw_dir / "source.json", {"source": str}, who="prepare")
    if not isinstance(source.get("splits") or [], list):
        raise damaged(raw_dir / "source.json", "'splits' must be a list", who="prepare")
    return source


def without_corrupt(
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


def without_corrupt_pairs(
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
