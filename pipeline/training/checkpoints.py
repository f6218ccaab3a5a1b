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

import keras

from pipeline.atomic import atomic_dir, atomic_file, write_text
from pipeline.config import AugmentConfig, ModelConfig, TrainConfig, flatten


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's per-epoch backup (weights, optimizer, epoch), with the weights and the
    epoch counter swapped in together as one folder: after a failed save the previous
    epoch's backup is still whole, and a rerun resumes from it."""

    def _save_model(self):
        backup_dir = Path(self.backup_dir)
        with atomic_dir(backup_dir) as tmp:
            self.model.save_weights(tmp / Path(self._weights_path).name)
            metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
            (tmp / Path(self._training_metadata_path).name).write_text(json.dumps(metadata))


class HistoryLog(keras.callbacks.Callback):
    """Each epoch's logs appended to a CSV (`epoch` first, then the metrics by name), the
    same file Keras's `CSVLogger(append=True)` writes, but rewritten whole through a
    rename each epoch: a torn last line would break the resumed run's history."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    def on_train_begin(self, logs=None):
        self.rows = []  # the epochs of earlier attempts and phases, then this fit's
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def on_epoch_end(self, epoch, logs=None):
        metrics = sorted((k, float(v)) for k, v in (logs or {}).items())
        self.rows.append({"epoch": epoch, **dict(metrics)})
        # the columns are the first epoch's, as the file's header has them
        with atomic_file(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, list(self.rows[0]), restval=math.nan, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)


RUN_ID_FILE = "mlflow_run_id"  # in the checkpoint dir: the run a resumed training continues


def backed_up_epoch(backup_dir: Path) -> int:
    """The epoch a `keras.callbacks.BackupAndRestore` in `backup_dir` will resume at (0: none)."""
    metadata = backup_dir / "training_metadata.json"
    if not metadata.exists():
        return 0
    return int(json.loads(metadata.read_text()).get("epoch", 0))


def reset_stale_checkpoint(
    checkpoint_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    card: dict,
    augment_cfg: AugmentConfig,
) -> str | None:
    """Keep `checkpoint_dir` only if it was made by this exact config and data.

    Resuming is for a run that was interrupted, not for one whose params or data
    changed since: that one starts over. Returns the MLflow run id of the
    interrupted training whose checkpoint was dropped, if any (it will never resume).
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
    stamp = checkpoint_dir / "fingerprint.json"
    abandoned = None
    if stamp.exists() and stamp.read_text() != fingerprint:
        run_file = checkpoint_dir / RUN_ID_FILE
        abandoned = run_file.read_text().strip() if run_file.exists() else None
        print(
            f"train: {checkpoint_dir} is from other params or data; starting over", file=sys.stderr
        )
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_text(stamp, fingerprint)
    return abandoned
