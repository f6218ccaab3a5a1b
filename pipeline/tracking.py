"""Everything MLflow: the run that spans train and evaluate, logging, and the registry.

Stages are separate processes, so the run is shared through a file: train
starts the run and writes its id to `data/model/mlflow_run.json` (a DVC output
next to the model); evaluate reopens the run by that id to add test metrics and
plots; register registers the model logged in that run. A DVC cache hit of
train therefore keeps pointing at the run that produced the cached model.

Only this module imports mlflow, but for `serving`, the logged model's own code.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.data.layout import MODEL_DIR
from pipeline.errors import PipelineError, PromotionRefused
from pipeline.redact import mask_uri, mask_urls_in, masked

RUN_FILE = MODEL_DIR / "mlflow_run.json"
DEFAULT_DB = Path("mlflow.db")
DEFAULT_ARTIFACTS = Path("mlartifacts")
CHALLENGER, CHAMPION = "challenger", "champion"


def project_root(cwd: Path | None = None) -> Path:
    """The repo root the default store belongs to.

    DVC stages run in the repo root, except queued and `--temp` experiments,
    which run in a copy under `<repo>/.dvc/tmp/exps/`: their runs belong in the
    repo's store, not in a copy that DVC deletes afterwards.
    """
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / DEFAULT_DB}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else SQLite `mlflow.db` at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(_opened(tracking_uri()))
    return mlflow


def _client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=_opened(tracking_uri()))


_OPENED: set[str] = set()


def _opened(uri: str) -> str:
    """`uri`, a SQLite store first opened by one process at a time.

    MLflow creates the tables of a new SQLite database when a process first opens it,
    without a lock: two processes opening a new `mlflow.db` at once (`dvc queue start
    -j 2`) both create them and one fails ("table ... already exists"). Under a lock
    per store, the second finds them made.
    """
    if uri.startswith("sqlite:") and uri not in _OPENED:
        from mlflow import MlflowClient

        with _machine_lock("store", uri):
            MlflowClient(tracking_uri=uri)  # opens the store: creates its tables if new
        _OPENED.add(uri)
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, created on first use; artifacts go to `mlartifacts/` by default."""
    mlflow = _mlflow()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    # Not `"MLFLOW_TRACKING_URI" in os.environ`: mlflow.set_tracking_uri exports it.
    if tracking_uri() == default_tracking_uri():
        location = (project_root() / DEFAULT_ARTIFACTS).as_uri()
    # The MLflow UI opens a "custom model development" experiment on its runs, not on GenAI traces.
    kind = {"mlflow.experimentKind": "custom_model_development"}
    return mlflow.create_experiment(name, artifact_location=location, tags=kind)


def source_tags() -> dict[str, str]:
    """Tags tying a run to its code: git commit, dirty flag, and the DVC experiment name."""
    tags = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


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
        mlflow = _mlflow()
        experiment_id = ensure_experiment(experiment)
    previous = _unfinished_run(resume_file, experiment_id) if resume_file else None
    start = {"run_id": previous} if previous else {"run_name": run_name}
    with mlflow.start_run(experiment_id=experiment_id, **start) as run:
        if resume_file:
            resume_file.parent.mkdir(parents=True, exist_ok=True)
            resume_file.write_text(run.info.run_id)
        resumed = {"resumed": "true"} if previous else {}
        mlflow.set_tags(without_secrets({**source_tags(), **tags, **resumed}))
        mlflow.log_params(without_secrets(params))  # identical values may be logged again
        yield run.info.run_id


@contextlib.contextmanager
def reaching_the_store(then: str = "", *, file_errors: bool = True) -> Iterator[None]:
    """A tracking store that cannot be reached, written or locked as one line naming it
    (password masked) and, in `then`, what was kept and what to do. MLflow's own bounded
    HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES) and SQLite's busy wait come first.

    `file_errors=False` leaves OSErrors alone: around training, a full disk is not the
    store's fault.
    """
    import re

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError  # SQLite stores: "database is locked"

    from pipeline.errors import ConfigError

    store_errors = (MlflowException, SQLAlchemyError, *((OSError,) if file_errors else ()))
    try:
        yield
    except store_errors as exc:
        text = re.sub(r"^\(\w+(\.\w+)*\) ", "", str(exc).strip())  # SQLAlchemy's "(sqlite3.X) "
        reason = mask_urls_in(text.splitlines()[0] if text else type(exc).__name__)
        raise ConfigError(
            f"MLFLOW_TRACKING_URI {mask_uri(tracking_uri())}: cannot use the tracking store "
            f"({reason[:300]})" + (f"; {then}" if then else "")
        ) from None


def _unfinished_run(resume_file: Path, experiment_id: str) -> str | None:
    """The id in `resume_file` if that run is in this store and experiment and did not finish."""
    from mlflow.exceptions import MlflowException

    try:
        run_id = resume_file.read_text().strip()
        run = _client().get_run(run_id)
    except (OSError, MlflowException):
        return None
    if run.info.experiment_id != experiment_id or run.info.status == "FINISHED":
        return None
    return run_id


def fail_abandoned_run(run_id: str, reason: str) -> None:
    """Mark an interrupted run that will never be resumed FAILED, with the reason."""
    from mlflow.exceptions import MlflowException

    client = _client()
    with contextlib.suppress(MlflowException):  # not in this store: nothing to close
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "failure_reason", reason)
            client.set_terminated(run_id, "FAILED")


def write_run_file(run_id: str, model_uri: str, out_dir: Path) -> None:
    from pipeline.data.atomic import write_json

    write_json(
        out_dir / RUN_FILE.name,
        {"run_id": run_id, "model_uri": model_uri, "tracking_uri": mask_uri(tracking_uri())},
    )


def read_run_file(model_dir: Path = MODEL_DIR) -> dict[str, str]:
    path = model_dir / RUN_FILE.name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run `python -m pipeline train` first") from None


def epoch_logger():
    """A Keras callback that logs every epoch's metrics to the active run, step = epoch."""
    import keras

    mlflow = _mlflow()

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch)

    return EpochLogger()


def log_model(model, *, card: dict) -> str:
    """Log the model as the pyfunc of `pipeline.serving`; return its model URI.

    The pyfunc decodes, resizes and labels images itself; it holds the Keras
    file, the data card and a copy of this package. Requirements are given,
    not inferred: inference reloads the model in a subprocess and costs tens
    of seconds.
    """
    import tempfile

    import keras

    import pipeline
    from pipeline import serving
    from pipeline.data.atomic import write_json

    mlflow = _mlflow()
    with tempfile.TemporaryDirectory() as tmp:
        keras_file, card_file = Path(tmp, "model.keras"), Path(tmp, "data_card.json")
        model.save(keras_file)
        write_json(card_file, masked(card))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(serving.__file__).with_name("served_model.py")),
            artifacts={
                serving.KERAS_ARTIFACT: str(keras_file),
                serving.CARD_ARTIFACT: str(card_file),
            },
            code_paths=[str(Path(pipeline.__file__).parent)],
            signature=serving.signature(card),
            pip_requirements=_requirements(keras),
            metadata={"task": card.get("task", "classification"), "classes": card["classes"]},
        )
    return info.model_uri


def _requirements(keras) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    backend = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[keras.backend.backend()]
    reqs = []
    for package in ("keras", backend, "numpy", "pandas", "pillow"):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{package}=={version(package)}")
    return reqs


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    mlflow = _mlflow()
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_text(text: str, name: str) -> None:
    _mlflow().log_text(text, name)


def log_dict(data: dict, name: str) -> None:
    _mlflow().log_dict(masked(data), name)


@contextlib.contextmanager
def reopened_run(run_id: str, *, then: str) -> Iterator[None]:
    """Resume the run started by train, for evaluate's metrics and plots; a store that
    went away since training is one line ending with `then`."""
    with reaching_the_store(then), _mlflow().start_run(run_id=run_id):
        yield


def log_metrics(metrics: dict[str, float]) -> None:
    _mlflow().log_metrics(metrics)


def log_params(params: dict[str, Any]) -> None:
    _mlflow().log_params(without_secrets(params))


def set_tags(tags: dict[str, str]) -> None:
    _mlflow().set_tags(without_secrets(tags))


def without_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """URL values with passwords, tokens and signatures masked: params, tags and logged
    files are visible to everyone who can open the MLflow UI."""
    return {k: masked(v) for k, v in values.items()}


VERSION_TAGS = ("architecture", "data_hash", "git_commit", "git_dirty", "dvc_experiment")


def register(run_file: dict[str, str], name: str, *, metrics: dict[str, float]) -> str:
    """Register the run's model as a new version of `name` and alias it `challenger`.

    The version carries the test metrics and the run's provenance tags, and a
    description generated from the run (architecture, size, data, metrics).
    """
    import mlflow

    with reaching_the_store("nothing new is registered; rerun register when it answers"):
        _mlflow()
        client = _client()
        run = client.get_run(run_file["run_id"])
        tags = {k: run.data.tags[k] for k in VERSION_TAGS if k in run.data.tags}
        tags.update({k: f"{v:.6g}" for k, v in metrics.items() if isinstance(v, float)})
        version = mlflow.register_model(run_file["model_uri"], name, tags=tags)
        client.update_model_version(name, version.version, description=_describe(run, metrics))
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    return str(version.version)


def _describe(run, metrics: dict[str, float]) -> str:
    params = run.data.params
    lines = [
        f"{params.get('model.arch', '?')} trained on {params.get('data.source', '?')} "
        f"({params.get('data.image_shape', '?')}, {params.get('data.num_classes', '?')} classes).",
        f"Parameters: {params.get('model.params', '?')} "
        f"({params.get('model.trainable_params', '?')} trainable), "
        f"{params.get('model.macs', '?')} multiply-accumulates per image, "
        f"depth {params.get('model.depth', '?')}, "
        f"receptive field {params.get('model.receptive_field', '?')} px.",
        "Test: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
        f"Run: {run.info.run_id}; git commit {run.data.tags.get('git_commit', 'unknown')}.",
    ]
    return "\n".join(lines)


def promote(
    name: str, *, version: str | None, metric: str, higher_is_better: bool, force: bool
) -> tuple[str, float | None, float]:
    """Point alias `champion` at `version` (default: the challenger) if its metric is not worse.

    Returns (version, champion's figure or None, candidate's figure). A worse
    candidate raises PromotionRefused unless `force`.
    """
    with _promotion_lock(name), reaching_the_store("no alias was moved"):
        return _promote(name, version, metric, higher_is_better, force)


@contextlib.contextmanager
def _promotion_lock(name: str) -> Iterator[None]:
    """Serialize promotions of `name` in one store on this machine.

    Promotion reads the champion, compares and moves the alias: two promotes at
    once could both compare against the old champion, and the worse one could
    land last. A lock file per (store, model) in the temp folder prevents that.
    """
    with _machine_lock("promote", f"{tracking_uri()}\0{name}"):
        yield


@contextlib.contextmanager
def _machine_lock(kind: str, key: str) -> Iterator[None]:
    """An exclusive lock on `key` among this machine's processes: a file in the temp folder."""
    import fcntl
    import hashlib
    import tempfile

    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"pipeline-{kind}-{digest}.lock"
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _promote(
    name: str, version: str | None, metric: str, higher_is_better: bool, force: bool
) -> tuple[str, float | None, float]:
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        candidate = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, CHALLENGER)
        )
    except MlflowException as exc:
        what = f"version {version}" if version else f"alias {CHALLENGER!r}"
        raise PipelineError(
            f"promote: registered model {name!r} has no {what} ({exc.error_code})"
        ) from None
    new = _version_metric(client, candidate, metric)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    old = _version_metric(client, champion, metric) if champion else None
    worse = old is not None and (new < old if higher_is_better else new > old)
    if worse and not force:
        raise PromotionRefused(
            f"promote: refusing {name} v{candidate.version}: {metric} {new:.4f} is worse than "
            f"champion v{champion.version}'s {old:.4f} (use --force to override)"
        )
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return str(candidate.version), old, new


def _version_metric(client, version, metric: str) -> float:
    run = client.get_run(version.run_id)
    if metric not in run.data.metrics:
        raise PipelineError(
            f"promote: {version.name} v{version.version} has no metric "
            f"{metric!r} (register.metric); evaluate it first"
        )
    return run.data.metrics[metric]


def load_keras_model(model_uri: str, *, key: str = "train.init_from"):
    """The Keras model behind `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/ID/model`.

    A ConfigError names `key` (the param or option that gave the URI) when it does not resolve.
    """
    return load_logged_model(model_uri, key=key)[0]


def load_logged_model(model_uri: str, *, key: str) -> tuple[Any, dict]:
    """(Keras model, data card) of a model logged by training."""
    from pipeline.errors import ConfigError
    from pipeline.serving import ImageModel

    mlflow = _mlflow()
    with _naming_the_uri(model_uri, key):
        loaded = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    if not isinstance(loaded, ImageModel):
        raise ConfigError(f"{key} {model_uri!r}: not a model logged by this pipeline")
    return loaded.keras_model, loaded.card


DATA_CARD_ARTIFACT = "data_card.json"


@contextlib.contextmanager
def _naming_the_uri(model_uri: str, key: str) -> Iterator[None]:
    """MLflow's and the file system's errors about `model_uri` as one-line ConfigErrors."""
    from mlflow.exceptions import MlflowException

    from pipeline.errors import ConfigError

    try:
        yield
    except MlflowException as exc:
        text = str(exc).strip()
        first_line = text.splitlines()[0] if text else type(exc).__name__
        raise ConfigError(f"{key} {model_uri!r}: {first_line}") from None
    except OSError as exc:
        raise ConfigError(f"{key} {model_uri!r}: {exc.strerror or exc}") from None


def log_bench(records: list[dict], files: list[Path], command: str) -> str:
    """A benchmark sweep as a run of experiment `bench`: per-case metrics and the files."""
    import re

    mlflow = _mlflow()
    with mlflow.start_run(experiment_id=ensure_experiment("bench"), run_name="bench") as run:
        mlflow.set_tags({"command": command, **source_tags()})
        first = records[0] if records else {}
        mlflow.log_params(
            {k: first[k] for k in ("image_size", "batch_size", "steps", "warmup", "data")
             if k in first} | {"machine": first.get("machine", "")}
        )  # fmt: skip
        for r in records:
            if r["status"] != "ok":
                continue
            prefix = re.sub(r"[^\w.-]", "_", f"{r['arch']}.{r['framework']}.{r['backend']}.")
            prefix += f"{r['precision']}.{'xla' if r['xla'] else 'noxla'}"
            mlflow.log_metrics(
                {
                    f"{prefix}.train_images_per_s": r["train_images_per_s"],
                    f"{prefix}.infer_images_per_s": r["infer_images_per_s"],
                    f"{prefix}.peak_host_mb": r["peak_host_mb"],
                }
            )
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id


REPORT_TAG = "pipeline.report"


def experiment_runs(experiment: str) -> list[dict[str, Any]]:
    """Finished training runs of `experiment`, oldest first, with per-epoch val accuracy.

    Each: run_id, name, params, metrics, tags, and `curves` {metric: [values by epoch]}.
    Report runs (made by `compare`) are left out. A missing experiment is a ConfigError.
    """
    from pipeline.errors import ConfigError

    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(
            f"--experiment {experiment!r}: no such MLflow experiment at {tracking_uri()}"
        )
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    result = []
    for run in runs:
        if run.data.tags.get(REPORT_TAG):
            continue
        curves = {
            key: [
                m.value
                for m in sorted(
                    client.get_metric_history(run.info.run_id, key), key=lambda m: m.step
                )
            ]
            for key in ("train_accuracy", "val_accuracy", "train_loss", "val_loss")
            if key in run.data.metrics
        }
        result.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "params": dict(run.data.params),
                "metrics": dict(run.data.metrics),
                "tags": dict(run.data.tags),
                "curves": curves,
            }
        )
    return result


def log_report(experiment: str, report_dir: Path) -> str:
    """Log a comparison report folder as a run of its own in `experiment`; return its id."""
    mlflow = _mlflow()
    experiment_id = ensure_experiment(experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name="compare") as run:
        mlflow.set_tags({REPORT_TAG: "true", **source_tags()})
        mlflow.log_artifacts(str(report_dir), artifact_path="report")
        return run.info.run_id
