"""Train/val/test assignment: keep an archive's own splits, carve the missing ones from
train (stratified by class for classification, a seeded shuffle for segmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import PrepareConfig
from pipeline.errors import DataError
from pipeline.layout import SPLITS


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
