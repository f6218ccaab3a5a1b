"""End to end: `train.distribution: data_parallel` through the real commands.

JAX's fake CPU devices stand in for accelerators (XLA_FLAGS fixes their count when the
backend starts, so every placement is its own process). `dvc exp run` with 4 devices;
`launch --processes 2` of 2 devices each against one process of 4; a 4-device training
killed after its first epoch and rerun. Each test reads the project's real MLflow store.

Tolerance, as tests/training/test_data_parallel.py measured it: the same global
batches in another summation order differ by float reassociation only, so histories
agree to 1e-4 relative (val_loss 1e-2: its padded last batch) and weights to 1e-3 of
each tensor's largest value. Batch norm makes that chaotic after a step, so the
compared trainings use `model.norm: none` (and no dropout). So does Adam: its update
m/sqrt(v) is the same size for any gradient, so a weight whose gradient is reassociation
noise (a conv bias) takes steps of the learning rate in a sign the noise picks. CI's CPU
showed it: AdamW's 2-process bias differed by 1.8e-3 of its largest value where this
machine's stayed at 5e-7. The compared trainings use SGD with momentum.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK_RUN, copy_project, pipeline_env, run_cli, sh, wait_for_backup

pytestmark = pytest.mark.slow

TIMEOUT_S = 600
EXPERIMENT = "digits-cnn"
# Two epochs (a resume needs one before and one after), no batch norm, dropout or Adam:
# the placements must be comparable (module docstring). 1257 images: 9 batches of 128, the
# last cut to 104 (a multiple of 4 replicas).
COMPARED = {
    **QUICK_RUN,
    "train.epochs": 2,
    "model.norm": "none",
    "model.dropout": 0.0,
    "train.optimizer": "sgd",
}
LAUNCH_2 = ["launch", "--processes", "2", "--", "train"]


def jax_env(devices: int) -> dict[str, str]:
    return {
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def client(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs(repo: Path):
    c = client(repo)
    experiment = c.get_experiment_by_name(EXPERIMENT)
    return c.search_runs([experiment.experiment_id]) if experiment else []


def logged_models(repo: Path):
    c = client(repo)
    experiment = c.get_experiment_by_name(EXPERIMENT)
    return c.search_logged_models(experiment_ids=[experiment.experiment_id])


def history(repo: Path) -> dict[str, list[float]]:
    """plots/history.csv as columns."""
    with open(repo / "plots" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: [float(row[name]) for row in rows] for name in rows[0]}


# Runs in a fresh interpreter: h5py segfaulted at File.close inside long-lived CI workers
# twice (over a BytesIO and over a real file), never in a process of its own.
READ_WEIGHTS = """
import sys, zipfile, h5py, numpy as np
model, h5, npz = sys.argv[1:]
with zipfile.ZipFile(model) as archive, open(h5, "wb") as f:
    f.write(archive.read("model.weights.h5"))
found = {}
with h5py.File(h5, "r") as f:
    f.visititems(lambda n, i: found.__setitem__(n, i[()]) if isinstance(i, h5py.Dataset) else None)
np.savez(npz, **{n.replace("/", "|"): v for n, v in found.items()})
"""


def weights(repo: Path) -> dict[str, np.ndarray]:
    """Every weight of data/model/model.keras, by its path in the file (h5py, no Keras)."""
    with tempfile.TemporaryDirectory() as folder:
        npz, h5 = Path(folder) / "weights.npz", Path(folder) / "model.weights.h5"
        model = repo / "data" / "model" / "model.keras"
        subprocess.run(
            [sys.executable, "-c", READ_WEIGHTS, str(model), str(h5), str(npz)],
            check=True,
            timeout=120,
        )
        with np.load(npz) as arrays:
            return {name.replace("|", "/"): arrays[name] for name in arrays.files}


def assert_same_training(reference: Path, other: Path) -> None:
    """Same history and weights within the data-parallel tolerance (module docstring)."""
    expected, got = history(reference), history(other)
    assert list(got) == list(expected)
    assert got["epoch"] == expected["epoch"] == [1.0, 2.0]
    for name, values in expected.items():
        rtol = 1e-2 if name == "val_loss" else 1e-4
        np.testing.assert_allclose(got[name], values, rtol=rtol, err_msg=name)
    a, b = weights(reference), weights(other)
    assert a.keys() == b.keys() and a
    for key in a:
        scale = np.abs(a[key]).max() or 1.0
        assert np.abs(a[key] - b[key]).max() <= 1e-3 * scale, key


def train(repo: Path, devices: int) -> subprocess.CompletedProcess:
    return run_cli(["train"], repo, **jax_env(devices))


def finished_run(repo: Path):
    """The project's one MLflow run, FINISHED, with its model file and one logged model."""
    (run,) = runs(repo)
    assert run.info.status == "FINISHED"
    assert (repo / "data" / "model" / "model.keras").stat().st_size > 1000
    run_file = json.loads((repo / "data" / "model" / "mlflow_run.json").read_text())
    assert run_file["run_id"] == run.info.run_id
    (model,) = logged_models(repo)
    assert model.source_run_id == run.info.run_id
    assert not (repo / "data" / "checkpoints").exists()  # removed once the run is whole
    return run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A project with COMPARED params and the digits fetched and prepared, nothing trained."""
    repo = copy_project(
        tmp_path_factory.mktemp("prepared"), {**COMPARED, "train.distribution": "data_parallel"}
    )
    for stage in ("fetch", "prepare"):
        done = run_cli([stage], repo)
        assert done.returncode == 0, done.stderr[-3000:]
    return repo


def copy_of(prepared: Path, where: Path) -> Path:
    shutil.copytree(prepared, where, symlinks=True)
    return where


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> Path:
    """One process of 4 fake devices trained COMPARED, uninterrupted."""
    repo = copy_of(prepared, tmp_path_factory.mktemp("reference") / "project")
    done = train(repo, 4)
    assert done.returncode == 0, done.stderr[-3000:]
    return repo


def test_dvc_exp_run_trains_on_four_jax_devices(tmp_path):
    """`dvc exp run -S train.distribution=data_parallel` (4 devices): every stage runs,
    the experiment's run records the placement and finishes, metrics/eval.json exists."""
    repo = copy_project(tmp_path / "project", QUICK_RUN)
    sh(["dvc", "exp", "run", "-n", "dp4", "-S", "train.distribution=data_parallel"], repo,
       **jax_env(4))  # fmt: skip
    (run,) = runs(repo)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.distribution"] == "data_parallel"
    assert run.data.params["keras.backend"] == "jax"
    placement = {k: run.data.params[f"train.{k}"] for k in
                 ("replicas", "per_replica_batch", "processes", "devices")}  # fmt: skip
    assert placement == {"replicas": "4", "per_replica_batch": "32", "processes": "1",
                         "devices": "cpu"}  # fmt: skip
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0.0 < metrics["test_top1"] <= 1.0
    assert run.data.metrics["test_top1"] == pytest.approx(metrics["test_top1"])
    assert run.data.tags["dvc_experiment"] == "dp4"


def test_one_device_refuses_data_parallel_in_one_line(prepared):
    """One JAX device and `train.distribution: data_parallel`: exit 2, one line naming the
    setting, before a run or a file exists."""
    done = train(prepared, 1)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "train.distribution: data_parallel" in error and "one device" in error
    assert not (prepared / "mlflow.db").exists()
    assert not (prepared / "data" / "model").exists()
    assert not (prepared / "data" / "checkpoints").exists()


def test_two_processes_of_two_devices_train_as_one_process_of_four(prepared, reference, tmp_path):
    """`launch --processes 2 -- train`: exit 0, one MLflow run (the chief's) recording 4
    replicas in 2 processes, one model, and the history and weights of one process with
    4 devices."""
    repo = copy_of(prepared, tmp_path / "project")
    done = run_cli(LAUNCH_2, repo, **jax_env(2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "[p0] train:" in done.stdout and "[p1] train:" in done.stdout
    run = finished_run(repo)
    params = run.data.params
    assert (params["train.replicas"], params["train.processes"]) == ("4", "2")
    assert params["train.per_replica_batch"] == "32"
    reference_run = finished_run(reference)
    assert reference_run.data.params["train.replicas"] == "4"
    assert reference_run.data.params["train.processes"] == "1"
    assert_same_training(reference, repo)
    c = client(repo)
    for metric in ("train_loss", "val_accuracy"):
        steps = [m.step for m in c.get_metric_history(run.info.run_id, metric)]
        assert steps == [0, 1], metric


@pytest.mark.parametrize(
    ("devices", "command"),
    [
        pytest.param(4, ["train"], id="1-process"),
        pytest.param(2, LAUNCH_2, id="2-processes"),
    ],
)
def test_killed_training_resumes_to_the_uninterrupted_result(
    prepared, reference, tmp_path, devices, command
):
    """SIGKILL (every process) after epoch 1's checkpoint, then the same command again:
    epoch 2 only, in the same MLflow run (tag resumed), ending with the uninterrupted
    4-device training's history and weights."""
    repo = copy_of(prepared, tmp_path / "project")
    metadata = repo / "data" / "checkpoints" / "backup_phase0" / "training_metadata.json"
    training = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *command],
        cwd=repo,
        env=pipeline_env(**jax_env(devices)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher and its children: one group to kill
    )
    try:
        wait_for_backup(metadata, 1, training, TIMEOUT_S)
    finally:
        os.killpg(training.pid, signal.SIGKILL)
    assert training.wait(timeout=60) == -signal.SIGKILL, "training ended before it was killed"
    assert not (repo / "data" / "model").exists()
    (killed,) = runs(repo)
    assert killed.info.status == "RUNNING"

    done = run_cli(command, repo, **jax_env(devices))
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Epoch 1/2" not in output and "Epoch 2/2" in output  # continued, not restarted
    run = finished_run(repo)
    assert run.info.run_id == killed.info.run_id and run.data.tags.get("resumed") == "true"
    assert run.data.params["train.replicas"] == "4"
    steps = [m.step for m in client(repo).get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(set(steps)) == [0, 1]
    assert_same_training(reference, repo)
