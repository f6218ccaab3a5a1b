"""Register stage and promote command: the MLflow model registry with gated aliases."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import read_json
from pipeline.atomic import write_json
from pipeline.config import RegisterConfig
from pipeline.layout import METRICS_DIR, MODEL_DIR


def run(
    cfg: RegisterConfig, *, model_dir: Path = MODEL_DIR, metrics_dir: Path = METRICS_DIR
) -> dict:
    """Register the evaluated model of this pipeline run; alias `challenger` points at it."""
    from pipeline.tracking import model_registry, runs

    run_file = runs.read_run_file(
        model_dir, then="nothing new is registered; rerun register when it answers"
    )
    metrics = read_json(metrics_dir / "eval.json")
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
