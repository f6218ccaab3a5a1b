"""A queued grid: `dvc queue start -j 2` over four experiments on the default SQLite
store, then `compare` over them.

Two queue workers run two experiments at once, each writing its run, per-epoch
metrics, test metrics and registered model version to the one `mlflow.db`.
Every run must end FINISHED and complete, and two of them must have overlapped
in time (else two workers would be tested no better than one). `compare` then
reports the grid as the README shows: one row a run, the varied setting named.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import QUICK_RUN, copy_project, pipeline_env, run_cli, sh

pytestmark = pytest.mark.slow

EPOCHS = 2
LEARNING_RATES = ("0.01", "0.02", "0.03", "0.04")
EXPERIMENT = "queue-j2"
GRID = "lr-sweep"
MODEL_NAME = "queue-j2-classifier"
EPOCH_METRICS = (
    "train_loss",
    "val_loss",
    "train_accuracy",
    "val_accuracy",
    "train_top5",
    "val_top5",
    "learning_rate",
)
TEST_METRICS = ("test_top1", "test_top5", "test_loss", "test_macro_f1")


# A few seconds of training per experiment, in an experiment of its own.
TINY = {
    **QUICK_RUN,
    "train.epochs": EPOCHS,
    "mlflow.experiment": EXPERIMENT,
    "register.model_name": MODEL_NAME,
}


@pytest.fixture
def project(tmp_path) -> Path:
    """The project with fetch and prepare done and committed; the queue's workers and
    tasks stopped afterwards, whatever happened."""
    repo = copy_project(tmp_path, TINY)
    sh(["dvc", "repro", "prepare"], repo)  # the experiments only train, evaluate, register
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "data"], repo)
    try:
        yield repo
    finally:
        stop_queue(repo)


def stop_queue(repo: Path) -> None:
    """`dvc queue stop --kill`, then SIGKILL whatever DVC recorded as still running
    (workers and experiment processes, each in its own process group)."""
    subprocess.run(
        ["dvc", "queue", "stop", "--kill"],
        cwd=repo,
        env=pipeline_env(),
        capture_output=True,
        timeout=120,
    )
    pids = []
    for info in (repo / ".dvc" / "tmp" / "exps").rglob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads(info.read_text())
            if record.get("returncode") is None:
                pids.append(int(record["pid"]))
    deadline = time.monotonic() + 30
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.5)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped by its detached parent yet) is gone for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


def wait_for_queue(repo: Path, timeout_s: float = 600) -> dict[str, str]:
    """{experiment name: status} once no task is queued or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = sh(["dvc", "queue", "status"], repo).stdout
        tasks = {}
        for line in out.splitlines():
            cols = line.split()
            if len(cols) >= 2 and re.fullmatch(r"[0-9a-f]{7}", cols[0]):
                tasks[cols[1]] = cols[-1]
        if tasks and not {"Queued", "Running"} & set(tasks.values()):
            return tasks
        assert time.monotonic() < deadline, f"queue not done in {timeout_s} s:\n{out}"
        time.sleep(5)


def queue_logs(repo: Path, name: str) -> str:
    done = subprocess.run(
        ["dvc", "queue", "logs", name],
        cwd=repo,
        env=pipeline_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return f"--- {name}:\n{(done.stdout + done.stderr)[-3000:]}"


def test_two_queue_workers_leave_four_complete_runs_that_compare_reports(project):
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    grid = ["-S", f"train.learning_rate={','.join(LEARNING_RATES)}", "-S", f"mlflow.grid={GRID}"]
    sh(["dvc", "exp", "run", "--queue", *grid], project)
    sh(["dvc", "queue", "start", "-j", "2"], project)
    tasks = wait_for_queue(project)

    failed = [name for name, status in tasks.items() if status != "Success"]
    logs = "\n".join(queue_logs(project, name) for name in failed)
    assert len(tasks) == 4 and not failed, f"{tasks}\n{logs}"
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], project).stdout)
    dvc_top1 = {  # what `dvc exp show` lists for each finished experiment
        exp["name"]: exp["revs"][0]["data"]["metrics"]["metrics/eval.json"]["data"]["test_top1"]
        for row in shown
        for exp in row.get("experiments") or []
        if (exp.get("executor") or {}).get("state") == "success"
    }
    assert set(dvc_top1) == set(tasks), f"`dvc exp show`: {sorted(dvc_top1)}, queue: {tasks}"

    store = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = store.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, "no MLflow experiment: no run reached the store"
    runs = store.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags.get("dvc_experiment") for r in runs) == sorted(tasks)
    assert sorted(r.data.params["train.learning_rate"] for r in runs) == list(LEARNING_RATES)
    assert {r.data.tags["grid"] for r in runs} == {GRID}
    for run in runs:
        name = run.data.tags["dvc_experiment"]
        assert run.info.status == "FINISHED", (name, run.info.status)
        assert run.data.params["train.epochs"] == str(EPOCHS), name
        for metric in EPOCH_METRICS:
            steps = [m.step for m in store.get_metric_history(run.info.run_id, metric)]
            assert steps == list(range(EPOCHS)), (name, metric, steps)
        assert set(TEST_METRICS) <= set(run.data.metrics), (name, sorted(run.data.metrics))
        assert run.data.metrics["test_top1"] == pytest.approx(dvc_top1[name]), name
        artifacts = {a.path for a in store.list_artifacts(run.info.run_id)}
        assert {"model_summary.txt", "model_card.json", "plots", "metrics"} <= artifacts, name
        (model,) = store.search_logged_models(
            [experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        files = {a.path for a in store.list_logged_model_artifacts(model.model_id)}
        assert model.status == LoggedModelStatus.READY and "MLmodel" in files, (name, files)
        assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri()), name

    versions = store.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert {(v.run_id, v.source) for v in versions} == {
        (m.source_run_id, f"models:/{m.model_id}")
        for m in store.search_logged_models([experiment.experiment_id])
    }

    # Two workers ran at once: some two runs were open in the store at the same time.
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    overlaps = [
        min(a[1], b[1]) - max(a[0], b[0]) for i, a in enumerate(spans) for b in spans[i + 1 :]
    ]
    assert max(overlaps) > 0, f"no two runs overlapped: {spans}"

    # `compare` over the grid: a row a run; the settings column names what varied, only that.
    done = run_cli(["compare", "--experiment", EXPERIMENT], project)
    assert done.returncode == 0, done.stderr[-3000:]
    report_dir = project / "reports" / EXPERIMENT
    report = (report_dir / "report.md").read_text()
    assert sum(line.startswith("| ") for line in report.splitlines()) == 1 + 4  # header + runs
    for rate in LEARNING_RATES:
        assert report.count(f"learning_rate={rate}") == 1, (rate, report)
    assert "epochs=" not in report
    for name in ("top1_vs_params", "top1_vs_throughput", "learning_curves", "train_val_gap"):
        png = report_dir / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    (logged,) = store.search_runs(
        [experiment.experiment_id], filter_string="tags.`pipeline.report` = 'true'"
    )
    artifacts = {a.path for a in store.list_artifacts(logged.info.run_id, "report")}
    assert "report/report.md" in artifacts and "report/learning_curves.png" in artifacts

    bad = run_cli(["compare", "--experiment", "no-such"], project)
    assert bad.returncode == 2 and "no-such" in bad.stderr and "Traceback" not in bad.stderr
