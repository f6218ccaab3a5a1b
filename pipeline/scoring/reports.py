"""The report of one scored set, as `evaluate` (the test split) and `score` (new data)
both write it: the metrics and the per-class figures, plots and tables."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.atomic import write_text

IMAGES_DIR = "images"
TABLES_DIR = "tables"  # one DVC output whatever the task: confusion.csv or per_class_iou.csv
METRIC_UNSAFE = re.compile(r"[^\w.-]")  # characters MLflow metric names may not hold


def classification(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], plots_dir: Path, *, present=None
) -> tuple[dict, dict, list[Path]]:
    """(report, per_class, files): top-1/top-5/loss/macro F1, per-class precision, recall
    and F1, the confusion matrix as PNG and CSV. `present`: the classes the data has
    (a subset of the model's); macro F1 is then their mean."""
    from pipeline.scoring import plots
    from pipeline.scoring.metrics import classification_report

    report, cm = classification_report(probs, labels, classes)
    per_class = report.pop("per_class")
    if present is not None and len(present) < len(classes):
        report["test_macro_f1"] = float(np.mean([per_class[name]["f1"] for name in present]))
    images = plots_dir / IMAGES_DIR
    files = [
        plots.confusion_matrix_png(cm, classes, images / "confusion_matrix.png"),
        plots.per_class_png(per_class, images / "per_class.png"),
        plots.confusion_csv(
            labels, probs.argmax(axis=1), classes, plots_dir / TABLES_DIR / "confusion.csv"
        ),
    ]
    return report, per_class, files


def segmentation(
    cm: np.ndarray, examples, card: dict, plots_dir: Path
) -> tuple[dict, dict, list[Path], dict[str, float]]:
    """(report, per_class, files, per-class IoU metrics) of a pixel confusion matrix:
    mIoU, Dice, pixel and mean class accuracy; the per-class IoU table and chart and the
    first examples beside their ground truth."""
    from pipeline.scoring import plots
    from pipeline.scoring.metrics import segmentation_report

    classes = card["classes"]
    report = segmentation_report(cm, classes)
    per_class = report.pop("per_class")
    table = plots_dir / TABLES_DIR / "per_class_iou.csv"
    write_text(
        table,
        "class,iou,dice,accuracy,pixels\n"
        + "".join(
            f"{name},{_cell(v['iou'])},{_cell(v['dice'])},{_cell(v['accuracy'])},{v['pixels']}\n"
            for name, v in per_class.items()
        ),
    )
    images, masks, preds = examples
    out = plots_dir / IMAGES_DIR
    files = [
        plots.per_class_iou_png(per_class, out / "per_class_iou.png"),
        plots.segmentation_examples_png(
            images, masks, preds, classes, card["ignore_index"], out / "test_examples.png"
        ),
        table,
    ]
    per_class_iou = {
        "test_iou_" + METRIC_UNSAFE.sub("_", name): v["iou"]
        for name, v in per_class.items()
        if v["iou"] is not None
    }
    return report, per_class, files, per_class_iou


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"
