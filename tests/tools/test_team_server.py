"""Team tracking server: `python -m pipeline server` on a real PostgreSQL, used by a real pipeline.

The module starts PostgreSQL from the Debian packages (initdb + pg_ctl in a temp
folder, on 127.0.0.1 and a free port), starts the server against it, runs
`dvc repro` and `promote` in a copy of the project with only
MLFLOW_TRACKING_URI pointing at the server, and checks what a user would: the
run and the registry through the server, the rows in PostgreSQL, the files in
the artifact folder, nothing stored locally, the password nowhere, and a
socket on 127.0.0.1 only. Without PostgreSQL the slow tests are skipped, or
fail when PIPELINE_REQUIRE_SERVICES=1 (CI).

The quick tests need no database: each bad setting is one line naming its option.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    copy_project,
    free_port,
    missing_service,
    pipeline_env,
    run_cli,
    server_process,
    sh,
)

from pipeline.tools import server

MODEL_NAME = "digits-classifier"
EXPERIMENT = "digits-cnn"
WORKERS = 2


def one_line_error(done: subprocess.CompletedProcess, option: str) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert option in done.stderr
    assert done.stdout == ""  # nothing started, nothing announced
    return done.stderr


def group_processes(pgid: int) -> dict[int, str]:
    """pid -> command line of every live process in process group `pgid`."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found[int(stat.parent.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def listeners(port: int) -> dict[str, list[str]]:
    """Local addresses (as /proc/net/tcp{,6} write them) of sockets listening on `port`."""
    found: dict[str, list[str]] = {"tcp": [], "tcp6": []}
    for table in found:
        for line in Path("/proc/net", table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found[table].append(address)
    return found


# --- quick: one-line errors, nothing started -------------------------------------------


def test_unreachable_postgres_is_one_line_naming_the_option_with_the_password_masked(tmp_path):
    password = "hunter2-" + secrets.token_hex(4)
    uri = f"postgresql://mlflow:{password}@127.0.0.1:{free_port()}/mlflow"
    done = run_cli(["server", "--backend-store-uri", uri, "--port", str(free_port())], tmp_path)
    line = one_line_error(done, "--backend-store-uri")
    assert "postgresql://mlflow:***@127.0.0.1:" in line and "cannot connect" in line
    assert "Connection refused" in line  # the reason, from libpq
    assert password not in done.stdout + done.stderr
    assert not any(tmp_path.iterdir())  # no mlartifacts/, no mlflow.db

    # The same store from MLFLOW_BACKEND_STORE_URI, as a service manager would set it.
    done = run_cli(["server", "--port", str(free_port())], tmp_path, MLFLOW_BACKEND_STORE_URI=uri)
    assert "mlflow:***@" in one_line_error(done, "--backend-store-uri")
    assert password not in done.stderr


def test_port_in_use_is_one_line_naming_the_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        store = f"sqlite:///{tmp_path / 'm.db'}"
        done = run_cli(["server", "--backend-store-uri", store, "--port", str(port)], tmp_path)
    assert f"--port {port}: already in use" in one_line_error(done, "--port")
    assert not (tmp_path / "m.db").exists()
    done = run_cli(["server", "--port", "70000"], tmp_path)
    one_line_error(done, "--port 70000")


def test_uncreatable_artifact_folder_is_one_line_naming_the_option(tmp_path):
    (tmp_path / "a-file").write_text("")
    args = ["server", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    args += ["--artifacts-destination", str(tmp_path / "a-file" / "artifacts")]
    done = run_cli([*args, "--port", str(free_port())], tmp_path)
    assert "cannot create the folder" in one_line_error(done, "--artifacts-destination")


def test_masking_warning_and_client_uri():
    assert (
        server.mask_uri("postgresql+psycopg2://u:p%40ss@db:5432/mlflow?sslmode=require")
        == "postgresql+psycopg2://u:***@db:5432/mlflow?sslmode=require"
    )
    assert (
        server.mask_uri("postgresql://u@db/m?password=x&a=b")
        == "postgresql://u@db/m?password=***&a=b"
    )
    assert server.mask_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert server.scrub("failed for p@ss and p%40ss", "postgresql://u:p%40ss@db/m") == (
        "failed for *** and ***"
    )
    assert server.exposure_warning("127.0.0.1") is None
    assert server.exposure_warning("localhost") is None and server.exposure_warning("::1") is None
    warning = server.exposure_warning("0.0.0.0")
    assert "reachable from the network" in warning and "no authentication" in warning
    assert server.client_uri("127.0.0.1", 5000) == "http://127.0.0.1:5000"
    assert server.client_uri("::1", 5000) == "http://[::1]:5000"
    assert server.client_uri("0.0.0.0", 5000) == f"http://{socket.getfqdn()}:5000"


def test_importing_the_command_stays_light():
    code = (
        "import sys, pipeline.tools.server; "
        "print(sorted({'mlflow', 'psycopg2'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=pipeline_env(), cwd=ROOT
    )
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.slow
def test_sigterm_to_the_server_stops_its_workers(tmp_path):
    """Stopping the one process a service manager knows about stops uvicorn's workers too."""
    port = free_port()
    args = [sys.executable, "-m", "pipeline", "server", "--port", str(port)]
    args += ["--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}", "--workers", str(WORKERS)]
    url = f"http://127.0.0.1:{port}"
    with server_process(args, tmp_path, f"{url}/health", tmp_path / "server.log") as proc:
        members = group_processes(proc.pid)
        workers = [c for c in members.values() if "multiprocessing-fork" in c]
        assert len(workers) == WORKERS, members
        assert not any("huey" in c or "_job_runner" in c for c in members.values()), members
        os.kill(proc.pid, signal.SIGTERM)  # the server's own pid, not its group
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while group_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert group_processes(proc.pid) == {}, "workers outlived the server"
    assert (tmp_path / "mlartifacts").is_dir()  # the default: the project's folder
    log = (tmp_path / "server.log").read_text()
    assert f"export MLFLOW_TRACKING_URI={url}\n" in log


# --- slow: a real PostgreSQL, a real server, a real pipeline ---------------------------


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL's bin folder (or initdb on PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict]:
    """A PostgreSQL cluster of its own on 127.0.0.1, with role and database `mlflow`.

    initdb refuses root: as root the cluster belongs to the `postgres` system user
    (in a folder of /tmp it owns; pytest's own temp folders are root-only).
    """
    bin_dir = postgres_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        missing_service("no PostgreSQL server (apt-get install postgresql)")
    try:
        import psycopg2
    except ImportError:
        missing_service('no psycopg2 (pip install -e ".[server]")')
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing_service("running as root and there is no `postgres` user for initdb")
        if shutil.which("runuser") is None:
            missing_service("running as root and there is no runuser to run initdb as postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = base / "data", base / "postgres.log"
    port = free_port()

    def pg(*args: str) -> None:
        done = subprocess.run(
            [*as_user, *args], cwd=base, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            server_log = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"{args[0]} failed:\n{done.stdout}\n{done.stderr}\n{server_log}")

    pg(
        str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
    )  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off"
    pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
    try:
        password = "pw-" + secrets.token_hex(12)
        admin = psycopg2.connect(host=str(base), port=port, user="postgres", dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute("CREATE ROLE mlflow LOGIN PASSWORD %s", (password,))
            cursor.execute("CREATE DATABASE mlflow OWNER mlflow")
        admin.close()
        yield {
            "port": port,
            "password": password,
            "uri": f"postgresql://mlflow:{password}@127.0.0.1:{port}/mlflow",
        }
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory) -> Iterator[dict]:
    """`python -m pipeline server` on that database, from a folder of its own."""
    home = tmp_path_factory.mktemp("server-home")
    artifacts = tmp_path_factory.mktemp("team") / "artifacts"
    port = free_port()
    args = [sys.executable, "-m", "pipeline", "server", "--backend-store-uri", postgres["uri"]]
    args += ["--artifacts-destination", str(artifacts), "--port", str(port)]
    args += ["--workers", str(WORKERS)]
    url = f"http://127.0.0.1:{port}"
    log = home.parent / "team-server.log"
    with server_process(args, home, f"{url}/health", log) as proc:
        yield {
            "url": url,
            "port": port,
            "log": log,
            "artifacts": artifacts,
            "home": home,
            "pgid": proc.pid,  # its own session: the group of mlflow and its workers
        }


@pytest.fixture(scope="module")
def project(team_server, tmp_path_factory) -> Path:
    """A project copy that ran `dvc repro` (5 epochs) and `promote` against the team server."""
    repo = copy_project(
        tmp_path_factory.mktemp("project"),
        {"train.epochs": 5, "train.warmup_epochs": 1},
    )
    url = team_server["url"]
    sh(["dvc", "repro"], repo, MLFLOW_TRACKING_URI=url)
    done = run_cli(["promote"], repo, MLFLOW_TRACKING_URI=url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"promoted {MODEL_NAME} v1 to @champion" in done.stdout
    return repo


def client(team_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=team_server["url"], registry_uri=team_server["url"])


def the_run(team_server):
    c = client(team_server)
    experiment = c.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} on the server"
    (run,) = c.search_runs([experiment.experiment_id])
    return run


def db_rows(postgres, query: str, *args) -> list[tuple]:
    import psycopg2

    connection = psycopg2.connect(
        host="127.0.0.1",
        port=postgres["port"],
        user="mlflow",
        password=postgres["password"],
        dbname="mlflow",
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute(query, args)
            return cursor.fetchall()
    finally:
        connection.close()


@pytest.mark.slow
def test_run_and_registered_model_are_on_the_server(project, team_server):
    run = the_run(team_server)
    c = client(team_server)
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "simple_cnn" and run.data.params["train.epochs"] == "5"
    assert run.data.metrics["test_top1"] == pytest.approx(metrics["test_top1"])
    assert metrics["test_top1"] > 0.9
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val_accuracy")] == list(range(5))
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied, not a local path
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"model_summary.txt", "model_card.json", "plots", "metrics"} <= artifacts
    run_file = json.loads((project / "data/model/mlflow_run.json").read_text())
    assert run_file["run_id"] == run.info.run_id and run_file["tracking_uri"] == team_server["url"]

    version = c.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    assert c.get_model_version_by_alias(MODEL_NAME, "challenger").version == version.version
    assert float(version.tags["test_top1"]) == pytest.approx(metrics["test_top1"], rel=1e-5)


@pytest.mark.slow
def test_a_teammate_predicts_with_the_champion_through_the_server(project, team_server, tmp_path):
    """Another folder, no store of its own, only MLFLOW_TRACKING_URI: the model comes
    through the server's artifact proxy."""
    images = project / "data" / "raw" / "3"
    done = run_cli(
        ["predict", "--model", f"models:/{MODEL_NAME}@champion", str(images), "--out", "p.csv"],
        tmp_path,
        MLFLOW_TRACKING_URI=team_server["url"],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "p.csv").read_text().splitlines()[1:]
    assert len(rows) == 183 and sum(row.split(",")[1] == "3" for row in rows) > 0.9 * 183
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # no mlflow.db, no mlruns


@pytest.mark.slow
def test_runs_and_registry_are_in_postgres_and_files_in_the_artifact_folder(
    project, team_server, postgres, tmp_path, monkeypatch
):
    import mlflow

    monkeypatch.chdir(tmp_path)  # where a stray default store would appear
    run = the_run(team_server)
    query = "SELECT status, artifact_uri FROM runs WHERE run_uuid = %s"
    rows = db_rows(postgres, query, run.info.run_id)
    assert rows == [("FINISHED", run.info.artifact_uri)]
    assert db_rows(postgres, "SELECT name FROM registered_models") == [(MODEL_NAME,)]
    aliases = db_rows(
        postgres, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", MODEL_NAME
    )
    assert sorted(aliases) == [("challenger", 1), ("champion", 1)]
    (top1,) = db_rows(
        postgres,
        "SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'test_top1'",
        run.info.run_id,
    )
    assert top1[0] == pytest.approx(run.data.metrics["test_top1"])

    artifacts = team_server["artifacts"]
    experiment_id = run.info.experiment_id
    run_folder = artifacts / experiment_id / run.info.run_id / "artifacts"
    assert (run_folder / "model_card.json").is_file()
    assert (run_folder / "plots" / "confusion_matrix.png").stat().st_size > 1000
    (mlmodel,) = artifacts.glob(f"{experiment_id}/models/*/artifacts/MLmodel")
    assert list(mlmodel.parent.rglob("*.keras")), "no Keras file next to MLmodel"
    # Through the server, as a client would. Not download_artifacts("models:/NAME/1", ...):
    # mlflow 3.17 ignores its tracking_uri/registry_uri there and opens ./mlflow.db.
    location = client(team_server).get_model_version_download_uri(MODEL_NAME, "1")
    assert location.startswith("mlflow-artifacts:/")
    downloaded = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{location}/MLmodel",
        dst_path=str(tmp_path),
        tracking_uri=team_server["url"],
    )
    assert Path(downloaded).read_bytes() == mlmodel.read_bytes()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_nothing_stored_locally_and_the_password_nowhere(project, team_server, postgres):
    for folder in (project, team_server["home"]):
        for name in ("mlflow.db", "mlartifacts", "mlruns"):
            assert not (folder / name).exists(), folder / name
    password = postgres["password"]
    log = team_server["log"].read_text()
    assert f"export MLFLOW_TRACKING_URI={team_server['url']}\n" in log
    assert f"postgresql+psycopg2://mlflow:***@127.0.0.1:{postgres['port']}/mlflow" in log
    assert "Creating initial MLflow database tables" in log  # it migrated this database
    assert password not in log

    c = client(team_server)
    run = the_run(team_server)
    assert password not in json.dumps([run.data.params, run.data.tags])
    version = c.get_model_version(MODEL_NAME, "1")
    assert password not in json.dumps([version.tags, version.description, version.source])
    processes = group_processes(team_server["pgid"])
    assert sum("multiprocessing-fork" in c for c in processes.values()) == WORKERS, processes
    for cmdline in processes.values():  # argv is world-readable (ps); the URI goes by env
        assert password not in cmdline


@pytest.mark.slow
def test_server_listens_on_loopback_only(team_server):
    bound = listeners(team_server["port"])
    assert bound["tcp"] and set(bound["tcp"]) == {"0100007F"}, bound  # 127.0.0.1
    assert bound["tcp6"] == [], bound


@pytest.mark.slow
def test_wrong_password_is_one_line_naming_the_option(postgres, tmp_path):
    wrong = "not-" + postgres["password"]
    uri = f"postgresql://mlflow:{wrong}@127.0.0.1:{postgres['port']}/mlflow"
    done = run_cli(["server", "--backend-store-uri", uri, "--port", str(free_port())], tmp_path)
    line = one_line_error(done, "--backend-store-uri")
    assert "password authentication failed" in line
    assert wrong not in line and postgres["password"] not in line


@pytest.mark.slow
def test_password_from_pgpass_instead_of_the_uri(postgres, tmp_path):
    """docs/team-server.md's advice: no password in the URI, libpq's password file instead.

    The database check comes before the artifact folder's, so an error about the
    folder means the login worked.
    """
    uri = f"postgresql://mlflow@127.0.0.1:{postgres['port']}/mlflow"
    (tmp_path / "a-file").write_text("")
    args = ["server", "--backend-store-uri", uri, "--port", str(free_port())]
    args += ["--artifacts-destination", str(tmp_path / "a-file" / "artifacts")]
    no_password = run_cli(args, tmp_path, PGPASSFILE=str(tmp_path / "none"))
    one_line_error(no_password, "--backend-store-uri")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{postgres['port']}:mlflow:mlflow:{postgres['password']}\n")
    pgpass.chmod(0o600)
    done = run_cli(args, tmp_path, PGPASSFILE=str(pgpass))
    one_line_error(done, "--artifacts-destination")
