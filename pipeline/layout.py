"""Where stages put their files. One place, so stages and tests agree on paths."""

from __future__ import annotations

from pathlib import Path

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
MODEL_DIR = Path("data/model")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
# Per-epoch training state for resuming; not a DVC output, so DVC never deletes it.
CHECKPOINT_DIR = Path("data/checkpoints")

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
# Never data: hidden folders (names starting with ".") and macOS zip litter.
IGNORED_DIRS = frozenset({"__MACOSX"})


def images_file(prepared_dir: Path, split: str) -> Path:
    return prepared_dir / f"{split}_images.npy"


def labels_file(prepared_dir: Path, split: str) -> Path:
    return prepared_dir / f"{split}_labels.npy"


def data_card_file(prepared_dir: Path) -> Path:
    return prepared_dir / "data_card.json"
