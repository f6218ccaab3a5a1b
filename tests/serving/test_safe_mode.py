"""Keras safe mode: a crafted `.keras` file that carries Python code (a Lambda layer) is
refused with one line, and none of its code runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.training.transfer import load_source


def crafted_model(path: Path, marker: Path):
    """A classifier whose Lambda writes `marker` whenever it is called (a stand-in for code
    an attacker would run on load), saved at `path`; also returned."""
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Lambda(lambda t, m=str(marker): (open(m, "w").close(), t)[1])(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    model.save(path)
    marker.unlink()  # building the model called the Lambda once
    return model


def test_train_init_from_refuses_a_lambda_file(tmp_path):
    path, marker = tmp_path / "evil.keras", tmp_path / "code-ran"
    crafted_model(path, marker)
    with pytest.raises(ConfigError, match=r"train.init_from: .*evil.keras: refused: .*Lambda"):
        load_source(str(path))
    assert not marker.exists()


def test_predict_refuses_a_lambda_file_in_place_of_the_model(digits_prepared, tmp_path):
    shutil.copytree(digits_prepared, tmp_path / "data" / "prepared")
    (tmp_path / "data" / "model").mkdir()
    marker = tmp_path / "code-ran"
    crafted_model(tmp_path / "data" / "model" / "model.keras", marker)
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "a.png")

    done = run_cli(["predict", "images", "--output", "out.csv"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert "model.keras: refused: it holds Python code (a Lambda layer)" in error
    assert not marker.exists() and not (tmp_path / "out.csv").exists()


def test_served_model_refuses_a_lambda_file(tmp_path, monkeypatch):
    """A Lambda model that reached the MLflow store (logged by hand, say) is refused when
    the pyfunc loads it for serving, `mlflow models serve` included: the same one line,
    and its code never runs."""
    import mlflow

    from pipeline.tracking import logged_models, runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    marker = tmp_path / "code-ran"
    evil = crafted_model(tmp_path / "evil.keras", marker)
    card = {"classes": [str(i) for i in range(10)], "image_shape": [16, 16, 1]}
    with runs.training_run("exp", run_name="evil", params={}, tags={}):
        uri = logged_models.log_model(evil, card=card)
    marker.unlink(missing_ok=True)  # logging saves the model, which may trace the Lambda

    with pytest.raises(Exception, match=r"model.keras: refused: it holds Python code"):
        mlflow.pyfunc.load_model(uri)
    assert not marker.exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow exports it
