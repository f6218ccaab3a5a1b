"""Evaluate stage: score the trained model on the test split; metrics, plots, MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.config import EvaluateConfig, check_evaluate, flatten
from pipeline.layout import METRICS_DIR, MODEL_DIR, PLOTS_DIR, PREPARED_DIR, data_card_file
from pipeline.scoring.reports import IMAGES_DIR, TABLES_DIR


def run(
    cfg: EvaluateConfig,
    *,
    prepared_dir: Path = PREPARED_DIR,
    model_dir: Path = MODEL_DIR,
    metrics_dir: Path = METRICS_DIR,
    plots_dir: Path = PLOTS_DIR,
) -> dict:
    """Write metrics/eval.json, per-class figures and plots; log them to the training run.

    Every input is read and checked first (the card, the run file, the history, the model,
    and that the model fits the card), so a damaged one fails before anything is written.
    """
    from pipeline.artifacts import check_card_fits_model
    from pipeline.data.data_card import read_card
    from pipeline.models.saved import MODEL_FILE, load_trained_model
    from pipeline.scoring import reports
    from pipeline.scoring.predictions import predict_split
    from pipeline.tracking import runs
    from pipeline.training.history import HISTORY_FILE, read_history

    card = read_card(prepared_dir)
    runs.read_run_file(model_dir)
    history_csv = plots_dir / HISTORY_FILE
    history = read_history(history_csv) if history_csv.exists() else None
    model = load_trained_model(model_dir)
    check_card_fits_model(card, data_card_file(prepared_dir), model, model_dir / MODEL_FILE)
    inputs = Inputs(card, model, history)
    if card.get("task") == "segmentation":
        return run_segmentation(cfg, inputs, prepared_dir, model_dir, metrics_dir, plots_dir)
    classes = card["classes"]
    probs, labels = predict_split(model, prepared_dir, "test", cfg.batch_size, cfg.tta)
    report, per_class, files = reports.classification(probs, labels, classes, plots_dir)
    if cfg.explain:
        files += explain_classifier(cfg, model, prepared_dir, probs, labels, classes, plots_dir)
        files += explain_network(cfg, model, prepared_dir, plots_dir, report)
    return record(cfg, report, per_class, files, inputs, model_dir, metrics_dir, plots_dir)


@dataclass(frozen=True)
class Inputs:
    """What evaluate read and checked before writing anything."""

    card: dict
    model: object
    history: dict[str, list[float]] | None


def record(
    cfg: EvaluateConfig,
    report: dict,
    per_class: dict,
    files: list[Path],
    inputs: Inputs,
    model_dir: Path,
    metrics_dir: Path,
    plots_dir: Path,
    extra_metrics: dict[str, float] | None = None,
) -> dict:
    """Write eval.json and per_class.json (label order), add the training curves, and log
    it all to the training run; return `report`."""
    from pipeline.scoring import plots
    from pipeline.tracking import runs
    from pipeline.training.history import HISTORY_FILE

    write_json(metrics_dir / "eval.json", report)
    write_json(metrics_dir / "per_class.json", per_class, sort_keys=False)
    if inputs.history is not None:
        curves = plots_dir / IMAGES_DIR / "training_curves.png"
        history_csv = plots_dir / HISTORY_FILE
        files = [*files, plots.training_curves_png(inputs.history, curves), history_csv]
    kept = f"{metrics_dir / 'eval.json'} is written; rerun evaluate when it answers"
    run_file = runs.read_run_file(model_dir, then=kept)
    with runs.reopened_run(run_file["run_id"], then=kept):
        # Tags, not params: params are immutable and a cached training run may be re-evaluated.
        runs.set_tags({k: str(v) for k, v in flatten(cfg, "evaluate").items()})
        runs.log_metrics({k: v for k, v in report.items() if isinstance(v, float)})
        runs.log_metrics(extra_metrics or {})
        runs.log_artifacts(files, "plots")
        runs.log_artifacts([metrics_dir / "eval.json", metrics_dir / "per_class.json"], "metrics")
    return report


def run_segmentation(
    cfg: EvaluateConfig,
    inputs: Inputs,
    prepared_dir: Path,
    model_dir: Path,
    metrics_dir: Path,
    plots_dir: Path,
) -> dict:
    """mIoU, Dice, pixel and mean class accuracy over the test split (and the same over the
    val split as `eval_val_*`: benchmarks such as CamVid report val); per-class IoU table,
    examples of predictions next to ground truth; logged to the training run."""
    from pipeline.scoring import reports
    from pipeline.scoring.metrics import segmentation_report
    from pipeline.scoring.predictions import segment_split

    card, model = inputs.card, inputs.model
    check_evaluate("segmentation", cfg)
    cm, examples = segment_split(model, prepared_dir, "test", cfg.batch_size, card, cfg.tta)
    report, per_class, files, per_class_iou = reports.segmentation(cm, examples, card, plots_dir)
    if card["counts"].get("val"):
        # not `val_*`: those name training's per-epoch curves in the same MLflow run
        val_cm, _ = segment_split(model, prepared_dir, "val", cfg.batch_size, card, cfg.tta)
        val = segmentation_report(val_cm, card["classes"])
        report |= {
            "eval_val_" + k.removeprefix("test_"): v
            for k, v in val.items()
            if k.startswith("test_")
        }
    if cfg.explain:
        files += explain_network(cfg, model, prepared_dir, plots_dir, report)
    return record(
        cfg, report, per_class, files, inputs, model_dir, metrics_dir, plots_dir, per_class_iou
    )


def explain_classifier(
    cfg: EvaluateConfig,
    model,
    prepared_dir: Path,
    probs,
    labels,
    classes: list[str],
    plots_dir: Path,
) -> list[Path]:
    """Grad-CAM grids (of the predicted class) over the `gradcam_images` most confident
    correct and most confident wrong test images; a grid with no image is not drawn."""
    import numpy as np

    from pipeline.data.loader import load_split
    from pipeline.explain.attribution import gradcam
    from pipeline.explain.figures import overlay_grid

    images, _ = load_split(prepared_dir, "test")
    preds, confidence = probs.argmax(axis=1), probs.max(axis=1)
    files = []
    for name, chosen in (("correct", preds == labels), ("wrong", preds != labels)):
        picked = np.flatnonzero(chosen)
        picked = picked[np.argsort(-confidence[picked], kind="stable")][: cfg.gradcam_images]
        if not len(picked):
            continue
        batch = np.asarray(images[picked])
        titles = [
            f"{classes[labels[i]]} {confidence[i]:.2f}"
            if name == "correct"
            else f"{classes[labels[i]]}->{classes[preds[i]]} {confidence[i]:.2f}"
            for i in picked
        ]
        heat = gradcam(model, batch, class_index=preds[picked])
        files.append(
            overlay_grid(batch, heat, titles, plots_dir / IMAGES_DIR / f"gradcam_{name}.png")
        )
    return files


def explain_network(
    cfg: EvaluateConfig, model, prepared_dir: Path, plots_dir: Path, report: dict
) -> list[Path]:
    """Dead ReLU units over the whole test split (table, chart, `dead_relu_fraction`) and
    the effective receptive field over its first `erf_images` images beside the model
    card's theoretical one (heatmap, `erf_px`, `erf_support_px`, `theoretical_rf_px`),
    added to `report`. A model without ReLUs or without a spatial map skips that part."""
    import numpy as np

    from pipeline.data.loader import load_split
    from pipeline.explain import units
    from pipeline.models.model_card import model_card

    images, _ = load_split(prepared_dir, "test")
    files = []
    rows = units.dead_units(model, images, cfg.batch_size)
    if rows:
        report["dead_relu_fraction"] = units.dead_fraction(rows)
        files += [
            units.dead_units_csv(rows, plots_dir / TABLES_DIR / "dead_units.csv"),
            units.dead_units_png(rows, plots_dir / IMAGES_DIR / "dead_units.png"),
        ]
    if units.erf_layer(model) is not None:
        erf = units.effective_receptive_field(model, np.asarray(images[: cfg.erf_images]))
        theoretical = model_card(model)["receptive_field"]
        report |= {
            "erf_px": float(erf["erf_px"]),
            "erf_support_px": float(erf["support_px"]),
            "theoretical_rf_px": float(theoretical),
        }
        files.append(units.erf_png(erf, theoretical, plots_dir / IMAGES_DIR / "erf.png"))
    return files
