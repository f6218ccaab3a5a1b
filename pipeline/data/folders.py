"""What fetch left in data/raw: its source.json, the images per split and class (or
image/mask pairs), less the files prepare skips."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import damaged, read_json
from pipeline.data.listing import class_images, image_mask_pairs
from pipeline.errors import DataError


def list_images(raw_dir: Path) -> dict[str, list[tuple[Path, str]]]:
    """Map split name ("all" when the archive has no splits) to (image path, class name),
    by the rule fetch counted them with (`listing.class_images`): every image under a
    class folder, its subfolders included; a class folder without images is refused."""
    found: dict[str, list[tuple[Path, str]]] = {}
    for split, root in split_roots(raw_dir, read_source(raw_dir)).items():
        per_class = class_images(root, "prepare")
        found[split] = [(path, name) for name, paths in per_class.items() for path in paths]
    return found


def split_roots(raw_dir: Path, source: dict) -> dict[str, Path]:
    """Split name -> its folder in data/raw ("all": data/raw itself when unsplit)."""
    splits = source.get("splits") or []
    roots = {s: raw_dir / s for s in splits} if splits else {"all": raw_dir}
    for root in roots.values():
        if not root.is_dir():
            raise DataError(
                f"prepare: split folder {root} is missing ({raw_dir / 'source.json'} lists it); "
                "rerun `python -m pipeline fetch`"
            )
    return roots


def read_source(raw_dir: Path) -> dict:
    """fetch's record of the data (`data/raw/source.json`); a DataError naming it when it
    is missing (fetch has not run) or damaged."""
    source = read_json(raw_dir / "source.json", {"source": str}, who="prepare")
    if not isinstance(source.get("splits") or [], list):
        raise damaged(raw_dir / "source.json", "'splits' must be a list", who="prepare")
    return source


def without_corrupt(
    found: dict[str, list[tuple[Path, str]]], corrupt: set[Path], roots: dict[str, Path]
) -> dict[str, list[tuple[Path, str]]]:
    """`found` less the corrupt files; a class left without images is refused, as an
    empty class folder is (its images may sit in subfolders: the class is what counts).
    `roots` are the split folders (`split_roots`)."""
    kept = {}
    for split, items in found.items():
        kept[split] = [(path, name) for path, name in items if path not in corrupt]
        emptied = sorted({name for _, name in items} - {name for _, name in kept[split]})
        if emptied:
            raise DataError(
                f"prepare: every image in class folder {roots[split] / emptied[0]} is corrupt; "
                "replace them or remove the folder"
            )
    return kept


def list_pairs(raw_dir: Path, source: dict) -> dict[str, list[tuple[Path, Path]]]:
    """Map split name ("all" when unsplit) to (image, mask) paths, paired as fetch paired
    them (`listing.image_mask_pairs`)."""
    return {
        split: image_mask_pairs(root, "prepare")
        for split, root in split_roots(raw_dir, source).items()
    }


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
