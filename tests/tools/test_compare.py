"""The compare report's table: what varies across a grid, and rows labelled by experiment."""

from __future__ import annotations

from pipeline.tools.compare import markdown, run_rows, varied_settings


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
