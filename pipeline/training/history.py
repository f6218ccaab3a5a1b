"""The per-epoch history CSV (`plots/history.csv`): read back by evaluate, compare and resume."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.artifacts import damaged, read_csv
from pipeline.atomic import atomic_file

HISTORY_FILE = "history.csv"


def read_history(path: Path) -> dict[str, list[float]]:
    """Per-epoch history from the CSV log; the last row wins for an epoch run twice (resume).
    A missing, cut or garbled file is a DataError naming it."""
    table = read_csv(path, columns=("epoch",))
    if not all(row["epoch"].is_integer() and row["epoch"] >= 0 for row in table):
        raise damaged(path, "has an 'epoch' that is not a whole number")
    rows = {int(row["epoch"]): row for row in table}
    keys = [k for k in next(iter(rows.values())) if k != "epoch"] if rows else []
    history = {"epoch": [e + 1 for e in sorted(rows)]}
    history.update({k: [rows[e][k] for e in sorted(rows)] for k in keys})
    return history


def write_history(history: dict[str, list[float]], path: Path) -> None:
    keys = list(history)
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        writer.writerows(zip(*(history[k] for k in keys), strict=True))
