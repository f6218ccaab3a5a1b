"""The MLflow run that spans train and evaluate, and what is logged to it.

Stages are separate processes, so the run is shared through a file: train
starts the run and writes its id to `data/model/mlflow_run.json` (a DVC output
next to the model); evaluate reopens the run by that id to add test metrics and
plots; register registers the model logged in that run. A DVC cache hit of
train therefore keeps pointing at the run that produced the cached model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.artifacts import damaged, read_json
from pipeline.layout import MODEL_DIR
from pipeline.redact import mask_uri, masked
from pipeline.tracking.store import (
    StoreProblem,
    connect,
    ensure_experiment,
    mlflow_client,
    reaching_the_store,
    source_tags,
    tracking_uri,
    without_secrets,
    write_problem,
)

RUN_FILE = MODEL_DIR / "mlflow_run.json"
# MLflow's system metrics monitor logs one sample per interval and drops the last,
# unfinished one at run end, so a run shorter than this gets none; MLflow's 10 s would
# leave a tiny training empty. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL_S = 2


@contextlib.contextmanager
def training_run(
    experiment: str,
    *,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    resume_file: Path | None = None,
) -> Iterator[str]:
    """Start a run, log params and tags; yield the run id.

    With `resume_file` (kept next to the training checkpoint), a process that
    resumes an interrupted training continues the interrupted run instead of
    opening a second one, so the run holds every epoch. An exception inside
    marks the run FAILED (mlflow's context manager does that).
    """
    with reaching_the_store("no training started"):
        mlflow = connect()
        experiment_id = ensure_experiment(experiment)
        location = mlflow.get_experiment(experiment_id).artifact_location
        problem = write_problem(location)  # before training, not at logging the model
        if problem:
            raise StoreProblem(problem)
        previous = _unfinished_run(resume_file, experiment_id) if resume_file else None
        start = {"run_id": previous} if previous else {"run_name": run_name}
        active = _start_with_system_metrics(mlflow, experiment_id=experiment_id, **start)
        try:
            resumed = {"resumed": "true"} if previous else {}
            mlflow.set_tags(without_secrets({**source_tags(), **tags, **resumed}))
            mlflow.log_params(without_secrets(params))  # identical values may be logged again
        except BaseException:
            with contextlib.suppress(Exception):
                mlflow.end_run("FAILED")
            raise
    with active as run:
        if resume_file:
            resume_file.parent.mkdir(parents=True, exist_ok=True)
            resume_file.write_text(run.info.run_id)
        yield run.info.run_id


def _start_with_system_metrics(mlflow, **start):
    """`mlflow.start_run` with MLflow's system metrics monitor (CPU, memory, disk, network;
    NVIDIA GPUs when nvidia-ml-py finds one), sampled every SYSTEM_METRICS_INTERVAL_S.
    A resumed run continues its system metrics' steps."""
    from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL

    # The monitor's own lines: info at start and stop, and a store failing under it as a
    # many-line warning from its thread (the training's next write reports it in one)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    logging.getLogger("mlflow.system_metrics.metrics").setLevel(logging.WARNING)
    for monitor in ("gpu_monitor", "rocm_monitor"):
        logging.getLogger(f"mlflow.system_metrics.metrics.{monitor}").addFilter(_ONCE)
    ours = not MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.defined
    if ours:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    try:  # the monitor reads the interval as it starts
        return mlflow.start_run(log_system_metrics=True, **start)
    finally:
        if ours:
            mlflow.set_system_metrics_sampling_interval(None)


class _OncePerMessage(logging.Filter):
    """Each message once: MLflow's GPU monitor warns at every sample about a reading the
    GPU does not support (power or utilisation on some boards and MIG slices)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


_ONCE = _OncePerMessage()


def _unfinished_run(resume_file: Path, experiment_id: str) -> str | None:
    """The id in `resume_file` if that run is in this store and experiment and did not finish."""
    from mlflow.exceptions import MlflowException

    try:
        run_id = resume_file.read_text().strip()
        run = mlflow_client().get_run(run_id)
    except (OSError, MlflowException):
        return None
    if run.info.experiment_id != experiment_id or run.info.status == "FINISHED":
        return None
    return run_id


def fail_abandoned_run(run_id: str, reason: str) -> None:
    """Mark an interrupted run that will never be resumed FAILED, with the reason."""
    from mlflow.exceptions import MlflowException

    with reaching_the_store("no training started"):
        client = mlflow_client()
        with contextlib.suppress(MlflowException):  # not in this store: nothing to close
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "failure_reason", reason)
                client.set_terminated(run_id, "FAILED")


def write_run_file(run_id: str, model_uri: str, out_dir: Path) -> None:
    from pipeline.atomic import write_json

    write_json(
        out_dir / RUN_FILE.name,
        {"run_id": run_id, "model_uri": model_uri, "tracking_uri": mask_uri(tracking_uri())},
    )


def read_run_file(model_dir: Path = MODEL_DIR, *, then: str | None = None) -> dict[str, str]:
    """train's record of its run (`data/model/mlflow_run.json`): missing or damaged, a
    DataError naming it. With `then`, the run must also be in the tracking store (a file
    from another store, or a deleted run, is refused by name); the store's own errors end
    with `then`, as `reaching_the_store` words them."""
    path = model_dir / RUN_FILE.name
    record = read_json(path, {"run_id": str, "model_uri": str})
    if then is None:
        return record
    from mlflow.exceptions import MlflowException

    with reaching_the_store(then):
        try:
            mlflow_client().get_run(record["run_id"])
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise damaged(
                path,
                f"names MLflow run {record['run_id']}, which the tracking store "
                f"{mask_uri(tracking_uri())} does not hold (another store's, or deleted)",
            ) from None
    return record


def epoch_logger():
    """A Keras callback that logs every epoch's metrics to the active run, step = epoch."""
    import keras

    mlflow = connect()

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch)

    return EpochLogger()


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    mlflow = connect()
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_text(text: str, name: str) -> None:
    connect().log_text(text, name)


def log_dict(data: dict, name: str) -> None:
    connect().log_dict(masked(data), name)


@contextlib.contextmanager
def reopened_run(run_id: str, *, then: str) -> Iterator[None]:
    """Resume the run started by train, for evaluate's metrics and plots; a store that
    went away since training is one line ending with `then`. No system metrics, even
    with MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING set: they are the training's."""
    with reaching_the_store(then), connect().start_run(run_id=run_id, log_system_metrics=False):
        yield


def log_metrics(metrics: dict[str, float]) -> None:
    connect().log_metrics(metrics)


def log_params(params: dict[str, Any]) -> None:
    connect().log_params(without_secrets(params))


def set_tags(tags: dict[str, str]) -> None:
    connect().set_tags(without_secrets(tags))


DATA_CARD_ARTIFACT = "data_card.json"


def model_run_id(model_uri: str, *, then: str) -> str:
    """The run that logged the model `model_uri` (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `runs:/ID/model`), where a tool adds what it measured of it.
    Read from the logged model's MLmodel; a store that fails, one line ending with `then`."""
    from pipeline.errors import ConfigError

    mlflow = connect()
    with reaching_the_store(then):
        run_id = mlflow.models.get_model_info(model_uri).run_id
    if not run_id:
        raise ConfigError(f"{model_uri!r}: the logged model names no run to log to; {then}")
    return run_id
