"""The MLflow side on a real SQLite store: where runs go, and promotion's gate."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import pipeline_env

from pipeline.errors import PipelineError, PromotionRefused
from pipeline.models.architectures import build_model
from pipeline.tracking import logged_models, model_registry, runs
from pipeline.tracking import store as tracking_store


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh project directory with the default store (no MLFLOW_TRACKING_URI)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow exports it


def test_project_root_is_the_repo_for_dvc_temp_workspaces(tmp_path):
    assert tracking_store.project_root(tmp_path) == tmp_path
    temp_workspace = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    temp_workspace.mkdir(parents=True)
    assert tracking_store.project_root(temp_workspace) == tmp_path


def test_default_store_is_sqlite_with_artifacts_in_mlartifacts(store):
    assert tracking_store.tracking_uri() == f"sqlite:///{store / 'mlflow.db'}"
    tracking_store.ensure_experiment("exp")
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_store.tracking_uri()).get_experiment_by_name("exp")
    assert experiment.artifact_location == (store / "mlartifacts").as_uri()


CARD = {"classes": ["cat", "dog", "eel"], "image_shape": [8, 8, 1], "task": "classification"}


def register_version(name: str, top1: float) -> str:
    """A real tiny model, logged in a run with `test_top1`, registered as a new version."""
    model = build_model("simple_cnn", (8, 8, 1), 3, width_multiplier=0.25)
    with runs.training_run("exp", run_name="t", params={"p": 1}, tags={}) as run_id:
        model_uri = logged_models.log_model(model, card=CARD)
        runs.log_metrics({"test_top1": top1})
    return model_registry.register(
        {"run_id": run_id, "model_uri": model_uri}, name, metrics={"test_top1": top1}
    )


def test_register_and_promote_gate(store):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_store.tracking_uri())
    assert register_version("m", 0.90) == "1"
    assert client.get_model_version_by_alias("m", "challenger").version == 1

    assert model_registry.promote(
        "m", version=None, metric="test_top1", higher_is_better=True, force=False
    ) == ("1", None, 0.90)
    assert register_version("m", 0.80) == "2"
    with pytest.raises(PromotionRefused, match="0.8000 is worse than champion v1's 0.9000"):
        model_registry.promote(
            "m", version=None, metric="test_top1", higher_is_better=True, force=False
        )
    assert client.get_model_version_by_alias("m", "champion").version == 1
    # Lower is better (a loss): the same figures now favour v2.
    assert model_registry.promote(
        "m", version="2", metric="test_top1", higher_is_better=False, force=False
    ) == ("2", 0.90, 0.80)
    assert client.get_model_version_by_alias("m", "champion").version == 2

    version = client.get_model_version("m", "1")
    assert version.tags["test_top1"] == "0.9"
    assert "Test: test_top1=0.9000" in version.description


PROMOTE = """
import sys, time
from pathlib import Path
from pipeline.tracking import logged_models, model_registry, runs
from pipeline.tracking import store as tracking_store
from pipeline.errors import PromotionRefused
make_client = tracking_store.mlflow_client
def slow_client():  # widen the gap between reading the champion and moving the alias
    client = make_client()
    move = client.set_registered_model_alias
    def slow_move(*args):
        time.sleep(float(sys.argv[2]))
        move(*args)
    client.set_registered_model_alias = slow_move
    return client
model_registry.mlflow_client = slow_client
go = Path("go")
while not go.exists():
    time.sleep(0.005)
try:
    model_registry.promote("m", version=sys.argv[1], metric="test_top1", higher_is_better=True,
                     force=False)
except PromotionRefused:
    sys.exit(1)
"""


def test_concurrent_promotions_leave_the_better_champion(store):
    """v1 (0.90) and v2 (0.80) promoted at the same moment, with no champion yet: whichever
    goes first, v1 ends champion and v2 is refused or replaced, never the last word."""
    from mlflow import MlflowClient

    register_version("m", 0.90)
    register_version("m", 0.80)
    client = MlflowClient(tracking_store.tracking_uri())
    for _ in range(2):
        (store / "go").unlink(missing_ok=True)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", PROMOTE, version, delay], cwd=store, env=pipeline_env()
            )
            # unlocked, v2 (the worse) would compare against no champion and move the alias last
            for version, delay in (("2", "1.5"), ("1", "0.3"))
        ]
        (store / "go").touch()
        codes = sorted(p.wait(timeout=120) for p in procs)
        assert codes in ([0, 0], [0, 1])
        # an alias names one version by construction: the question is which
        assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
        client.delete_registered_model_alias("m", "champion")


def test_promote_errors_name_the_problem(store):
    tracking_store.ensure_experiment("exp")
    with pytest.raises(PipelineError, match="'nope' has no alias 'challenger'"):
        model_registry.promote(
            "nope", version=None, metric="test_top1", higher_is_better=True, force=False
        )
    register_version("m", 0.5)
    with pytest.raises(PipelineError, match="has no metric 'val_top1'"):
        model_registry.promote(
            "m", version=None, metric="val_top1", higher_is_better=True, force=False
        )


def test_logged_model_takes_encoded_images_and_arrays_at_any_size(store, tmp_path):
    """The pyfunc decodes and resizes like `prepare`, and answers with class names."""
    import mlflow
    import pandas as pd
    from PIL import Image

    from pipeline.data.decode import load_image

    model = build_model("simple_cnn", (8, 8, 1), 3, width_multiplier=0.25)
    with runs.training_run("exp", run_name="t", params={}, tags={}):
        uri = logged_models.log_model(model, card=CARD)
    rng = np.random.default_rng(0)
    pixels = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((20, 30, 3), (8, 8), (5, 9, 4))
    ]
    paths, encoded = [], []
    for i, array in enumerate(pixels):
        path = tmp_path / f"{i}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
        encoded.append(path.read_bytes())
    expected = keras.ops.convert_to_numpy(
        model(np.stack([load_image(p, (8, 8), 1) for p in paths]).astype(np.float32))
    )

    loaded = mlflow.pyfunc.load_model(uri)
    for frame in (
        pd.DataFrame({"image": encoded}),
        pd.DataFrame({"array": [a.tolist() for a in pixels]}),
    ):
        out = loaded.predict(frame)
        assert list(out.columns) == [
            "class",
            "probability",
            "top5",
            "top5_probabilities",
            "probabilities",
        ]
        probs = np.array([[row[c] for c in CARD["classes"]] for row in out["probabilities"]])
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
        assert list(out["class"]) == [CARD["classes"][i] for i in expected.argmax(axis=1)]
        assert [row[0] for row in out["top5"]] == list(out["class"])
        assert all(len(row) == 3 for row in out["top5"])  # top-5 of 3 classes: all of them
    assert loaded.metadata.metadata["classes"] == CARD["classes"]

    with pytest.raises(Exception, match="row 0: 'image' is not a decodable image"):
        loaded.predict(pd.DataFrame({"image": [b"not an image"]}))
    with pytest.raises(Exception, match=r"row 0: 'array' must be \(H, W\)"):
        loaded.predict(pd.DataFrame({"array": [[[1, 2], [3]]]}))
    with pytest.raises(Exception, match="send images in a column 'image'"):
        loaded.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))
    with pytest.raises(Exception, match="row 1: neither 'image' nor 'array' is set"):
        loaded.predict(pd.DataFrame({"image": [encoded[0], None], "array": [None, None]}))


def test_credentials_in_urls_are_never_logged(store):
    """A fetch URL with a password or a presigned S3 query, as a param or tag, is masked."""
    from mlflow import MlflowClient

    url = (
        "https://bob:hunter2@data.example/cifar.tar.gz"
        "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef&X-Amz-Security-Token=tok"
    )
    with runs.training_run(
        "exp", run_name="t", params={"data.url": url}, tags={"source_url": url}
    ) as run_id:
        runs.log_params({"fetch.url": url})
        runs.set_tags({"later_url": url})
        runs.log_dict({"source": {"url": url, "mirrors": [url]}}, "data_card.json")
    run = MlflowClient(tracking_store.tracking_uri()).get_run(run_id)
    logged = {**run.data.params, **run.data.tags}
    for secret in ("hunter2", "AKIAEXAMPLE", "deadbeef", "=tok"):
        assert not any(secret in value for value in logged.values()), secret
    assert run.data.params["data.url"].startswith("https://bob:***@data.example/cifar.tar.gz?")
    assert "X-Amz-Signature=***" in run.data.tags["later_url"]
    import mlflow

    card = mlflow.artifacts.load_dict(f"runs:/{run_id}/data_card.json")
    assert "hunter2" not in json.dumps(card) and card["source"]["url"].startswith(
        "https://bob:***@"
    )


def test_run_file_keeps_the_tracking_uri_without_its_password(tmp_path, monkeypatch):
    """data/model/mlflow_run.json (a DVC output) says which store holds the run, masked."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s3cret@mlflow.example.com")
    runs.write_run_file("abc123", "models:/m-1", tmp_path)
    assert json.loads((tmp_path / "mlflow_run.json").read_text()) == {
        "run_id": "abc123",
        "model_uri": "models:/m-1",
        "tracking_uri": "https://bob:***@mlflow.example.com",
    }
