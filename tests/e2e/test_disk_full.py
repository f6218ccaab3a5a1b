"""A disk that fills up mid-write: no torn file where the next stage or a resumed training
would read it, one line saying what happened, and nothing already finished is lost.

The full disk is real to the process: a file-size limit (RLIMIT_FSIZE) makes the kernel
refuse writes past a size, and they fail with EFBIG exactly where a full disk fails them
with ENOSPC, without needing root to mount a small file system.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from functools import partial
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import yaml
from conftest import ROOT, SHORT_TRAIN, TINY_MODEL, epoch_counter, pipeline_env, run_cli

from pipeline.__main__ import out_of_space
from pipeline.atomic import atomic_file
from pipeline.data.data_card import read_card
from pipeline.training.fit import fit_model

MB = 1 << 20


def run_on_small_disk(args: list[str], cwd: Path, max_file_bytes: int):
    """`python -m pipeline ARGS` in a process that cannot write a file past `max_file_bytes`."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env=pipeline_env(),
        preexec_fn=limit,  # Python itself ignores SIGXFSZ, so the write fails, it does not kill
        timeout=600,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))}


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of interrupted atomic writes."""
    return [str(p) for p in folder.rglob(".*tmp-*")]


def project(root: Path, **sections) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def assert_one_line_out_of_space(done, stage: str) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: {stage}: out of disk space ("), line
    assert "free some and rerun" in line


def test_prepare_on_a_full_disk_keeps_the_previous_prepared_data(tmp_path):
    """The second prepare (another seed) runs out of space writing its arrays: the first
    prepare's data/prepared is still there byte for byte, with no half-written sibling."""
    project(tmp_path)
    for stage in ("fetch", "prepare"):
        assert run_cli([stage], tmp_path).returncode == 0
    prepared = tmp_path / "data" / "prepared"
    before = snapshot(prepared)
    assert (prepared / "train_images.npy").stat().st_size > 200_000
    project(tmp_path, prepare={"seed": 7})

    done = run_on_small_disk(["prepare"], tmp_path, max_file_bytes=100_000)

    assert_one_line_out_of_space(done, "prepare")
    assert snapshot(prepared) == before
    assert leftovers(tmp_path / "data") == []
    assert run_cli(["prepare"], tmp_path).returncode == 0  # space freed: it goes through
    assert snapshot(prepared) != before


def test_train_on_a_full_disk_fails_cleanly_and_the_rerun_completes(digits_prepared, tmp_path):
    """Training runs out of space saving its first epoch's backup (the weights and
    optimizer outgrow the limit; the MLflow store does not): one line, the run FAILED, no
    torn checkpoint and no model. With space again, `train` reopens that run (as after any
    crash) and completes it."""
    from mlflow import MlflowClient

    project(tmp_path, train={"epochs": 2, "warmup_epochs": 0})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(digits_prepared)

    done = run_on_small_disk(["train"], tmp_path, max_file_bytes=int(1.5 * MB))

    assert_one_line_out_of_space(done, "train")
    checkpoints = tmp_path / "data" / "checkpoints"
    assert not (checkpoints / "phase0.weights.h5").exists()
    assert not (checkpoints / "backup_phase0").exists()  # none finished; none torn
    assert leftovers(tmp_path / "data") == []
    assert not (tmp_path / "data" / "model").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits-cnn").experiment_id
    (failed,) = client.search_runs([experiment])
    assert failed.info.status == "FAILED"

    rerun = run_cli(["train"], tmp_path)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (run,) = client.search_runs([experiment])
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed"] == "true"
    val_loss = client.get_metric_history(run.info.run_id, "val_loss")
    assert {m.step for m in val_loss} == {0, 1}
    assert (tmp_path / "data" / "model" / "model.keras").exists()
    history = (tmp_path / "plots" / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2"]


class DiskFillsAt(keras.callbacks.Callback):
    """From epoch `epoch` on, no file may grow past half the size of the backup saved so
    far: the disk fills up during that epoch, and its backup cannot be written."""

    def __init__(self, epoch: int, backup_weights: Path):
        super().__init__()
        self.epoch, self.backup_weights = epoch, backup_weights

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            half = self.backup_weights.stat().st_size // 2
            resource.setrlimit(
                resource.RLIMIT_FSIZE, (half, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
            )


@pytest.fixture
def free_space_again():
    """Call it to lift the limit a DiskFillsAt set (it is lifted after the test anyway)."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    restore = partial(resource.setrlimit, resource.RLIMIT_FSIZE, limits)
    yield restore
    restore()


# h5py complains again while it frees the file whose write failed
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_mid_training_resumes_from_the_last_whole_backup(
    digits_prepared, tmp_path, free_space_again
):
    """The disk fills during epoch 2 of 3: saving its backup fails, and epoch 1's backup is
    left whole (Keras's own callback leaves a torn weights file, and the rerun cannot load
    it). The rerun resumes at epoch 2 and ends bit-identical to an uninterrupted run."""
    card = read_card(digits_prepared)
    fit = partial(fit_model, TINY_MODEL, SHORT_TRAIN, digits_prepared, card)
    uninterrupted = fit(checkpoint_dir=tmp_path / "once")
    ckpt = tmp_path / "ckpt"
    backup = ckpt / "backup_phase0"

    with pytest.raises(OSError) as failed:
        fit(checkpoint_dir=ckpt, extra_callbacks=[DiskFillsAt(1, backup / "latest.weights.h5")])
    assert out_of_space(failed.value)
    free_space_again()

    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1
    with h5py.File(backup / "latest.weights.h5") as weights:  # whole, not torn
        assert len(weights.keys())
    assert leftovers(ckpt) == [] and not (ckpt / "phase0.weights.h5").exists()
    counter = epoch_counter()
    resumed = fit(checkpoint_dir=ckpt, extra_callbacks=[counter])

    assert counter.epochs == [1, 2]
    assert resumed.history == uninterrupted.history
    weights = zip(uninterrupted.model.get_weights(), resumed.model.get_weights(), strict=True)
    for before, after in weights:
        np.testing.assert_array_equal(before, after)


def test_atomic_file_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "history.csv"
    target.write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(OSError), atomic_file(target) as tmp:
        tmp.write_text("epoch,loss\n0,1.0\n1,0.")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "epoch,loss\n0,1.0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]


@pytest.mark.parametrize(
    "error, found",
    [
        (OSError(28, "No space left on device"), "No space left on device"),
        (OSError("100000 requested and 12484 written"), "12484 of 100000 bytes written"),
        (RuntimeError("(sqlite3.OperationalError) database or disk is full"), "database or"),
        (
            RuntimeError(
                "Can't write data (file write failed: errno = 27, error message = 'File too large')"
            ),
            "File too large",
        ),
        (OSError(2, "No such file or directory"), None),
        (ValueError("bad value"), None),
    ],
)
def test_out_of_space_recognises_full_disk_errors_only(error, found):
    result = out_of_space(error)
    assert (result is None) if found is None else found in result
