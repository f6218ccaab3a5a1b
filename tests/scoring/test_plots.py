"""pipeline.scoring.plots writes real PNGs and a CSV that reads back to the right rows."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.scoring import metrics, plots


def _check_png(path: Path) -> tuple[int, int]:
    """Assert `path` is a decodable, non-empty PNG; return its pixel size."""
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode in {"RGB", "RGBA"}
        image.load()
        width, height = image.size
    assert width > 0 and height > 0
    return width, height


def _open_pyplot_figures() -> list[int]:
    """Figure numbers pyplot holds, or [] if pyplot was never imported."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    return list(pyplot.get_fignums()) if pyplot is not None else []


@pytest.fixture
def report_and_cm() -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=60)
    labels = rng.integers(0, 4, size=60)
    report, cm = metrics.classification_report(probs, labels, ["cat", "dog", "fox", "owl"])
    return report, cm, labels, probs.argmax(axis=1)


def test_confusion_matrix_png(tmp_path: Path, report_and_cm) -> None:
    _, cm, _, _ = report_and_cm
    out = plots.confusion_matrix_png(cm, ["cat", "dog", "fox", "owl"], tmp_path / "a" / "cm.png")
    assert out == tmp_path / "a" / "cm.png"
    _check_png(out)


def test_confusion_matrix_png_many_classes_and_empty_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cm = rng.integers(0, 5, size=(40, 40))
    cm[3] = 0  # a class with no test images: row normalisation must not divide by zero
    _check_png(plots.confusion_matrix_png(cm, [f"c{i}" for i in range(40)], tmp_path / "cm.png"))


def test_confusion_matrix_png_rejects_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match"):
        plots.confusion_matrix_png(np.zeros((3, 3)), ["a", "b"], tmp_path / "cm.png")


def test_training_curves_png_three_panels(tmp_path: Path) -> None:
    history = {
        "train_loss": [1.2, 0.8, 0.5],
        "val_loss": [1.3, 0.9, 0.7],
        "train_accuracy": [0.5, 0.7, 0.85],
        "val_accuracy": [0.45, 0.65, 0.8],
        "learning_rate": [1e-3, 1e-4, 1e-5],
    }
    width, _ = _check_png(plots.training_curves_png(history, tmp_path / "curves.png"))
    width_one, _ = _check_png(
        plots.training_curves_png({"train_loss": [1.0, 0.5]}, tmp_path / "one.png")
    )
    assert width > 2 * width_one  # three panels side by side versus one


def test_training_curves_png_partial_and_keras_keys(tmp_path: Path) -> None:
    _check_png(
        plots.training_curves_png(
            {"loss": [1.0, 0.7], "accuracy": [0.4, 0.6], "val_loss": [1.1, 0.8]},
            tmp_path / "keras.png",
        )
    )
    _check_png(plots.training_curves_png({"val_accuracy": [0.5]}, tmp_path / "single.png"))


def test_training_curves_png_rejects_empty_history(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no plottable series"):
        plots.training_curves_png({"train_loss": [], "other": [1.0]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_per_class_png(tmp_path: Path, report_and_cm) -> None:
    report, _, _, _ = report_and_cm
    _check_png(plots.per_class_png(report["per_class"], tmp_path / "per_class.png"))


def test_confusion_csv_round_trip(tmp_path: Path, report_and_cm) -> None:
    _, _, labels, preds = report_and_cm
    names = ["cat", "dog", "fox", "owl"]
    out = plots.confusion_csv(labels, preds, names, tmp_path / "sub" / "confusion.csv")
    with out.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["actual", "predicted"]
        rows = list(reader)
    assert rows == [
        {"actual": names[a], "predicted": names[p]} for a, p in zip(labels, preds, strict=True)
    ]


def test_confusion_csv_quotes_names_with_commas(tmp_path: Path) -> None:
    names = ["a,b", 'say "hi"']
    out = plots.confusion_csv(np.array([0, 1]), np.array([1, 1]), names, tmp_path / "c.csv")
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"actual": "a,b", "predicted": 'say "hi"'},
        {"actual": 'say "hi"', "predicted": 'say "hi"'},
    ]


def test_confusion_csv_rejects_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preds must be in"):
        plots.confusion_csv(np.array([0]), np.array([2]), ["a", "b"], tmp_path / "c.csv")


def test_no_figures_leak(tmp_path: Path, report_and_cm) -> None:
    report, cm, labels, preds = report_and_cm
    import matplotlib.pyplot as plt  # noqa: F401  (so leaks into pyplot would be visible)

    before = _open_pyplot_figures()
    for i in range(5):
        plots.confusion_matrix_png(cm, list(report["per_class"]), tmp_path / f"cm{i}.png")
        plots.training_curves_png({"train_loss": [1.0, 0.5]}, tmp_path / f"tc{i}.png")
        plots.per_class_png(report["per_class"], tmp_path / f"pc{i}.png")
    assert _open_pyplot_figures() == before


def test_importing_plots_does_not_import_matplotlib() -> None:
    import subprocess

    code = (
        "import sys, pipeline.scoring.plots, pipeline.scoring.metrics; "
        "print('matplotlib' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.strip() == "False"
