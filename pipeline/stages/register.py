"""Register stage and promote command: the MLflow model registry with gated aliases."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.config import RegisterConfig
from pipeline.errors import DataError
from pipeline.layout import METRICS_DIR, MODEL_DIR


def run(
    cfg: RegisterConfig, *, model_dir: Path = MODEL_DIR, metrics_dir: Path = METRICS_DIR
) -> dict:
    """Register the evaluated model of this pipeline run; alias `challenger` points at it."""
    from pipeline.tracking import model_registry, runs

    run_file = runs.read_run_file(model_dir)
    eval_path = metrics_dir / "eval.json"
    try:
        metrics = json.loads(eval_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{eval_path} not found; run `python -m pipeline evaluate` first") from None
    version = model_registry.register(run_file, cfg.model_name, metrics=metrics)
    record = {
        "name": cfg.model_name,
        "version": version,
        "alias": model_registry.CHALLENGER,
        "run_id": run_file["run_id"],
        "uri": f"models:/{cfg.model_name}@challenger",
    }
    write_json(metrics_dir / "registered.json", record)
    print(f"registered {cfg.model_name} version {version} as @{model_registry.CHALLENGER}")
    return record
