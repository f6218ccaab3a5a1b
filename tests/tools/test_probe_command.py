"""`python -m pipeline probe` against a real MLflow SQLite store: the table, chart and
metrics logged to the trained model's run (data/model's run file) or to the run that
logged a registered model; each bad input one line, exit 2."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import in_project, run_cli

from pipeline.__main__ import main


def csv_test_top1(csv_file: Path) -> dict[str, float]:
    """Test top-1 per row of probe.csv, by layer."""
    with open(csv_file, newline="") as f:
        return {row["layer"]: float(row["test_top1"]) for row in csv.DictReader(f)}


def _client():
    from pipeline.tracking.store import mlflow_client

    return mlflow_client()


@pytest.fixture(scope="module")
def project(digits_prepared, tmp_path_factory):
    """A project folder: the prepared digits; data/model, a simple_cnn (width 0.25)
    trained 4 epochs, logged in an MLflow run named by data/model/mlflow_run.json and
    registered as `cnn` @champion; a segmentation model registered as `seg` @champion."""
    import keras

    from pipeline.data.loader import load_split
    from pipeline.models.architectures import build_model
    from pipeline.tracking import logged_models, model_registry, runs

    root = tmp_path_factory.mktemp("probe")
    shutil.copytree(digits_prepared, root / "data/prepared")
    card = json.loads((root / "data/prepared/data_card.json").read_text())
    with in_project(root):
        keras.utils.set_random_seed(0)
        classes = len(card["classes"])  # dropout as shipped: the head reads GAP through it
        model = build_model("simple_cnn", (16, 16, 1), classes, width_multiplier=0.25, dropout=0.2)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
        x, y = load_split(root / "data/prepared", "train")
        model.fit(np.asarray(x, "float32"), y, batch_size=64, epochs=4, verbose=0)
        with runs.training_run("probe", run_name="cnn", params={}, tags={}) as run_id:
            uri = logged_models.log_model(model, card=card)
            runs.log_metrics({"test_top1": 0.5})  # what promote gates on
        (root / "data/model").mkdir(parents=True)
        model.save(root / "data/model/model.keras")
        runs.write_run_file(run_id, uri, root / "data/model")
        model_registry.register(
            {"run_id": run_id, "model_uri": uri}, "cnn", metrics={"test_top1": 0.5}
        )
        model_registry.promote(
            "cnn", version="1", metric="test_top1", higher_is_better=True, force=True
        )

        inputs = keras.Input((16, 16, 1))
        scores = keras.layers.Conv2D(3, 1, activation="softmax")(inputs)
        seg_card = {"classes": ["bg", "a", "b"], "image_shape": [16, 16, 1]}
        with runs.training_run("probe", run_name="seg", params={}, tags={}) as seg_run:
            seg_uri = logged_models.log_model(
                keras.Model(inputs, scores), card={**seg_card, "task": "segmentation"}
            )
            runs.log_metrics({"test_top1": 0.5})
        model_registry.register(
            {"run_id": seg_run, "model_uri": seg_uri}, "seg", metrics={"test_top1": 0.5}
        )
        model_registry.promote(
            "seg", version="1", metric="test_top1", higher_is_better=True, force=True
        )
    return root


def test_probe_of_data_model_logs_table_chart_and_metrics_to_its_training_run(project):
    result = run_cli(["probe", "--max-train", "600"], project)
    assert result.returncode == 0, result.stderr
    out = project / "reports/probe"
    assert sorted(p.name for p in out.iterdir()) == ["probe.csv", "probe.md", "probe.png"]
    assert "probe: stage 3 pooled stage3_down_maxpool" in result.stdout
    # the head reads the last map pooled (through dropout): no separate penultimate row
    assert "penultimate" not in result.stdout
    top1 = csv_test_top1(out / "probe.csv")
    assert top1["stage3_down_maxpool"] >= 0.8  # the last stage
    assert top1["most frequent class"] < 0.2
    assert "fitted on 600 train images" in (out / "probe.md").read_text()

    run_id = json.loads((project / "data/model/mlflow_run.json").read_text())["run_id"]
    with in_project(project):
        client = _client()
        logged = {a.path for a in client.list_artifacts(run_id, "probe")}
        run = client.get_run(run_id)
    assert logged == {"probe/probe.csv", "probe/probe.md", "probe/probe.png"}
    assert run.data.metrics["probe_test_top1_stage3_down_maxpool"] == pytest.approx(
        top1["stage3_down_maxpool"], abs=1e-4
    )
    assert "probe_val_top1_chance" in run.data.metrics
    assert run.info.status == "FINISHED"


def probe(project: Path, *args: str, capsys) -> tuple[int, str]:
    """The CLI's main in this process: exit code and stderr."""
    with in_project(project):
        code = main(["probe", *args])
    return code, capsys.readouterr().err


def test_probe_of_a_registered_model_logs_to_the_run_that_logged_it(project, capsys):
    code, err = probe(
        project, "--model", "models:/cnn@champion", "--out", "out_reg", "--max-train", "300",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    with in_project(project):
        client = _client()
        run_id = client.get_model_version_by_alias("cnn", "champion").run_id
        metrics = client.get_run(run_id).data.metrics
    assert metrics["probe_test_top1_stage1_2_relu"] == pytest.approx(
        csv_test_top1(project / "out_reg/probe.csv")["stage1_2_relu"], abs=1e-4
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "models:/seg@champion"], "is a segmentation model; linear probes need"),
        (["--model", "models:/nothing@champion"], "probe --model 'models:/nothing@champion'"),
        (["--max-train", "0"], "probe --max-train 0: give a positive number"),
        (["--prepared", "no_val"], "no_val has no val split (val_images.npy missing"),
    ],
)
def test_bad_inputs_are_one_line_exit_2_and_nothing_written(project, capsys, args, message):
    if "no_val" in args and not (project / "no_val").exists():
        shutil.copytree(project / "data/prepared", project / "no_val")
        (project / "no_val/val_images.npy").unlink()
    code, err = probe(project, *args, "--out", "bad_out", capsys=capsys)
    assert code == 2, err
    assert message in err
    # MLflow's download progress bar shares stderr; the error is one line of its own
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if message in line
    ], err
    assert "Traceback" not in err
    assert not (project / "bad_out").exists()
