"""evaluate's look inside the network: Grad-CAM grids, dead units and the effective
receptive field, written and logged to the training run (a real SQLite MLflow store), and
none of it with `evaluate.explain: false`; keys that would do nothing are refused."""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import replace

import pytest
from conftest import SHORT_TRAIN, TINY_MODEL

from pipeline.config import EvaluateConfig, MlflowConfig
from pipeline.errors import ConfigError

EXPLAIN_FILES = (
    "images/gradcam_correct.png",
    "images/gradcam_wrong.png",
    "images/dead_units.png",
    "images/erf.png",
    "tables/dead_units.csv",
)
EXPLAIN_METRICS = ("dead_relu_fraction", "erf_px", "erf_support_px", "theoretical_rf_px")


def _artifacts(client, run_id: str, path: str = "plots") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_evaluate_explains_the_network_only_when_asked(digits_prepared, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.stages import evaluate, train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(digits_prepared, tmp_path / "data/prepared")
    train.run(TINY_MODEL, replace(SHORT_TRAIN, epochs=2), MlflowConfig(experiment="explain"))
    run_id = json.loads((tmp_path / "data/model/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    start = time.perf_counter()
    report = evaluate.run(EvaluateConfig(explain=False))
    plain_seconds = time.perf_counter() - start
    for name in EXPLAIN_FILES:
        assert not (tmp_path / "plots" / name).exists(), name
    assert not set(EXPLAIN_METRICS) & set(report)
    assert not set(EXPLAIN_METRICS) & set(client.get_run(run_id).data.metrics)
    assert not {f"plots/{n.split('/')[-1]}" for n in EXPLAIN_FILES} & _artifacts(client, run_id)

    start = time.perf_counter()
    report = evaluate.run(EvaluateConfig(gradcam_images=4, erf_images=16))
    explain_seconds = time.perf_counter() - start
    print(f"evaluate: {plain_seconds:.1f} s plain, {explain_seconds:.1f} s with explain")

    sizes = {name: (tmp_path / "plots" / name).stat().st_size for name in EXPLAIN_FILES}
    assert sum(sizes.values()) < 400_000, sizes
    saved = json.loads((tmp_path / "metrics/eval.json").read_text())
    metrics = client.get_run(run_id).data.metrics
    for key in EXPLAIN_METRICS:
        assert saved[key] == report[key] == pytest.approx(metrics[key])
    assert 0 < report["erf_support_px"] <= report["theoretical_rf_px"] or (
        report["erf_support_px"] == 16  # the field is wider than the 16x16 image
    )
    assert report["erf_px"] <= report["erf_support_px"]
    with open(tmp_path / "plots/tables/dead_units.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows][:2] == ["stage1_1_relu", "stage1_2_relu"]
    dead = sum(int(r["dead"]) for r in rows) / sum(int(r["channels"]) for r in rows)
    assert report["dead_relu_fraction"] == pytest.approx(dead)
    logged = _artifacts(client, run_id)
    assert {f"plots/{n.split('/')[-1]}" for n in EXPLAIN_FILES} <= logged


def test_keys_that_would_do_nothing_are_refused_naming_them(tmp_path):
    from conftest import edit_params

    from pipeline import config

    with pytest.raises(ConfigError, match=r"^evaluate\.erf_images: 5 does nothing with "):
        EvaluateConfig(explain=False, erf_images=5)
    with pytest.raises(ConfigError, match=r"^evaluate\.gradcam_images: 4 does nothing for "):
        config.check_evaluate("segmentation", EvaluateConfig(gradcam_images=4))
    config.check_evaluate("segmentation", EvaluateConfig())  # the default: ignored
    config.check_evaluate("classification", EvaluateConfig(gradcam_images=4))
    EvaluateConfig(explain=False)

    params = edit_params(tmp_path, {"evaluate.explain": False, "evaluate.gradcam_images": 3})
    with pytest.raises(ConfigError, match=r"params\.yaml: evaluate\.gradcam_images: 3 does"):
        config.load("evaluate", params)
    segmentation = {
        "task": "segmentation",
        "model.arch": "unet",
        "register.metric": "test_miou",
        "evaluate.explain": True,
    }
    params = edit_params(tmp_path, segmentation)
    with pytest.raises(ConfigError, match="evaluate.gradcam_images: 3 does nothing for task"):
        config.load_all(params)
