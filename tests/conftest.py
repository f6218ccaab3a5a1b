"""Shared fixtures: small real data, prepared once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory) -> Path:
    """scikit-learn digits fetched and prepared at 16x16x1 in a session temp dir."""
    from pipeline.config import FetchConfig, PrepareConfig
    from pipeline.data import fetch, prepare

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
