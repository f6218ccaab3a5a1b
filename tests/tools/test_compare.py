"""The compare report: what varies across a grid, rows labelled by experiment, and the
segmentation report (mIoU, Dice, per-class IoU, charts) read from a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tools import compare
from pipeline.tools.compare import markdown, run_rows, varied_settings
from pipeline.tracking import runs


def fake_run(name: str, arch: str, wd: str, top1: float) -> dict:
    return {
        "run_id": name,
        "name": arch,
        "params": {
            "model.arch": arch,
            "model.params": "1000" if arch == "a" else "2000",
            "model.macs": "5000000",
            "train.weight_decay": wd,
            "train.epochs": "3",
            "data.train_images": "100",
        },
        "metrics": {"test_top1": top1, "train_images_per_second": 500.0},
        "tags": {"dvc_experiment": name, "grid": "g"},
        "curves": {"train_accuracy": [0.5, 0.9], "val_accuracy": [0.4, 0.7]},
    }


def test_only_user_settings_that_differ_are_listed():
    runs = [fake_run("a-wd0", "a", "0.0", 0.7), fake_run("b-wd1", "b", "0.1", 0.8)]
    assert varied_settings([r["params"] for r in runs]) == ["train.weight_decay"]


def test_table_rows_are_labelled_by_experiment_best_first():
    runs = [fake_run("a-wd0", "a", "0.0", 0.7), fake_run("b-wd1", "b", "0.1", 0.8)]
    rows = run_rows(runs)
    assert [r["run"] for r in rows] == ["a-wd0", "b-wd1"]
    table = [line for line in markdown("exp", rows).splitlines() if line.startswith("| ")]
    assert "settings" in table[0]
    assert table[1].startswith("| b-wd1 | b | weight_decay=0.1 |")
    assert table[2].startswith("| a-wd0 | a | weight_decay=0.0 |")
    assert "+0.200" in table[1]  # train-val gap of the last epoch


# --- segmentation grids, through a real MLflow store ---

PNG = b"\x89PNG\r\n\x1a\n"
SEG_CHARTS = ("miou_vs_params", "miou_vs_throughput", "val_miou_curves", "per_class_iou")
CLS_CHARTS = ("top1_vs_params", "top1_vs_throughput", "learning_curves", "train_val_gap")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One project directory and SQLite store for the module (a new store takes seconds):
    `seg` a grid of segmenters, `mixed` the same plus a classifier, `pending` segmenters
    trained but not evaluated."""
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        log_grid("seg")
        log_grid("mixed")
        log_classifier("mixed")
        log_segmenter("pending", "a", "unet", 0.001, 1000, 10.0, [0.2, 0.3], {})
        log_segmenter("pending", "b", "unet", 0.01, 1000, 10.0, [0.1], {})
        yield root
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow exports it


def log_training(experiment, name, arch, *, task, params, img_s, curves, tests):
    """A finished training run as train (then evaluate, when `tests`) logs it."""
    import mlflow

    tags = {"task": task, "architecture": arch, "dvc_experiment": name, "grid": "g"}
    params = {"model.arch": arch, **params}
    with runs.training_run(experiment, run_name=arch, params=params, tags=tags):
        for epoch, values in enumerate(zip(*curves.values(), strict=True)):
            mlflow.log_metrics(dict(zip(curves, values, strict=True)), step=epoch)
        runs.log_metrics({"train_images_per_second": img_s, **tests})


def log_segmenter(experiment, name, arch, lr, size, img_s, val_miou, tests):
    params = {
        "model.params": size,
        "model.macs": size * 900,
        "model.output_stride": 16,
        "train.learning_rate": lr,
        "train.epochs": 4,
        "data.num_classes": 4,
    }
    curves = {"train_miou": [v + 0.1 for v in val_miou], "val_miou": val_miou}
    log_training(
        experiment, name, arch, task="segmentation", params=params, img_s=img_s,
        curves=curves, tests=tests,
    )  # fmt: skip


def seg_tests(miou, dice, pixel, per_class):
    """What evaluate logs for a segmenter."""
    return {
        "test_miou": miou,
        "test_mean_dice": dice,
        "test_pixel_accuracy": pixel,
        "test_mean_class_accuracy": pixel - 0.05,
        **{f"test_iou_{name}": v for name, v in per_class.items()},
    }


def log_grid(experiment):
    """Three segmenters: two evaluated (one with a class absent from its test set), one not."""
    log_segmenter(
        experiment, "unet-lr1", "unet", 0.001, 1_900_000, 42.0, [0.30, 0.45, 0.52],
        seg_tests(0.6125, 0.7311, 0.8842,
                  {"sky": 0.91, "road": 0.83, "car": 0.45, "traffic_light": 0.26}),
    )  # fmt: skip
    log_segmenter(
        experiment, "deeplab-lr1", "deeplabv3_plus", 0.01, 5_400_000, 18.5,
        [0.35, 0.55, 0.61, 0.66],
        seg_tests(0.7050, 0.8123, 0.9210, {"sky": 0.95, "road": 0.88, "car": 0.59}),
    )  # fmt: skip
    log_segmenter(experiment, "unet-lr2", "unet", 0.1, 1_900_000, 40.0, [0.10, 0.12], {})


def log_classifier(experiment):
    log_training(
        experiment, "cnn-1", "simple_cnn", task="classification",
        params={"model.params": 5000, "train.learning_rate": 0.01}, img_s=900.0,
        curves={"train_accuracy": [0.5, 0.8], "val_accuracy": [0.45, 0.7]},
        tests={"test_top1": 0.6931, "test_top5": 0.95},
    )  # fmt: skip


def table(report: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `header`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [rows[0], *rows[2:]]  # without the |---| row


def assert_pngs(folder: Path, names) -> None:
    for name in names:
        data = (folder / f"{name}.png").read_bytes()
        assert data[:8] == PNG and len(data) > 1000, name


def test_segmentation_grid_reports_miou_dice_and_per_class_iou(store):
    out = compare.run("seg", store / "reports" / "seg")
    report = (out / "report.md").read_text()

    header, *rows = table(report, "| run |")
    assert "test top-1" not in header
    col = {name: header.index(name) for name in header}
    by_run = {r[0]: r for r in rows}
    assert [r[0] for r in rows] == ["deeplab-lr1", "unet-lr1", "unet-lr2"]  # best mIoU first
    assert by_run["deeplab-lr1"][col["test mIoU"]] == "0.7050"
    assert by_run["deeplab-lr1"][col["mean Dice"]] == "0.8123"
    assert by_run["deeplab-lr1"][col["pixel acc."]] == "0.9210"
    assert by_run["unet-lr1"][col["test mIoU"]] == "0.6125"
    assert by_run["unet-lr1"][col["mean Dice"]] == "0.7311"
    assert by_run["unet-lr1"][col["params"]] == "1,900,000"
    assert by_run["unet-lr1"][col["train img/s"]] == "42"
    assert by_run["deeplab-lr1"][col["settings"]] == "learning_rate=0.01"  # only what varies
    assert by_run["deeplab-lr1"][col["train-val mIoU gap"]] == "+0.100"
    # trained, not evaluated: empty test cells and a note, no crash
    assert by_run["unet-lr2"][col["test mIoU"]] == "" and by_run["unet-lr2"][col["arch"]] == "unet"
    assert "Not evaluated yet (no test metrics): unet-lr2." in report

    header, *classes = table(report, "| class |")
    assert header == ["class", "deeplab-lr1", "unet-lr1"]
    assert {c[0]: c[1:] for c in classes} == {
        "car": ["0.5900", "0.4500"],
        "road": ["0.8800", "0.8300"],
        "sky": ["0.9500", "0.9100"],
        "traffic_light": ["", "0.2600"],
    }
    for name in SEG_CHARTS:
        assert f"]({name}.png)" in report
    assert_pngs(out, SEG_CHARTS)
    assert not (out / "top1_vs_params.png").exists()


def test_segmenters_with_no_test_metrics_still_get_a_report(store):
    out = compare.run("pending", store / "pending", log=False)
    report = (out / "report.md").read_text()
    assert "No per-class test IoU yet." in report
    assert "Not evaluated yet (no test metrics): a, b." in report
    assert_pngs(out, SEG_CHARTS)


def test_a_mixed_experiment_gets_a_section_per_task(store):
    out = compare.run("mixed", store / "mixed", log=False)
    report = (out / "report.md").read_text()
    classification, segmentation = report.split("## Classification")[1].split("## Segmentation")
    assert "| cnn-1 | simple_cnn |" in classification and "0.6931" in classification
    assert "deeplab-lr1" not in classification and "cnn-1" not in segmentation
    assert "| deeplab-lr1 | deeplabv3_plus |" in segmentation and "0.7050" in segmentation
    assert_pngs(out, SEG_CHARTS + CLS_CHARTS)
