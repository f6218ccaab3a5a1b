"""The tracking store: which one (MLFLOW_TRACKING_URI, else this project's SQLite
`mlflow.db`), opening it safely, and its errors as one line.

`pipeline.tracking` is the only package that imports mlflow (and `pipeline.serving`,
the logged model's own code): `store` here, `runs` for the training run, `logged_models`,
`model_registry` and `reports`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.redact import mask_uri, mask_urls_in, masked

DEFAULT_DB = Path("mlflow.db")
DEFAULT_ARTIFACTS = Path("mlartifacts")


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


def connect():
    import mlflow

    mlflow.set_tracking_uri(_opened(tracking_uri()))
    return mlflow


def mlflow_client():
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

        with machine_lock("store", uri):
            MlflowClient(tracking_uri=uri)  # opens the store: creates its tables if new
        _OPENED.add(uri)
    return uri


def ensure_experiment(name: str) -> str:
    """The experiment's id, created on first use; artifacts go to `mlartifacts/` by default."""
    mlflow = connect()
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


def without_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """URL values with passwords, tokens and signatures masked: params, tags and logged
    files are visible to everyone who can open the MLflow UI."""
    return {k: masked(v) for k, v in values.items()}


@contextlib.contextmanager
def machine_lock(kind: str, key: str) -> Iterator[None]:
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
