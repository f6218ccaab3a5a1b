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
from pathlib import Path

import keras

from pipeline.data.atomic import atomic_dir, atomic_file


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
