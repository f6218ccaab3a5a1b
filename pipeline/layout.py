"""Where stages put their files. One place, so stages and tests agree on paths."""

from __future__ import annotations

import contextlib
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


# The stage that writes each output (a folder covers the files under it), and whether DVC
# caches it (`dvc checkout` restores it) or git holds it (`cache: false` in dvc.yaml). A
# damaged file's error names them (`pipeline.artifacts`). Checkpoints are no stage's output.
OUTPUTS: dict[Path, tuple[str, bool]] = {
    RAW_DIR: ("fetch", True),
    PREPARED_DIR: ("prepare", True),
    MODEL_DIR: ("train", True),
    PLOTS_DIR / "history.csv": ("train", False),
    METRICS_DIR / "eval.json": ("evaluate", False),
    METRICS_DIR / "per_class.json": ("evaluate", False),
    PLOTS_DIR / "tables": ("evaluate", False),
    PLOTS_DIR / "images": ("evaluate", False),
    METRICS_DIR / "registered.json": ("register", False),
}


def producer(path: Path) -> tuple[str, bool] | None:
    """(stage, cached) of the output holding `path`, from OUTPUTS; None for other files.

    `path` is matched relative to the working directory (the project root), else by its
    trailing folder and file names, so a stage run on other folders (tests, tools) still
    gets its hint.
    """
    path = Path(path)
    if path.is_absolute():
        with contextlib.suppress(ValueError):
            path = path.relative_to(Path.cwd())
    parts = path.parts
    for out, found in OUTPUTS.items():
        if parts[: len(out.parts)] == out.parts:
            return found
    for out, found in OUTPUTS.items():  # elsewhere: .../prepared/x.npy, .../metrics/eval.json
        if parts[-2:] == out.parts[-2:] or (not out.suffix and parts[-2:-1] == out.parts[-1:]):
            return found
    return None
