"""Training's per-epoch files, written completely or not at all.

A process killed mid-write, or a disk that fills up, must not leave a torn file
that the resumed training then reads: Keras's `CSVLogger` appends in place and
`BackupAndRestore` overwrites its weights and then its epoch counter in place.
These callbacks write through a temporary name and a rename instead. Imported
by the trainer only (it imports Keras).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import keras

from pipeline.artifacts import check_hdf5, read_json, read_text
from pipeline.atomic import atomic_dir, atomic_file, write_text
from pipeline.config import AugmentConfig, ModelConfig, TrainConfig, flatten
from pipeline.errors import DataError
from pipeline.training.history import HISTORY_FILE, read_history


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's per-epoch backup (weights, optimizer, epoch), with the weights and the
    epoch counter swapped in together as one folder: after a failed save the previous
    epoch's backup is still whole, and a rerun resumes from it.

    `write=False` (every process of a multi-process training but the chief): restore
    from the chief's backup, never save or delete it."""

    def __init__(self, backup_dir: str, *, write: bool = True):
        super().__init__(backup_dir, delete_checkpoint=write)
        self.write = write

    def _save_model(self):
        if not self.write:
            return
        from pipeline.training.devices import local_variables

        backup_dir = Path(self.backup_dir)
        with local_variables(), atomic_dir(backup_dir) as tmp:
            self.model.save_weights(tmp / Path(self._weights_path).name)
            metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
            (tmp / Path(self._training_metadata_path).name).write_text(json.dumps(metadata))


class HistoryLog(keras.callbacks.Callback):
    """Each epoch's logs appended to a CSV (`epoch` first, then the metrics by name), the
    same file Keras's `CSVLogger(append=True)` writes, but rewritten whole through a
    rename each epoch: a torn last line would break the resumed run's history.
    `write=False`: read the earlier epochs, keep the new ones in memory only."""

    def __init__(self, path: Path, *, write: bool = True):
        super().__init__()
        self.path, self.write = Path(path), write

    def on_train_begin(self, logs=None):
        self.rows = []  # the epochs of earlier attempts and phases, then this fit's
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def on_epoch_end(self, epoch, logs=None):
        metrics = sorted((k, float(v)) for k, v in (logs or {}).items())
        self.rows.append({"epoch": epoch, **dict(metrics)})
        if not self.write:
            return
        # the columns are the first epoch's, as the file's header has them
        with atomic_file(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, list(self.rows[0]), restval=math.nan, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)


RUN_ID_FILE = "mlflow_run_id"  # in the checkpoint dir: the run a resumed training continues
FINGERPRINT_FILE = "fingerprint.json"
BACKUP_WEIGHTS, BACKUP_METADATA = "latest.weights.h5", "training_metadata.json"  # Keras's names


class Abandoned(NamedTuple):
    """An interrupted training whose checkpoint was dropped: its run will never resume."""

    run_id: str
    reason: str


def backed_up_epoch(backup_dir: Path) -> int:
    """The epoch a `keras.callbacks.BackupAndRestore` in `backup_dir` will resume at (0: none)."""
    metadata = backup_dir / BACKUP_METADATA
    if not metadata.exists():
        return 0
    return read_json(metadata, {"epoch": int})["epoch"]


def checkpoint_damage(checkpoint_dir: Path) -> str | None:
    """What is wrong with the checkpoint in `checkpoint_dir` (one line naming the file), or
    None when every file of it reads back whole: resuming must never read half a backup."""
    try:
        read_text(checkpoint_dir / FINGERPRINT_FILE)
        if (checkpoint_dir / RUN_ID_FILE).exists():
            read_text(checkpoint_dir / RUN_ID_FILE)
        if (checkpoint_dir / HISTORY_FILE).exists():
            read_history(checkpoint_dir / HISTORY_FILE)
        for done in sorted(checkpoint_dir.glob("phase*.weights.h5")):
            check_hdf5(done)
        for backup in sorted(checkpoint_dir.glob("backup_phase*")):
            backed_up_epoch(backup)
            check_hdf5(backup / BACKUP_WEIGHTS)  # Keras resumes the epoch even without them
    except DataError as exc:
        return str(exc)
    return None


def reset_stale_checkpoint(
    checkpoint_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    card: dict,
    augment_cfg: AugmentConfig,
    *,
    stamp: bool = True,
) -> Abandoned | None:
    """Keep `checkpoint_dir` only if it was made by this exact config and data, and reads
    back whole.

    Resuming is for a run that was interrupted, not for one whose params or data changed
    since: that one starts over. So does one whose checkpoint is damaged (cut, garbled or
    unreadable), with one warning line naming the file: the checkpoint is scratch state,
    not a DVC output, and starting over loses only time, while refusing would leave the
    user to delete the folder by hand. Returns the MLflow run of the interrupted training
    whose checkpoint was dropped, if any (it will never resume), and why.

    `stamp=False` (train, before its run and the store are reached) only drops: the stamp
    of this config is written when fitting starts, so a command that fails before leaves
    no checkpoint folder behind.
    """
    fingerprint = json.dumps(
        {
            "model": flatten(model_cfg, "model"),
            "train": flatten(cfg, "train"),
            "augment": flatten(augment_cfg, "augment"),
            "data": card["data_hash"],
        },
        sort_keys=True,
    )
    stamp_file = checkpoint_dir / FINGERPRINT_FILE
    dropped = None
    held = {p.name for p in checkpoint_dir.iterdir()} if checkpoint_dir.is_dir() else set()
    if held - {RUN_ID_FILE}:  # the run id alone: the run started, fitting had not
        damage = checkpoint_damage(checkpoint_dir)
        if damage:
            print(f"warning: train: {damage}; starting over", file=sys.stderr)
            why = "its checkpoint is damaged"
        elif read_text(stamp_file) != fingerprint:
            print(
                f"train: {checkpoint_dir} is from other params or data; starting over",
                file=sys.stderr,
            )
            why = "params or data changed since"
        else:
            why = None
        if why:
            run_id = _readable_run_id(checkpoint_dir / RUN_ID_FILE)
            dropped = (
                Abandoned(run_id, f"interrupted; not resumed because {why}") if run_id else None
            )
            _remove(checkpoint_dir)
    if stamp:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_text(stamp_file, fingerprint)
    return dropped


def _readable_run_id(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _remove(checkpoint_dir: Path) -> None:
    try:
        shutil.rmtree(checkpoint_dir)
    except OSError as exc:
        raise DataError(
            f"train: cannot remove {checkpoint_dir} to start over ({exc.strerror or exc}); "
            "delete it and rerun train"
        ) from None
