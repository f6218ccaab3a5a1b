"""The tracking store: which one (MLFLOW_TRACKING_URI, else this project's SQLite
`mlflow.db`), opening it safely, its locks, and its errors as one line.

`pipeline.tracking` is the only package that imports mlflow (and `pipeline.serving`,
the logged model's own code): `store` here, `runs` for the training run, `logged_models`,
`model_registry` and `reports`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.redact import mask_uri, mask_urls_in, masked

DEFAULT_DB = Path("mlflow.db")
DEFAULT_ARTIFACTS = Path("mlartifacts")
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database


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


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI; None for other stores and in-memory."""
    scheme, sep, rest = uri.partition(":///")
    if not sep or scheme.split("+", 1)[0].lower() != "sqlite":
        return None
    path = rest.split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_folder(uri: str) -> Path | None:
    """The local folder holding the default store's artifacts (`mlartifacts/`); None for
    other stores, whose artifact locations this project does not choose."""
    return project_root() / DEFAULT_ARTIFACTS if uri == default_tracking_uri() else None


def connect():
    import mlflow

    mlflow.set_tracking_uri(_opened(tracking_uri()))
    return mlflow


def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=_opened(tracking_uri()))


_OPENED: set[str] = set()


def _opened(uri: str) -> str:
    """`uri`, a SQLite store checked and first opened by one process at a time.

    MLflow creates the tables of a missing or empty SQLite file when a process first
    opens it: right for a new store, wrong for one that held runs (a deleted or
    zero-byte `mlflow.db` beside a full `mlartifacts/`) or for a file that is not a
    database, so those are refused first (`sqlite_file_problem`). The tables are also
    created without a lock: two processes opening a new `mlflow.db` at once (`dvc queue
    start -j 2`) both create them and one fails ("table ... already exists"). Under a
    lock per store, the second finds them made.
    """
    _quiet_store_tracebacks()
    db = sqlite_file(uri)
    if db is not None and uri not in _OPENED:
        from mlflow import MlflowClient

        # A user who cannot create the lock file cannot write the folder, so cannot
        # create tables in it either (SQLite writes its journal there): reading needs no lock.
        with store_lock("open", uri, optional=True), reaching_the_store():
            problem = sqlite_file_problem(db, artifact_folder(uri))
            if problem:
                raise StoreProblem(problem)
            MlflowClient(tracking_uri=uri)  # opens the store: creates its tables if new
    _OPENED.add(uri)
    return uri


class _NoTraceback(logging.Filter):
    """Drops MLflow's log of a database error it raises again, traceback and all: the
    error reaches `reaching_the_store`, which says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


def _quiet_store_tracebacks() -> None:
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _NoTraceback) for f in logger.filters):
        logger.addFilter(_NoTraceback())


def sqlite_file_problem(db: Path, artifacts: Path | None) -> str | None:
    """What makes `db` unfit to open as a tracking store, or None: not an SQLite
    database, or missing or empty while `artifacts` holds earlier runs' files (MLflow
    would start an empty store over them). Read before MLflow touches the file."""
    try:
        with open(db, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        head = None
    except IsADirectoryError:
        return f"{db} is a folder, not an SQLite database"
    except OSError as exc:
        return f"cannot read {db} ({exc.strerror or exc})"
    if head:
        return None if head == SQLITE_HEADER else _not_sqlite(db)
    if artifacts is None or not artifacts.is_dir() or not any(artifacts.iterdir()):
        return None  # a new store
    state = "missing" if head is None else "empty (0 bytes)"
    return (
        f"{db} is {state} but the artifact folder {artifacts} holds runs; restore "
        f"{db.name} from a backup, or move {artifacts.name}/ aside to start a new store"
    )


def _not_sqlite(db: Path) -> str:
    return (
        f"{db} is not an SQLite database (damaged or overwritten; left as it is): "
        "restore it from a backup, or move it aside to start a new store"
    )


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


class StoreProblem(ConfigError):
    """The tracking store cannot be used: one line naming MLFLOW_TRACKING_URI, what is wrong
    and, once a caller says it (`then`), what was kept."""

    def __init__(self, problem: str, then: str = ""):
        self.problem, self.then = problem, then
        super().__init__(
            f"MLFLOW_TRACKING_URI {mask_uri(tracking_uri())}: {problem}"
            + (f"; {then}" if then else "")
        )


@contextlib.contextmanager
def reaching_the_store(then: str = "", *, file_errors: bool = True) -> Iterator[None]:
    """A tracking store that cannot be reached, read, written or locked as one line
    naming it (password masked), what is wrong and what to do (`store_problem`) and, in
    `then`, what was kept. MLflow's own bounded HTTP retries
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES) and SQLite's busy wait come first.

    `file_errors=False` leaves OSErrors alone, but for a file of the store's artifact
    folder it cannot write: around training, a full disk is not the store's fault.
    """
    import sqlite3

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError  # SQLite stores: "database is locked"

    try:
        yield
    except StoreProblem as exc:
        if exc.then or not then:
            raise
        raise StoreProblem(exc.problem, then) from None
    except (MlflowException, SQLAlchemyError, sqlite3.Error) as exc:
        raise StoreProblem(store_problem(exc), then) from None
    except OSError as exc:
        if not file_errors and not _in_artifact_folder(exc):
            raise
        raise StoreProblem(store_problem(exc), then) from None


_SQLITE_ERROR = re.compile(r"\(sqlite3\.\w+\) ([^\n\[]+)")


def store_problem(exc: BaseException) -> str:
    """What is wrong with the store, by cause, and what to do, from an error MLflow,
    SQLAlchemy, SQLite, HTTP or the file system raised using it."""
    text = str(exc).strip()
    sqlite_message = _sqlite_message(exc)
    db = sqlite_file(tracking_uri())
    if sqlite_message and db is not None:
        found = _sqlite_cause(sqlite_message, db)
        if found:
            return found
    artifacts = artifact_folder(tracking_uri())
    if isinstance(exc, OSError) and exc.errno in _PERMISSION_ERRNOS:
        where = exc.filename or "a file of the store"
        if _in_artifact_folder(exc):
            where = f"the artifact folder {artifacts} ({where})"
        return (
            f"read-only: cannot write {where} ({exc.strerror}); give this user write access "
            "to it (or run as its owner)"
        )
    if (
        artifacts is not None
        and not artifacts.is_dir()
        and (isinstance(exc, FileNotFoundError) or "No such artifact" in text)
    ):
        return (
            f"the artifact folder {artifacts} is missing: the runs' logged files are gone; "
            "restore it from a backup"
        )
    http = _http_cause(text)
    if http:
        return http
    reason = re.sub(r"^\(\w+(\.\w+)*\) ", "", sqlite_message or text)  # "(sqlite3.X) "
    reason = mask_urls_in(reason.splitlines()[0] if reason else type(exc).__name__)
    return f"cannot use the tracking store ({reason[:300]})"


def _in_artifact_folder(exc: OSError) -> bool:
    """A permission error on a file of the default store's artifact folder."""
    artifacts = artifact_folder(tracking_uri())
    if artifacts is None or exc.errno not in _PERMISSION_ERRNOS or not exc.filename:
        return False
    return Path(os.fsdecode(exc.filename)).resolve().is_relative_to(artifacts)


def write_problem(artifact_location: str | None) -> str | None:
    """Why this user cannot write the store, checked before training (a run would train
    for nothing and fail at logging its model): a SQLite file or folder it cannot write,
    or a local artifact location it cannot write. None when it can, or cannot tell."""
    db = sqlite_file(tracking_uri())
    if db is not None and (problem := _unwritable_db(db)):
        return problem
    if not artifact_location or not artifact_location.startswith("file:"):
        return None
    from urllib.parse import unquote, urlsplit

    folder = Path(unquote(urlsplit(artifact_location).path))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # MLflow creates the missing part
    if os.access(folder, os.W_OK | os.X_OK, effective_ids=True):
        return None
    return (
        f"read-only: cannot write the artifact folder {folder} (not writable by this user); "
        "give this user write access to it (or run as its owner)"
    )


def _unwritable_db(db: Path, message: str = "") -> str | None:
    """`db` or its folder not writable by this user, as the line's problem; else None."""
    if db.exists() and not os.access(db, os.W_OK, effective_ids=True):
        why = "the file is not writable by this user"
    elif db.parent.is_dir() and not os.access(db.parent, os.W_OK | os.X_OK, effective_ids=True):
        why = f"its folder {db.parent} is not writable by this user; SQLite writes beside it"
    elif message:
        why = message
    else:
        return None
    return (
        f"read-only: cannot write {db} ({why}); give this user write access to the file "
        "and its folder (or run as their owner); commands that only read still work"
    )


def _sqlite_message(exc: BaseException) -> str:
    """SQLite's own words inside `exc`: MLflow and SQLAlchemy wrap them, sometimes after a
    note of their own ("raised as a result of Query-invoked autoflush")."""
    import sqlite3

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        orig = getattr(current, "orig", None)
        if isinstance(current, sqlite3.Error):
            return str(current)
        if isinstance(orig, sqlite3.Error):
            return str(orig)
        found = _SQLITE_ERROR.search(str(current))
        if found:
            return found[1].strip()
        current = current.__cause__ or current.__context__
    return ""


def _sqlite_cause(message: str, db: Path) -> str | None:
    """A SQLite error on `db` by cause, with what to do; None for others (locked, ...)."""
    lowered = message.lower()
    if "file is not a database" in lowered:
        return _not_sqlite(db)
    if "malformed" in lowered:
        return (
            f"{db} is damaged ({message}; left as it is): restore it from a backup, or try "
            f"`sqlite3 {db} .recover`"
        )
    if "readonly" in lowered or "read-only" in lowered or "unable to open" in lowered:
        if not db.parent.is_dir():
            return f"cannot use the tracking store: folder {db.parent} does not exist"
        return _unwritable_db(db, "" if "unable to open" in lowered else message)
    return None


def _http_cause(text: str) -> str | None:
    """A tracking server's bad answer by cause: errors on every retry, an HTTP error page,
    or a body that is not MLflow's API (a login page or a proxy in front of it)."""
    retried = re.search(r"too many (\d{3}) error responses", text)
    if retried:
        return (
            f"cannot use the tracking store: the server answered HTTP {retried[1]} to every "
            "try; check the server's log"
        )
    status = re.search(r"failed with error code (\d{3}) != 200", text)
    if status:
        page = " with a web page, not MLflow's API" if "<html" in text.lower() else ""
        return (
            f"cannot use the tracking store: the server answered HTTP {status[1]}{page}; "
            "check that MLFLOW_TRACKING_URI is the MLflow server's address"
        )
    if "not in a valid JSON format" in text:
        return (
            "cannot use the tracking store: the server's answer is not MLflow's API (a login "
            "page or a proxy?); check that MLFLOW_TRACKING_URI is the MLflow server's address"
        )
    return None


def without_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """URL values with passwords, tokens and signatures masked: params, tags and logged
    files are visible to everyone who can open the MLflow UI."""
    return {k: masked(v) for k, v in values.items()}


LOCK_FOLDER = "pipeline-locks"
_PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def store_lock(kind: str, uri: str, *, optional: bool = False) -> Iterator[None]:
    """An exclusive lock on `kind` of work (`open`, `promote`) on the store at `uri`, among
    this machine's processes, whoever runs them.

    A local store's lock lives beside it (`mlflow.db-promote.lock`): everyone who writes
    the store can write its folder. A remote store's lives in `pipeline-locks/` in the temp
    folder, made writable by every user and not sticky (filelock refuses, in a sticky
    folder, a lock file another user owns). Lock files are made read-write for all (mode
    0666, whatever the umask), so another user's lock file is one this user can lock.
    With `optional`, a lock file this user cannot create or open is skipped.
    """
    from filelock import FileLock

    try:
        path = _lock_file(kind, uri)
        lock = FileLock(path, mode=0o666)
        lock.acquire()
    except OSError as exc:
        if not (optional and exc.errno in _PERMISSION_ERRNOS):
            raise StoreProblem(_lock_problem(Path(exc.filename or kind), exc, uri)) from None
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _lock_file(kind: str, uri: str) -> Path:
    import hashlib
    import tempfile

    local = sqlite_file(uri) or _file_store(uri)
    if local is not None:
        return local.absolute().with_name(f"{local.name}-{kind}.lock")
    folder = Path(tempfile.gettempdir()) / LOCK_FOLDER
    if not folder.is_dir():
        made = Path(tempfile.mkdtemp(prefix=f".{LOCK_FOLDER}-", dir=folder.parent))
        made.chmod(0o777)  # every user's processes create lock files in it
        try:
            made.rename(folder)  # whole or not at all: never a folder others cannot write
        except OSError:
            made.rmdir()  # another process made it first
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return folder / f"{kind}-{digest}.lock"


def _file_store(uri: str) -> Path | None:
    """The folder of a local file store (`file:///PATH` or a plain path); None otherwise."""
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlsplit

        return Path(unquote(urlsplit(uri).path))
    remote = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", uri) or uri.startswith("databricks")
    return None if remote else Path(uri)


def _lock_problem(path: Path, exc: OSError, uri: str) -> str:
    if not path.parent.is_dir():
        return f"cannot use the tracking store: folder {path.parent} does not exist"
    db = sqlite_file(uri)
    if db is not None and (problem := _unwritable_db(db)):
        return problem
    owner = ""
    with contextlib.suppress(OSError):
        owner = f", owned by uid {path.stat().st_uid}"
    return (
        f"cannot use the tracking store: cannot lock {path} ({exc.strerror or exc}{owner}); "
        "it holds no data: its owner can remove it, or make it writable by all (chmod 666)"
    )
