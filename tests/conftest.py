"""Shared fixtures and helpers: small real data, subprocess runners, a local HTTP server."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory) -> Path:
    """scikit-learn digits fetched and prepared at 16x16x1 in a session temp dir."""
    from pipeline.config import FetchConfig, PrepareConfig
    from pipeline.stages import fetch, prepare

    base = tmp_path_factory.mktemp("digits")
    fetch.run(FetchConfig(), base / "raw")
    prepare.run(PrepareConfig(), base / "raw", base / "prepared")
    return base / "prepared"


def pipeline_env(**extra: str) -> dict[str, str]:
    """Environment for running `python -m pipeline` / `dvc` in a subprocess.

    This interpreter's bin directory goes first on PATH so DVC stages' `python`
    is the one running the tests; the user's MLflow URI must not leak in.
    """
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""})
    env.update(extra)
    return env


@contextlib.contextmanager
def in_project(root: Path):
    """cwd `root`, its own store: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, and a
    MonkeyPatch context restores another test's value when it exits."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in `cwd`, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        env=pipeline_env(**env),
        timeout=900,
    )


def sh(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a command that must succeed (its output in the failure message)."""
    done = subprocess.run(
        args, cwd=cwd, text=True, capture_output=True, env=pipeline_env(**env), timeout=900
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def project_files() -> list[str]:
    """The files of this checkout that git would ship (tracked or not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [f for f in listed if (ROOT / f).is_file() and not f.startswith(("tests/", "docs/"))]


# Architectures that run the same builder code as another (a depth or scale variant):
# tests that build every architecture may build the sibling instead.
SAME_CODE_AS_SIBLING = {
    "efficientnet_b1": "efficientnet_b0",
    "efficientnet_b2": "efficientnet_b0",
    "efficientnet_b3": "efficientnet_b0",
    "mobilenet_v3_large": "mobilenet_v3_small",
    "resnet34": "resnet18",
    "resnet101": "resnet50",
    "resnet152": "resnet50",
    "vgg13": "vgg11",
    "vgg19": "vgg16",
    "vit_small": "vit_tiny",
}
# The tiny configurations tests train with: seconds on the digits, on any backend.
TINY_MODEL = ModelConfig(arch="simple_cnn", width_multiplier=0.25)
SHORT_TRAIN = TrainConfig(epochs=3, batch_size=128, warmup_epochs=1, learning_rate=0.01)
# The same for a stage or `dvc repro` run: params.yaml keys, as `params_with` takes them.
QUICK_RUN = {
    "model.width_multiplier": 0.25,
    "train.epochs": 1,
    "train.warmup_epochs": 0,
    "train.batch_size": 128,
}


def params_with(values: dict[str, Any], base: dict | None = None) -> dict:
    """A copy of `base` (default: the shipped params.yaml) with `values` set, each named
    `section.key` (or `task`); a section that is missing is added."""
    import copy

    import yaml

    params = copy.deepcopy(base if base is not None else yaml.safe_load(PARAMS.read_text()))
    for name, value in values.items():
        section, _, key = name.partition(".")
        if key:
            params.setdefault(section, {})[key] = value
        else:
            params[section] = value
    return params


def edit_params(where: Path, values: dict[str, Any]) -> Path:
    """Set `values` (as `params_with` takes them) in the params file `where`, or in a
    project folder's params.yaml; return the file."""
    import yaml

    path = where / "params.yaml" if where.is_dir() else where
    base = yaml.safe_load(path.read_text()) if path.exists() else None
    path.write_text(yaml.safe_dump(params_with(values, base), sort_keys=False))
    return path


def copy_project(repo: Path, params: dict[str, Any] | None = None) -> Path:
    """This project's shipped files in a fresh git repo at `repo`, committed, with
    `params` (as `params_with` takes them) set in its params.yaml."""
    import shutil

    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    if params:
        edit_params(repo, params)
    sh(["git", "init", "-q"], repo)
    sh(["git", "config", "user.email", "test@example.com"], repo)
    sh(["git", "config", "user.name", "test"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "project"], repo)
    return repo


def archive_project(base: Path, classes, params: dict[str, Any] | None = None):
    """(project, archive): a local tar of `classes` with 8 tiny PNGs each at
    `base/pets.tar.gz`, and this project copied to `base/project` fetching it at 8x8,
    with `params` (as `params_with` takes them) on top."""
    archive = make_tar(base / "pets.tar.gz", class_files(classes=classes, per_class=8))
    source = {"fetch.source": "archive", "fetch.url": str(archive), "prepare.image_size": 8}
    return copy_project(base / "project", {**source, **(params or {})}), archive


def missing_service(reason: str):
    """Skip, or fail where `make test` promises the services (PIPELINE_REQUIRE_SERVICES=1)."""
    if os.environ.get("PIPELINE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"PIPELINE_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(
    args: list[str], cwd: Path, ready_url: str, log: Path, timeout_s: float = 180, **env: str
) -> Iterator[subprocess.Popen]:
    """Run a server in its own process group until `ready_url` answers; stop the group after.

    A group because `mlflow server` and `mlflow models serve` start their web
    server as a child process.
    """
    import time
    import urllib.error
    import urllib.request

    with open(log, "w") as out:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=pipeline_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(ready_url, timeout=5).close()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"{ready_url} not up in {timeout_s} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Server:
    """The `server` fixture: files under `root` are served at `url`."""

    root: Path
    url: str


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; /slow/* never answers;
    /private/* answers only HTTP Basic auth as bob, password s3cret (401 otherwise)."""
    root = tmp_path / "www"
    root.mkdir()
    release = threading.Event()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path.startswith("/slow/"):
                release.wait(30)
                return
            if self.path.startswith("/private/") and self.headers.get("Authorization") != (
                "Basic " + base64.b64encode(b"bob:s3cret").decode()
            ):
                self.send_error(401, "Unauthorized")
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(root, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- damaged images


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    """A valid JPEG of RGB noise, so most of the file is compressed image data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_data_start(jpeg: bytes) -> int:
    """Where a JPEG's compressed image data starts: after the start-of-scan header."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def cut_jpeg(good: bytes) -> bytes:
    """A JPEG cut off halfway through its image data (a download that stopped)."""
    start = image_data_start(good)
    return good[: start + (len(good) - start) // 2]


def truncated_jpeg(seed: int = 0) -> bytes:
    return cut_jpeg(jpeg_bytes(seed))


def garbled_jpeg(seed: int = 0) -> bytes:
    """A real JPEG's headers, then garbage where its image data was, and its end marker.

    Only garbage that libjpeg rejects: about 4 random fills in 10 decode, to noise, with
    nothing but a libjpeg warning that PIL does not pass on, so neither PIL nor prepare can
    tell those from a photo of noise.
    """
    good = jpeg_bytes(seed)
    start = image_data_start(good)
    rng = np.random.default_rng(seed)
    while True:
        damaged = good[:start] + rng.bytes(len(good) - start - 2) + b"\xff\xd9"
        try:
            with Image.open(io.BytesIO(damaged)) as img:
                img.load()
        except OSError:
            return damaged


CORRUPT_JPEGS = {"truncated": truncated_jpeg, "garbage-after-header": garbled_jpeg}


# --------------------------------------------------------------------------- archives


def png_bytes(value: int = 128, size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, "PNG")
    return buf.getvalue()


def make_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    """A tar (compression from the suffix) holding `files` plus raw `extra` members."""
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def class_files(prefix: str = "", classes=("cat", "dog"), per_class: int = 3) -> dict:
    return {
        f"{prefix}{c}/{i}.png": png_bytes(10 * i + k)
        for k, c in enumerate(classes)
        for i in range(per_class)
    }


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def mask_files(prefix: str = "", splits=("train/", "val/"), per_split: int = 2) -> dict:
    files = {f"{prefix}classes.txt": b"sky\nroad\ncar\n"}
    for split in splits:
        for i in range(per_split):
            files[f"{prefix}{split}images/{i:03d}.png"] = png_bytes(i)
            files[f"{prefix}{split}masks/{i:03d}.png"] = png_bytes(i % 3)
    return files


def epoch_counter(stop_after: int | None = None):
    """A Keras callback recording the epochs `fit` starts (`.epochs`); it raises
    KeyboardInterrupt at the end of epoch `stop_after`, as a user's Ctrl-C would."""
    import keras

    class EpochCounter(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[int] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append(epoch)

        def on_epoch_end(self, epoch, logs=None):
            if stop_after is not None and epoch == stop_after:
                raise KeyboardInterrupt("simulated interruption")

    return EpochCounter()


def wait_for_backup(metadata: Path, epoch: int, process, timeout_s: float) -> None:
    """Return once Keras's backup `metadata` (training_metadata.json) records `epoch`, the
    training `process` ended, or `timeout_s` passed: the moment a kill test kills."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(metadata.read_text())["epoch"] >= epoch:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
