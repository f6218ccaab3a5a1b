"""TensorFlow's C++ start-up lines stay off the terminal unless the user asks for them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

NOISE = re.compile(r"absl::InitializeLog|oneDNN custom operations|cuInit|Could not find cuda")
COMMAND = [sys.executable, "-m", "pipeline", "models", "--arch", "lenet5", "--image-size", "32"]


def stderr_of(tmp_path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environ.pop("KERAS_BACKEND", None)  # TensorFlow's behaviour is the one under test
    done = subprocess.run(
        COMMAND, cwd=tmp_path, env={**environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "lenet5" in done.stdout
    return done.stderr


def test_a_command_that_loads_tensorflow_prints_none_of_its_startup_lines(tmp_path):
    assert not NOISE.findall(stderr_of(tmp_path))


def test_asking_for_tensorflow_logs_shows_them(tmp_path):
    """The user's TF_CPP_MIN_LOG_LEVEL wins, and shows the lines the hook hides."""
    shown = stderr_of(tmp_path, TF_CPP_MIN_LOG_LEVEL="0")
    if not NOISE.findall(shown):
        pytest.skip("this TensorFlow build prints no start-up lines here")
    assert "oneDNN custom operations" in shown or "cuInit" in shown
