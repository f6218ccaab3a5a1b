"""Evaluate stage: score the trained model on the test split; metrics, plots, MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import EvaluateConfig, flatten
from pipeline.data.atomic import write_json
from pipeline.data.layout import METRICS_DIR, MODEL_DIR, PLOTS_DIR, PREPARED_DIR
from pipeline.errors import DataError

IMAGES_DIR = "images"


def load_trained_model(model_dir: Path = MODEL_DIR):
    """The trained Keras model, loaded in safe mode (no code from the file runs)."""
    import keras

    import pipeline.models.layers  # noqa: F401  registers the zoo's custom layers
    from pipeline.train import MODEL_FILE

    path = model_dir / MODEL_FILE
    if not path.exists():
        raise DataError(f"{path} not found; run `python -m pipeline train` first")
    return keras.saving.load_model(path, compile=False, safe_mode=True)


def predict_split(model, prepared_dir: Path, split: str, batch_size: int):
    """(probabilities, labels) of one prepared split."""
    from pipeline.data.loader import ArrayBatches, load_split

    images, labels = load_split(prepared_dir, split)
    if not len(labels):
        raise DataError(f"{prepared_dir}: the {split} split is empty")
    probs = model.predict(ArrayBatches(images, labels, batch_size), verbose=0)
    return np.asarray(probs, dtype=np.float64), np.asarray(labels)


def run(
    cfg: EvaluateConfig,
    *,
    prepared_dir: Path = PREPARED_DIR,
    model_dir: Path = MODEL_DIR,
    metrics_dir: Path = METRICS_DIR,
    plots_dir: Path = PLOTS_DIR,
) -> dict:
    """Write metrics/eval.json, per-class figures and plots; log them to the training run."""
    from pipeline import plots, tracking
    from pipeline.data.prepare import read_card
    from pipeline.metrics import classification_report
    from pipeline.train import HISTORY_FILE, read_history

    card = read_card(prepared_dir)
    classes = card["classes"]
    probs, labels = predict_split(
        load_trained_model(model_dir), prepared_dir, "test", cfg.batch_size
    )
    report, cm = classification_report(probs, labels, classes)
    per_class = report.pop("per_class")
    write_json(metrics_dir / "eval.json", report)
    write_json(metrics_dir / "per_class.json", per_class)

    images = plots_dir / IMAGES_DIR
    figures = [
        plots.confusion_matrix_png(cm, classes, images / "confusion_matrix.png"),
        plots.per_class_png(per_class, images / "per_class.png"),
    ]
    history_csv = plots_dir / HISTORY_FILE
    if history_csv.exists():
        figures.append(
            plots.training_curves_png(read_history(history_csv), images / "training_curves.png")
        )
    confusion = plots.confusion_csv(
        labels, probs.argmax(axis=1), classes, plots_dir / "confusion.csv"
    )

    run_file = tracking.read_run_file(model_dir)
    with tracking.reopened_run(run_file["run_id"]):
        # Tags, not params: params are immutable and a cached training run may be re-evaluated.
        tracking.set_tags({k: str(v) for k, v in flatten(cfg, "evaluate").items()})
        tracking.log_metrics({k: v for k, v in report.items() if isinstance(v, float)})
        tracking.log_artifacts(figures, "plots")
        tracking.log_artifacts(
            [confusion] + ([history_csv] if history_csv.exists() else []), "plots"
        )
        tracking.log_artifacts(
            [metrics_dir / "eval.json", metrics_dir / "per_class.json"], "metrics"
        )
    return report
