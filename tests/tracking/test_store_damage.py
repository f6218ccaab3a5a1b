"""The tracking store damaged, read-only or shared by users, and a registry pointing at
model files that are gone: every command that touches the store says so in one line
naming the store (or the file) and what to do, exits 2, and loses nothing already there.

One real project (trained, evaluated and registered in-process) is copied per test: a
copy has its own `mlflow.db`, so MLflow opens it afresh, as a new process would. The
read-only and cross-user cases run as other users (`nobody`, `daemon`) in real
processes, since we are root; those keep the right to read every file
(CAP_DAC_READ_SEARCH: the interpreter lives under root's 0700 home) and none to write.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import PARAMS, QUICK_RUN, edit_params, free_port, pipeline_env, png_bytes

from pipeline.__main__ import main
from pipeline.tracking import store as tracking_store

NAME = yaml.safe_load(PARAMS.read_text())["register"]["model_name"]
EXPERIMENT = yaml.safe_load(PARAMS.read_text())["mlflow"]["experiment"]


def cli(args: list[str]) -> tuple[int, str]:
    """`python -m pipeline ARGS` in-process: (exit code, stderr). MLflow exports the URI it
    was given to the environment; each call starts without it, as a new process would."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return code, err.getvalue()


def error_line(code: int, err: str) -> str:
    """The one `error:` line of a failed command (and no traceback)."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_prepared) -> Path:
    """A project trained, evaluated and registered (version 1, @challenger) for real."""
    base = tmp_path_factory.mktemp("trained") / "project"
    shutil.copytree(digits_prepared, base / "data" / "prepared")
    edit_params(base / "params.yaml", QUICK_RUN)
    (base / "images").mkdir()
    for i in range(2):
        (base / "images" / f"{i}.png").write_bytes(png_bytes(40 * i, size=16))
    with contextlib.chdir(base):
        for stage in ("train", "evaluate", "register"):
            code, err = cli([stage])
            assert code == 0, err[-3000:]
    return base


@pytest.fixture
def project(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained project to damage, as the working directory."""
    copy = tmp_path / "project"
    shutil.copytree(trained, copy)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield copy
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow exports it


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# Every command that touches the store, and how its line ends (what was kept).
COMMANDS = {
    "train": (["train"], "no training started"),
    "evaluate": (["evaluate"], "metrics/eval.json is written; rerun evaluate when it answers"),
    "register": (["register"], "nothing new is registered; rerun register when it answers"),
    "promote": (["promote"], "no alias was moved"),
    "compare": (
        ["compare", "--experiment", EXPERIMENT, "--out", "report"],
        "no report was written",
    ),
    "predict": (["predict", "images", "--model", f"models:/{NAME}@challenger"], ""),
}


def damage(db: Path, kind: str) -> None:
    data = db.read_bytes()
    if kind == "truncated":
        db.write_bytes(data[: len(data) // 3])
    elif kind == "random-bytes":
        db.write_bytes(os.urandom(len(data)))
    elif kind == "zero-bytes":
        db.write_bytes(b"")
    elif kind == "deleted":
        db.unlink()


DAMAGE = {
    "truncated": "is damaged (database disk image is malformed; left as it is)",
    "random-bytes": "is not an SQLite database (damaged or overwritten; left as it is)",
    "zero-bytes": "is empty (0 bytes) but the artifact folder",
    "deleted": "is missing but the artifact folder",
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_store_is_one_line_from_every_command_and_stays_as_it_was(project, kind):
    """mlflow.db truncated, overwritten, emptied or deleted (mlartifacts/ still full):
    each command names the file and what is wrong, exits 2, and leaves it as it was;
    MLflow never starts an empty store over it."""
    db = project / "mlflow.db"
    damage(db, kind)
    before = db.read_bytes() if db.exists() else None
    artifacts = files_under(project / "mlartifacts")
    commands = dict(COMMANDS)
    if kind != "truncated":  # the server checks the file; a whole header would start it
        commands["server"] = (["server", "--port", str(free_port())], "")
    for name, (args, kept) in commands.items():
        line = error_line(*cli(args))
        assert line.startswith(f"error: MLFLOW_TRACKING_URI sqlite:///{db}: {db} ") or (
            name == "server" and line.startswith(f"error: --backend-store-uri sqlite:///{db}: ")
        ), (name, line)
        assert DAMAGE[kind] in line and line.endswith(kept), (name, line)
    assert (db.read_bytes() if db.exists() else None) == before
    assert files_under(project / "mlartifacts") == artifacts
    assert not (project / "report").exists() and not (project / "predictions").exists()


class Failing(BaseHTTPRequestHandler):
    """A tracking server that answers every request with `answer`: (status, type, body)."""

    answer = (500, "text/plain", b"Internal Server Error")

    def _reply(self):
        status, kind, body = self.answer
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _reply

    def log_message(self, *args):
        pass


ANSWERS = {
    "500": ((500, "text/plain", b"oops"), "the server answered HTTP 500 to every try"),
    "404-page": ((404, "text/html", b"<html>no</html>"), "answered HTTP 404 with a web page"),
    "login-page": ((200, "text/html", b"<html>log in</html>"), "is not MLflow's API"),
}


@pytest.mark.parametrize("answer", ANSWERS)
def test_a_tracking_server_answering_errors_is_one_line(project, monkeypatch, answer):
    """A server (or a proxy in front of it) that answers errors or a web page: one line
    naming MLFLOW_TRACKING_URI and the answer; promote does not take it for a missing
    challenger or champion."""
    handler = type("Handler", (Failing,), {"answer": ANSWERS[answer][0]})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setattr(tracking_store, "tracking_uri", lambda: uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        for name in ("register", "promote", "compare", "predict"):
            args, kept = COMMANDS[name]
            line = error_line(*cli(args))
            assert line.startswith(f"error: MLFLOW_TRACKING_URI {uri}: cannot use the tracking")
            assert ANSWERS[answer][1] in line and line.endswith(kept), (name, line)
    finally:
        httpd.shutdown()
        httpd.server_close()


def as_user(user: str, code: str, cwd: Path, home: Path, *args: str):
    """Python `code` run by `user`, who may read every file but write only where the
    permission bits allow."""
    home.mkdir(exist_ok=True)
    home.chmod(0o777)
    caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    ids = [f"--reuid={user}", f"--regid={user if user != 'nobody' else 'nogroup'}"]
    return subprocess.run(
        ["setpriv", *ids, "--clear-groups", *caps, sys.executable, "-c", code, *args],
        cwd=cwd,
        env=pipeline_env(HOME=str(home), USER=user, PYTHONDONTWRITEBYTECODE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )


# Runs commands in one process (imports once), each in its folder; prints one RESULT line
# per command: [folder, name, exit code, error line, whether a traceback was printed].
COMMANDS_AS_USER = """
import contextlib, io, json, os, sys
from pipeline.__main__ import main
for folder, name, args in json.loads(sys.argv[1]):
    os.chdir(folder)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    lines = [l for l in err.getvalue().splitlines() if l.startswith("error:")]
    traceback = err.getvalue()[:6000] if "Traceback" in err.getvalue() else ""
    print("RESULT", json.dumps([folder, name, code, lines[-1] if lines else "", traceback]))
"""

# Per read-only place: what the refusals name after "read-only: cannot write", and the
# commands that still work there (they only read the store, or write what is writable).
READ_ONLY = {
    "file": ("mlflow.db (the file is not writable by this user)", {"compare-no-log", "predict"}),
    "folder": ("mlflow.db (its folder", {"compare-no-log", "predict"}),
    "artifacts": ("mlartifacts", {"compare-no-log", "predict", "register", "promote"}),
}


def test_a_read_only_store_refuses_writes_in_one_line_and_still_reads(trained, tmp_path):
    """mlflow.db, its folder, or the artifact folder not writable by the user running the
    commands (`nobody`): those that write exit 2 with "read-only: cannot write ..." and
    what was kept; compare --no-log and predict --model, which only read, work; the
    store is unchanged."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    commands, before = [], {}
    for where in READ_ONLY:
        project = tmp_path / where
        shutil.copytree(trained, project)
        # The copies' runs keep their artifacts in the trained project's mlartifacts/,
        # root's: not writable by nobody.
        for path in [project, *project.rglob("*")]:
            shutil.chown(path, "nobody")
        before[where] = (project / "mlflow.db").read_bytes()
        report = ["compare", "--experiment", EXPERIMENT, "--out"]
        commands += [
            [str(project), "train", ["train"]],
            [str(project), "register", ["register"]],
            [str(project), "promote", ["promote"]],
            [str(project), "compare", [*report, str(out / where / "logged")]],
            [str(project), "compare-no-log", [*report, str(out / where / "report"), "--no-log"]],
            [
                str(project),
                "predict",
                [*COMMANDS["predict"][0], "--out", str(out / f"{where}.csv")],
            ],
        ]
    (tmp_path / "file" / "mlflow.db").chmod(0o444)
    (tmp_path / "folder").chmod(0o555)
    done = as_user("nobody", COMMANDS_AS_USER, tmp_path, tmp_path / "home", json.dumps(commands))
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line[:7] == "RESULT "]
    assert len(results) == len(commands), done.stdout[-3000:]
    kept = {name: then for name, (_, then) in COMMANDS.items()}
    kept["compare"] = "no report was written (--no-log writes it without logging it)"
    for folder, name, code, line, traceback in results:
        where = Path(folder).name
        wrong, works = READ_ONLY[where]
        assert not traceback, (where, name, traceback)
        if name in works:
            assert code == 0, (where, name, line)
            continue
        assert code == 2 and line.startswith("error: MLFLOW_TRACKING_URI sqlite:///"), line
        assert "read-only: cannot write " in line and wrong in line, (where, name, line)
        assert line.endswith(kept[name]), (where, name, line)
    for where in ("file", "folder"):
        assert (tmp_path / where / "mlflow.db").read_bytes() == before[where]
        assert not (out / where / "logged").exists()  # refused before writing the report
        assert (out / f"{where}.csv").read_text().count("\n") == 3  # header, two images
        assert (out / where / "report" / "report.md").is_file()


def log_trained_model(top1: float) -> dict[str, str]:
    """A tiny real model logged in a run of EXPERIMENT with `test_top1`, as train and
    evaluate leave it: the run file in data/model and metrics/eval.json."""
    from pipeline.models.architectures import build_model
    from pipeline.tracking import logged_models, runs

    card = {"classes": ["a", "b", "c"], "image_shape": [8, 8, 1], "task": "classification"}
    model = build_model("simple_cnn", (8, 8, 1), 3, width_multiplier=0.25)
    with runs.training_run(EXPERIMENT, run_name="t", params={}, tags={}) as run_id:
        model_uri = logged_models.log_model(model, card=card)
        runs.log_metrics({"test_top1": top1})
    Path("data/model").mkdir(parents=True, exist_ok=True)
    runs.write_run_file(run_id, model_uri, Path("data/model"))
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/eval.json").write_text(json.dumps({"test_top1": top1}))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return {"run_id": run_id, "model_uri": model_uri}


def test_register_and_promote_refuse_a_model_whose_files_are_gone(tmp_path, monkeypatch):
    """A logged model whose Keras file is damaged, or whose files were deleted with
    mlartifacts/: promote and register refuse in one line naming the version or run
    and the file; nothing is registered and no alias moves. predict --model names the
    missing file too."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(PARAMS, "params.yaml")
    first = log_trained_model(0.9)
    assert cli(["register"])[0] == 0
    client = MlflowClient(tracking_store.tracking_uri())
    (keras_file,) = Path("mlartifacts").rglob("model.keras")
    keras_file.write_bytes(keras_file.read_bytes()[:1000])  # cut short

    line = error_line(*cli(["promote"]))
    assert line.startswith(f"error: promote: {NAME} v1 (run {first['run_id']}) ")
    assert "artifacts/model.keras" in line and line.endswith("; no alias was moved"), line
    with pytest.raises(Exception, match="alias champion not found"):
        client.get_model_version_by_alias(NAME, "champion")

    second = log_trained_model(0.95)
    shutil.rmtree("mlartifacts")
    line = error_line(*cli(["register"]))
    assert line == (
        f"error: register: run {second['run_id']}'s model {second['model_uri']!r}: the "
        "logged model's file MLmodel is missing from the tracking store's artifacts "
        "(deleted?); log it again: `dvc repro -f train`; nothing is registered and no "
        "alias moved"
    )
    assert [v.version for v in client.search_model_versions(f"name='{NAME}'")] == [1]
    assert client.get_model_version_by_alias(NAME, "challenger").version == 1
    Path("images").mkdir()
    Path("images/0.png").write_bytes(png_bytes(size=8))
    line = error_line(*cli(["predict", "images", "--model", f"models:/{NAME}/1"]))
    assert "the logged model's file MLmodel is missing" in line, line


PROMOTE_AS_USER = "import sys; from pipeline.__main__ import main; sys.exit(main(sys.argv[1:]))"


def test_promotions_by_two_users_share_the_lock(trained, tmp_path):
    """Two users promote in one store, one after the other: the lock files the first
    leaves beside the store (mode 0666) are the second's to lock too (they were the
    first user's 0644 files in the temp folder: a PermissionError traceback). A lock
    file another user left unwritable is one line naming it."""
    shared = tmp_path / "shared"
    shutil.copytree(trained, shared)
    shared.chmod(0o777)  # both users write the store: SQLite writes beside the file
    (shared / "mlflow.db").chmod(0o666)
    for path in shared.glob("mlflow.db-*.lock"):
        path.unlink()  # the trained project's (root's): let the users make their own
    # nobody opens the store and takes the promotion lock (a version it lacks: no load)
    done = as_user(
        "nobody", PROMOTE_AS_USER, shared, tmp_path / "home-n", "promote", "--version", "9"
    )
    assert error_line(done.returncode, done.stderr).endswith(
        f"{NAME!r} has no version 9 (RESOURCE_DOES_NOT_EXIST)"
    )
    done = as_user("daemon", PROMOTE_AS_USER, shared, tmp_path / "home-d", "promote")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"promoted {NAME} v1 to @champion" in done.stdout
    lock = shared / "mlflow.db-promote.lock"
    assert lock.stat().st_uid == 65534 and lock.stat().st_mode & 0o777 == 0o666

    lock.chmod(0o644)  # as a user with umask 022 would leave it without filelock's mode
    done = as_user("daemon", PROMOTE_AS_USER, shared, tmp_path / "home-d", "promote")
    line = error_line(done.returncode, done.stderr)
    assert line == (
        f"error: MLFLOW_TRACKING_URI sqlite:///{shared}/mlflow.db: cannot use the tracking "
        f"store: cannot lock {lock} (Permission denied, owned by uid 65534); it holds no data: "
        "its owner can remove it, or make it writable by all (chmod 666); no alias was moved"
    )


LOCK_AS_USER = """
import sys
import tempfile
from pipeline.tracking.store import store_lock
with store_lock("promote", sys.argv[1]):
    print("locked")
"""


def test_a_remote_store_lock_is_shared_by_users(tmp_path):
    """A remote store's lock lives in the temp folder's pipeline-locks/, which every user
    can write: the lock file one user made, another user locks."""
    uri = f"http://mlflow.example:5000/{os.getpid()}-{tmp_path.name}"
    try:
        for user in ("nobody", "daemon"):
            done = as_user(user, LOCK_AS_USER, tmp_path, tmp_path / f"home-{user}", uri)
            assert done.returncode == 0 and done.stdout == "locked\n", done.stderr[-3000:]
        lock = tracking_store._lock_file("promote", uri)
        assert lock.parent == Path(tempfile.gettempdir()) / "pipeline-locks"
        assert lock.stat().st_uid == 65534 and lock.stat().st_mode & 0o777 == 0o666
    finally:
        tracking_store._lock_file("promote", uri).unlink(missing_ok=True)
