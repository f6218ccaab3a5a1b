"""Register stage and promote command: the MLflow model registry with gated aliases."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import RegisterConfig
from pipeline.data.atomic import write_json
from pipeline.data.layout import METRICS_DIR, MODEL_DIR
from pipeline.errors import DataError


def run(
    cfg: RegisterConfig, *, model_dir: Path = MODEL_DIR, metrics_dir: Path = METRICS_DIR
) -> dict:
    """Register the evaluated model of this pipeline run; alias `challenger` points at it."""
    from pipeline import tracking

    run_file = tracking.read_run_file(model_dir)
    eval_path = metrics_dir / "eval.json"
    try:
        metrics = json.loads(eval_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{eval_path} not found; run `python -m pipeline evaluate` first") from None
    version = tracking.register(run_file, cfg.model_name, metrics=metrics)
    record = {
        "name": cfg.model_name,
        "version": version,
        "alias": tracking.CHALLENGER,
        "run_id": run_file["run_id"],
        "uri": f"models:/{cfg.model_name}@challenger",
    }
    write_json(metrics_dir / "registered.json", record)
    print(f"registered {cfg.model_name} version {version} as @{tracking.CHALLENGER}")
    return record


def promote(
    cfg: RegisterConfig, *, name: str | None = None, version: str | None = None, force: bool = False
) -> str:
    """Move alias `champion` to `version` (default: the challenger) unless it is worse."""
    from pipeline import tracking

    name = name or cfg.model_name
    promoted, old, new = tracking.promote(
        name, version=version, metric=cfg.metric, higher_is_better=cfg.higher_is_better, force=force
    )
    before = "none" if old is None else f"{old:.4f}"
    print(
        f"promoted {name} v{promoted} to @{tracking.CHAMPION}: "
        f"{cfg.metric} {new:.4f} (previous champion: {before})"
    )
    return promoted
