"""MLflow's system metrics on every training run, read back from a real SQLite store."""

from __future__ import annotations

import functools
import logging
import time

import keras
import pytest
from conftest import TINY_MODEL, epoch_counter
from mlflow import MlflowClient

from pipeline.config import MlflowConfig, TrainConfig
from pipeline.tracking import runs
from pipeline.tracking.store import tracking_uri

# MLflow 3.17's names (its CPUMonitor); disk and network come too, GPUs with nvidia-ml-py.
SYSTEM = (
    "system/cpu_utilization_percentage",
    "system/system_memory_usage_megabytes",
    "system/system_memory_usage_percentage",
)
TINY = TrainConfig(epochs=1, batch_size=128, warmup_epochs=0, learning_rate=0.01)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh project folder with the default store and none of MLflow's system
    metrics variables set."""
    monkeypatch.chdir(tmp_path)
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
        "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING",
    ):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow exports it
    keras.mixed_precision.set_global_policy("float32")


def train(prepared, root, cfg=TINY):
    from pipeline.stages import train as train_stage

    train_stage.run(
        TINY_MODEL,
        cfg,
        MlflowConfig(experiment="sysmetrics"),
        prepared_dir=prepared,
        out_dir=root / "model",
        plots_dir=root / "plots",
        checkpoint_dir=root / "checkpoints",
    )


def only_run(client: MlflowClient):
    (run,) = client.search_runs([client.get_experiment_by_name("sysmetrics").experiment_id])
    return run


def history(client: MlflowClient, run_id: str, key: str):
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def test_a_short_training_run_records_cpu_and_memory_quietly(
    digits_prepared, project, capfd, monkeypatch
):
    """One epoch on the digits: the run holds CPU and memory samples, with no MLflow
    monitor lines on stderr (no GPU, no nvidia-ml-py here), and a warning that MLflow's
    GPU monitor repeats is shown once; evaluate's reopening of the run adds no samples,
    even with MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING set."""
    train(digits_prepared, project)
    client = MlflowClient(tracking_uri())
    run = only_run(client)
    assert run.info.status == "FINISHED"
    counts = {key: len(history(client, run.info.run_id, key)) for key in SYSTEM}
    assert all(n >= 1 for n in counts.values()), (counts, sorted(run.data.metrics))
    assert history(client, run.info.run_id, SYSTEM[1])[0].value > 0
    printed = capfd.readouterr().err
    assert "mlflow.system_metrics" not in printed, printed[-2000:]

    # What MLflow's GPU monitor logs at every sample on a GPU without power readings:
    gpu_monitor = logging.getLogger("mlflow.system_metrics.metrics.gpu_monitor")
    for _ in range(3):
        gpu_monitor.warning("Encountered error Not Supported when trying to collect GPU power")
    assert capfd.readouterr().err.count("collect GPU power") == 1

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    with runs.reopened_run(run.info.run_id, then="x"):
        time.sleep(2.5)  # two samples' time, were a monitor running
    after = {key: len(history(client, run.info.run_id, key)) for key in SYSTEM}
    assert after == counts


def test_a_resumed_run_continues_its_system_metrics(digits_prepared, project, monkeypatch):
    """Interrupted after epoch 1 of 2, then resumed by the next train: the one run holds
    samples from both processes' parts, at steps that do not repeat. Sampled every 0.5 s:
    at the default 2 s, a fast machine's interrupted part (one epoch) logged none."""
    from pipeline.stages import train as train_stage

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    two = TrainConfig(epochs=2, batch_size=128, warmup_epochs=0, learning_rate=0.01)
    real = train_stage.fit_model
    with monkeypatch.context() as patch:
        stop = functools.partial(real, extra_callbacks=(epoch_counter(stop_after=0),))
        patch.setattr(train_stage, "fit_model", stop)
        with pytest.raises(KeyboardInterrupt):
            train(digits_prepared, project, two)
    client = MlflowClient(tracking_uri())
    run_id = only_run(client).info.run_id
    before = history(client, run_id, SYSTEM[0])
    assert before, "the interrupted part logged no system metrics"

    resumed_at_ms = time.time() * 1000
    train(digits_prepared, project, two)
    run = only_run(client)
    assert run.info.run_id == run_id and run.data.tags.get("resumed") == "true"
    for key in SYSTEM:
        samples = history(client, run_id, key)
        steps = [m.step for m in samples]
        assert len(set(steps)) == len(steps), (key, steps)
        assert any(m.timestamp >= resumed_at_ms for m in samples), key


def test_a_store_failing_under_the_monitor_adds_no_lines(project, capfd, monkeypatch):
    """mlflow.db moved away mid-run (SQLite then refuses writes to it): the monitor's
    failed write, a many-line warning from MLflow, is not printed (the training's own
    writes report a failing store). The user's sampling interval is honoured."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    db, moved = project / "mlflow.db", project / "moved.db"
    with runs.training_run("sysmetrics", run_name="t", params={}, tags={}) as run_id:
        time.sleep(1.2)
        db.rename(moved)
        time.sleep(1.2)  # the monitor's next write fails
        moved.rename(db)
    printed = capfd.readouterr().err
    assert "mlflow.system_metrics" not in printed, printed[-2000:]
    samples = history(MlflowClient(tracking_uri()), run_id, SYSTEM[0])
    assert len(samples) >= 2  # at 0.5 s (2 s would have logged none before the move)
