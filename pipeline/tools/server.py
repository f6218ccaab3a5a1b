"""`python -m pipeline server`: an MLflow tracking server for a team (docs/team-server.md).

The server keeps runs and the model registry in a backend store (PostgreSQL
for a team, the project's SQLite `mlflow.db` by default) and proxies
artifacts (`--serve-artifacts`) to one folder, so clients need nothing but
`MLFLOW_TRACKING_URI=http://HOST:PORT`.

Before it starts, each setting is checked and a bad one stops it with one line
naming the option: the database must answer, the port must be free, the
artifact folder must be creatable. Then this process becomes `mlflow server`
(exec), which forwards SIGTERM and SIGINT to its uvicorn workers, so stopping
this process stops them all. The backend store URI reaches MLflow through the
environment, never the command line (visible to every user in `ps`), and any
password in it is printed as `***`.

Only the standard library at import time: mlflow and psycopg2 are imported when used.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.errors import ConfigError
from pipeline.redact import SECRET_IN_QUERY, mask_uri

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"
CONNECT_TIMEOUT_S = 5
JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


@dataclass(frozen=True)
class ServerConfig:
    backend_store_uri: str
    artifacts_destination: str  # an absolute folder, or a remote URI such as s3://bucket/path
    host: str
    port: int
    workers: int | None
    allowed_hosts: str | None


def _secrets(uri: str) -> list[str]:
    """The password of `uri` as written and decoded, to scrub from other text."""
    found = []
    try:
        userinfo = urlsplit(uri).netloc.rsplit("@", 1)
        if len(userinfo) == 2 and ":" in userinfo[0]:
            found.append(userinfo[0].split(":", 1)[1])
    except ValueError:
        pass
    found += [m.group(0).split("=", 1)[1] for m in SECRET_IN_QUERY.finditer(uri)]
    return [s for secret in found if secret for s in {secret, unquote(secret)}]


def scrub(text: str, uri: str) -> str:
    """`text` with any password of `uri` replaced by `***`."""
    for secret in sorted(_secrets(uri), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def default_backend_store_uri() -> str:
    """MLFLOW_BACKEND_STORE_URI, else the project's SQLite `mlflow.db`."""
    from pipeline.tracking import store

    return os.environ.get(BACKEND_ENV) or store.default_tracking_uri()


def default_artifacts_destination() -> Path:
    from pipeline.tracking import store

    return store.project_root() / store.DEFAULT_ARTIFACTS


def resolve(
    *,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int | None = None,
    allowed_hosts: str | None = None,
) -> ServerConfig:
    """Defaults filled in and every setting checked; a bad one is a one-line ConfigError."""
    uri = backend_store_uri or default_backend_store_uri()
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    check_port(host, port)
    check_backend_store(uri)
    destination = check_artifacts_destination(artifacts_destination)  # creates it: last
    return ServerConfig(with_driver(uri), destination, host, port, workers, allowed_hosts or None)


def with_driver(uri: str) -> str:
    """A bare postgresql:// URI with psycopg2 as SQLAlchemy's driver.

    SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the `server` extra
    installs psycopg2, the driver the connection check uses. An explicit
    `postgresql+DRIVER://` is kept.
    """
    if uri.split("://", 1)[0].lower() == "postgresql":
        return "postgresql+psycopg2://" + uri.split("://", 1)[1]
    return uri


def check_port(host: str, port: int) -> None:
    """`host` names an address of this machine and nothing listens on `port` there."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: SO_REUSEADDR, so a port left in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"--port {port}: already in use on {host} (stop that server or pick another)"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host!r}: not an address of this machine") from None
            raise ConfigError(f"--port {port}: cannot bind on {host}: {exc.strerror}") from None


def check_artifacts_destination(destination: str | None) -> str:
    """A local folder made absolute and created; a remote URI (s3://, gs://, ...) as given."""
    if destination and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", destination):
        if not destination.startswith("file://"):
            return destination
        folder = Path(unquote(urlsplit(destination).path))
    else:
        folder = Path(destination) if destination else default_artifacts_destination()
    folder = folder.expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--artifacts-destination {folder}: cannot create the folder ({exc.strerror or exc})"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--artifacts-destination {folder}: not writable")
    return str(folder)


def check_backend_store(uri: str) -> None:
    """A PostgreSQL store answers a login; a SQLite store's folder exists."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "postgres":
        raise ConfigError(
            f"--backend-store-uri {mask_uri(uri)}: write postgresql://, not postgres:// "
            "(SQLAlchemy's name)"
        )
    if scheme.split("+", 1)[0] == "postgresql":
        check_postgres(uri)
    elif scheme == "sqlite":
        path = uri.split("://", 1)[1].split("?", 1)[0]
        if path.startswith("/") and path != "/:memory:":
            folder = Path(path[1:]).parent
            if not folder.is_dir():
                raise ConfigError(f"--backend-store-uri {uri}: folder {folder} does not exist")
            from pipeline.tracking import store  # a damaged file, or one MLflow would empty

            problem = store.sqlite_file_problem(Path(path[1:]), store.artifact_folder(uri))
            if problem:
                raise ConfigError(f"--backend-store-uri {uri}: {problem}")


def check_postgres(uri: str) -> None:
    """Log in to the database of `uri` with psycopg2, waiting at most CONNECT_TIMEOUT_S."""
    import importlib.util

    shown = mask_uri(uri)
    try:
        import psycopg2
    except ImportError:
        raise ConfigError(
            f'--backend-store-uri {shown}: needs psycopg2 (pip install -e ".[server]")'
        ) from None
    driver = with_driver(uri).split("://", 1)[0].split("+", 1)[1]
    if importlib.util.find_spec(driver) is None:
        raise ConfigError(f"--backend-store-uri {shown}: driver {driver} is not installed")
    dsn = "postgresql://" + uri.split("://", 1)[1]  # libpq's URI: no SQLAlchemy driver suffix
    try:
        psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S).close()
    except psycopg2.Error as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"--backend-store-uri {shown}: cannot connect: {scrub(reason, uri)}"
        ) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    """The warning for a server other machines can reach, or None on a loopback address."""
    if is_loopback(host):
        return None
    return (
        f"warning: --host {host}: the server is reachable from the network and has no "
        "authentication; put a reverse proxy with authentication and TLS in front "
        "(docs/team-server.md)"
    )


def client_uri(host: str, port: int) -> str:
    """The MLFLOW_TRACKING_URI clients set: this machine's name when bound to every address."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.getfqdn()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def mlflow_command(cfg: ServerConfig) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `mlflow server`; the store URI goes in the environment only."""
    argv = [sys.executable, "-m", "mlflow", "server"]
    argv += ["--serve-artifacts", "--artifacts-destination", cfg.artifacts_destination]
    argv += ["--host", cfg.host, "--port", str(cfg.port)]
    if cfg.workers is not None:
        argv += ["--workers", str(cfg.workers)]
    if cfg.allowed_hosts:
        argv += ["--allowed-hosts", cfg.allowed_hosts]
    env = dict(os.environ)
    env[BACKEND_ENV] = cfg.backend_store_uri
    # Only --serve-artifacts' proxy: a default root from the environment would bypass it.
    env.pop("MLFLOW_DEFAULT_ARTIFACT_ROOT", None)
    # MLflow's job runner (GenAI online scoring, trace archival) starts eight more processes
    # (1.8 GB in all here); this pipeline uses none of it. MLFLOW_SERVER_ENABLE_JOB_EXECUTION
    # =true in the environment turns it back on.
    env.setdefault(JOB_EXECUTION_ENV, "false")
    return argv, env


def run(cfg: ServerConfig) -> None:
    """Print what clients set, then become `mlflow server` (never returns)."""
    print(
        f"server: store {mask_uri(cfg.backend_store_uri)}, artifacts {cfg.artifacts_destination}"
        f" (proxied), listening on {cfg.host}:{cfg.port}"
    )
    print(f"export MLFLOW_TRACKING_URI={client_uri(cfg.host, cfg.port)}")
    warning = exposure_warning(cfg.host)
    if warning:
        print(warning, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    argv, env = mlflow_command(cfg)
    os.execve(argv[0], argv, env)
