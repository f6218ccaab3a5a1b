"""Train/val/test assignment: keep an archive's own splits, carve the missing ones from
train (stratified by class for classification, a seeded shuffle for segmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import PrepareConfig
from pipeline.errors import DataError
from pipeline.layout import SPLITS

FRACTION_KEYS = {"test": "prepare.test_fraction", "val": "prepare.val_fraction"}


def assign_splits(
    found: dict[str, list[tuple[Path, str]]], classes: list[str], cfg: PrepareConfig
) -> dict[str, tuple[list[Path], np.ndarray]]:
    """Keep the archive's own splits; carve the missing val/test from train, stratified.

    Every split must hold every class: a split without one is refused, naming the class,
    the split, how many images of it there are and how many it would take (evaluate's
    per-class figures and a model's validation need each class in each split).
    """
    index = {name: i for i, name in enumerate(classes)}
    pool_name = "train" if "train" in found else "all"
    pool = found[pool_name]
    paths = [p for p, _ in pool]
    labels = np.array([index[c] for _, c in pool], dtype=np.int32)
    carved = [(s, f) for s, f in (("test", cfg.test_fraction), ("val", cfg.val_fraction))]
    carved = [(s, f) for s, f in carved if s not in found]
    wanted = {s for s, f in carved if f > 0} | {"train"}  # a fraction of 0: empty on purpose
    try:
        parts = _carve(labels, carved, cfg.seed)
    except ValueError:  # a class of one image: named below
        parts = None
    if parts is None or any(
        not (labels[parts[s]] == i).any() for s in wanted for i in range(len(classes))
    ):
        _refuse_missing_class(labels, classes, carved, cfg.seed, pool_name)
    result = {s: ([paths[i] for i in kept], labels[kept]) for s, kept in parts.items()}
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
            lacking = sorted(set(index) - {c for _, c in items})
            if lacking:
                count = int((labels == index[lacking[0]]).sum())
                raise DataError(
                    f"prepare: split {split} (the data's own {split}/ folder) has no images of "
                    f"class {lacking[0]!r} ({count} in {pool_name}); it needs at least 1: "
                    f"add some to {split}/{lacking[0]}/ and rerun fetch"
                )
    return result


def _carve(labels: np.ndarray, carved: list[tuple[str, float]], seed: int) -> dict[str, np.ndarray]:
    """Split -> indices into the pool: each carved split stratified, train the rest.
    Fractions are of the whole pool: test is carved first, then val from what remains.
    Raises ValueError where scikit-learn cannot stratify (a class of one image)."""
    from sklearn.model_selection import train_test_split

    keep = np.arange(len(labels))
    parts = {}
    for split, fraction in carved:
        if fraction == 0:
            parts[split] = keep[:0]
            continue
        share = fraction * len(labels) / len(keep)
        keep, parts[split] = train_test_split(
            keep, test_size=share, random_state=seed, stratify=labels[keep]
        )
        keep = np.sort(keep)  # in pool order, as the next carve expects
    parts["train"] = keep
    return {split: np.sort(indices) for split, indices in parts.items()}


def _refuse_missing_class(
    labels: np.ndarray, classes: list[str], carved: list[tuple[str, float]], seed: int, pool: str
) -> None:
    """The DataError for the first class that the carving leaves out of a split (or that
    is too small to stratify), with the number of images it would need."""
    counts = np.bincount(labels, minlength=len(classes))
    for i in np.argsort(counts, kind="stable"):
        missing = _missing_from(labels, carved, seed, i)
        if missing is None:
            continue
        name, count = classes[i], int(counts[i])
        need = _images_needed(labels, carved, seed, i)
        fractions = ", ".join(f"{FRACTION_KEYS[s]} {f:g}" for s, f in carved)
        needs = f"needs at least {need}" if need else "needs more"
        raise DataError(
            f"prepare: split {missing} would have no image of class {name!r}: it has {count} "
            f"image(s) in {pool}, and carving stratified splits ({fractions}) from them "
            f"{needs}; add images of {name!r} or raise the fraction"
        )
    raise DataError(  # every class fits alone: the pool is too small for the classes
        f"prepare: {len(labels)} images in {pool} are too few to give each carved split "
        f"({', '.join(f'{FRACTION_KEYS[s]} {f:g}' for s, f in carved)}) one image of each of "
        f"the {len(classes)} classes; add images or raise the fractions"
    )


def _missing_from(
    labels: np.ndarray, carved: list[tuple[str, float]], seed: int, label: int
) -> str | None:
    """The split the carving leaves without `label` (None: it is in every split).
    Other classes that could not be stratified are made large enough not to fail first."""
    fit = _others_stratifiable(labels, label)
    try:
        parts = _carve(fit, carved, seed)
    except ValueError:
        return "test" if carved else "train"
    for split in ("train", *(s for s, f in carved if f > 0)):
        if not (fit[parts[split]] == label).any():
            return split
    return None


def _others_stratifiable(labels: np.ndarray, label: int) -> np.ndarray:
    counts = np.bincount(labels)
    extra = [np.full(max(0, 2 - c), k) for k, c in enumerate(counts) if k != label and c]
    return np.concatenate([labels, *extra]).astype(labels.dtype)


def _images_needed(
    labels: np.ndarray, carved: list[tuple[str, float]], seed: int, label: int
) -> int | None:
    """The fewest images of `label` (the others as they are) with which the carving
    gives every split one of it, up to 100 times as many as now; None past that."""
    count = int((labels == label).sum())
    others = labels[labels != label]
    for need in range(count + 1, max(100 * count, 1000) + 1):
        trial = np.concatenate([others, np.full(need, label, labels.dtype)])
        if _missing_from(trial, carved, seed, label) is None:
            return need
    return None


def carve_pairs(
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
