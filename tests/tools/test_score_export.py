"""`score` and `export` against a real MLflow SQLite store and a trained digits model:
scoring new labelled data reproduces evaluate's figures and logs an evaluation run
linked to the model and its data; each exported copy agrees with Keras, int8 is a
fraction of the size; every bad input is one line, exit 2, nothing produced lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import class_files, in_project, make_tar, mask_files
from PIL import Image

from pipeline.__main__ import main

MODEL = "models:/cnn@champion"
TENSORFLOW = keras.backend.backend() == "tensorflow"


@pytest.fixture(scope="module")
def project(digits_prepared, tmp_path_factory):
    """The prepared digits and a simple_cnn (as shipped: int8 shrinks a model that small
    less, its graph and scales weigh more) trained 4 epochs, logged in a run
    of experiment `score` and registered as `cnn` @champion; its test split also as a
    folder of PNGs (`test_folder/<class>/`)."""
    from pipeline.data.loader import load_split
    from pipeline.models.architectures import build_model
    from pipeline.tracking import logged_models, model_registry, runs

    root = tmp_path_factory.mktemp("score")
    shutil.copytree(digits_prepared, root / "data/prepared")
    card = json.loads((root / "data/prepared/data_card.json").read_text())
    with in_project(root):
        keras.utils.set_random_seed(0)
        model = build_model("simple_cnn", (16, 16, 1), 10)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
        x, y = load_split(root / "data/prepared", "train")
        model.fit(np.asarray(x, "float32"), y, batch_size=64, epochs=4, verbose=0)
        with runs.training_run("score", run_name="cnn", params={}, tags={}) as run_id:
            uri = logged_models.log_model(model, card=card)
            runs.log_metrics({"test_top1": 0.5})  # what promote gates on
        model_registry.register(
            {"run_id": run_id, "model_uri": uri}, "cnn", metrics={"test_top1": 0.5}
        )
        model_registry.promote(
            "cnn", version="1", metric="test_top1", higher_is_better=True, force=True
        )
    images, labels = load_split(root / "data/prepared", "test")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / "test_folder" / card["classes"][label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{i:04d}.png")
    return root


def cli(project: Path, *args: str, capsys) -> tuple[int, str, str]:
    with in_project(project):
        code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def keras_test_report(project: Path) -> dict:
    """What evaluate computes on the test split: the same functions, the Keras model."""
    from pipeline.scoring.metrics import classification_report
    from pipeline.scoring.predictions import predict_split
    from pipeline.tracking.logged_models import load_logged_model

    with in_project(project):
        model, card = load_logged_model(MODEL, key="test")
    probs, labels = predict_split(model, project / "data/prepared", "test", 256)
    return classification_report(probs, labels, card["classes"])[0]


def test_score_of_the_test_images_reproduces_evaluate_and_logs_an_evaluation_run(project, capsys):
    from pipeline.tracking.store import mlflow_client

    code, out, err = cli(
        project, "score", "--model", MODEL, "--data", "test_folder", "--out", "s1", capsys=capsys
    )
    assert code == 0, err
    score = json.loads((project / "s1/score.json").read_text())
    expected = keras_test_report(project)
    assert score["test_top1"] == expected["test_top1"]
    assert score["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6)
    card = json.loads((project / "data/prepared/data_card.json").read_text())
    assert score["data_sha256"] == card["sha256"]["test"]  # the same images, the same digest
    assert score["split"] == "all" and score["num_images"] == card["totals"]["test"]
    for name in ("images/confusion_matrix.png", "images/per_class.png", "tables/confusion.csv"):
        assert (project / "s1" / name).stat().st_size > 0
    assert f"top-1 {score['test_top1']:.4f}" in out

    with in_project(project):
        client = mlflow_client()
        version = client.get_model_version_by_alias("cnn", "champion")
        (run,) = client.search_runs(
            [client.get_run(version.run_id).info.experiment_id],
            "tags.`pipeline.kind` = 'score'",
        )
    assert run.data.tags["mlflow.parentRunId"] == version.run_id
    assert run.data.metrics["test_top1"] == score["test_top1"]
    (scored,) = run.inputs.dataset_inputs
    assert scored.dataset.digest == card["sha256"]["test"][:36]
    assert {t.key: t.value for t in scored.tags}["mlflow.data.context"] == "scored"
    prefix = f"score.{card['sha256']['test'][:12]}"
    assert float(version.tags[f"{prefix}.test_top1"]) == pytest.approx(score["test_top1"])
    assert version.tags[f"{prefix}.run_id"] == run.info.run_id


def test_score_reads_an_archive_over_http_checks_it_and_takes_its_test_split(
    project, server, capsys
):
    files = {}
    for split in ("train", "test"):
        for path in sorted((project / "test_folder").rglob("*.png"))[::9]:
            files[f"holdout/{split}/{path.parent.name}/{path.name}"] = path.read_bytes()
    archive = make_tar(server.root / "holdout.tar.gz", files)
    import hashlib

    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = f"{server.url}/holdout.tar.gz"
    code, _, err = cli(
        project, "score", "--model", MODEL, "--data", url, "--sha256", digest,
        "--out", "s2", "--tta", "flip", "--no-log", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    score = json.loads((project / "s2/score.json").read_text())
    assert score["split"] == "test" and score["tta"] == "flip"
    assert score["num_images"] == len(files) // 2 and score["archive_sha256"] == digest
    assert score["data"] == url

    code, _, err = cli(
        project, "score", "--model", MODEL, "--data", url, "--sha256", "0" * 64,
        "--out", "s2", capsys=capsys,
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "error: score: checksum mismatch for http://127.0.0.1" in err
    assert json.loads((project / "s2/score.json").read_text()) == score  # kept as it was


def colour_folder(root: Path) -> Path:
    for name in ("0", "1"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / name / "a.png")
    return root


BAD_DATA = {
    # case: (make data under this folder, extra args, words of the one-line error)
    "unknown class": (
        lambda root: make_tar(root / "d.tar.gz", class_files(classes=("0", "cat"), per_class=2)),
        [],
        "class 'cat' of",
    ),
    "missing classes": (
        lambda root: make_tar(root / "d.tar.gz", class_files(classes=("0", "1"), per_class=2)),
        [],
        "has no images of the model's classes 2, 3, 4",
    ),
    "colour images for a grayscale model": (
        colour_folder,
        ["--allow-missing-classes"],
        "is a colour image (RGB) and the model reads grayscale",
    ),
    "segmentation data": (
        lambda root: make_tar(root / "d.tar.gz", mask_files()),
        [],
        "is segmentation data (images/ and masks/) and the model is a classification model",
    ),
    "split of unsplit data": (
        lambda root: make_tar(root / "d.tar.gz", class_files(classes=("0", "1"), per_class=2)),
        ["--split", "test"],
        "--split test:",
    ),
    "no such data": (lambda root: root / "nothing-here", [], "no such folder or archive"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_exit_2_and_keeps_the_last_score(project, tmp_path, case, capsys):
    make, extra, words = BAD_DATA[case]
    data = make(tmp_path / "data" if case.startswith("colour") else tmp_path)
    kept = project / "kept"
    kept.mkdir(exist_ok=True)
    (kept / "score.json").write_text("{}")
    code, _, err = cli(
        project, "score", "--model", MODEL, "--data", str(data), "--out", "kept", *extra,
        capsys=capsys,
    )  # fmt: skip
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert (kept / "score.json").read_text() == "{}"


def test_a_subset_of_the_classes_is_scored_when_allowed(project, tmp_path, capsys):
    subset = tmp_path / "subset"
    for name in ("3", "7"):
        shutil.copytree(project / "test_folder" / name, subset / name)
    code, _, err = cli(
        project, "score", "--model", MODEL, "--data", str(subset), "--out", "s3",
        "--allow-missing-classes", "--no-log", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    score = json.loads((project / "s3/score.json").read_text())
    assert score["classes_scored"] == ["3", "7"]
    per_class = json.loads((project / "s3/per_class.json").read_text())
    assert per_class["3"]["support"] > 0 and per_class["0"]["support"] == 0


def exported(project: Path, out: str, *args: str, capsys) -> dict:
    model = () if "--model" in args else ("--model", MODEL)
    code, _, err = cli(project, "export", *model, "--out", out, *args, capsys=capsys)
    assert code == 0, err
    return json.loads((project / out / "export.json").read_text())


def test_onnx_export_agrees_with_keras_and_int8_is_small_and_as_accurate(project, capsys):
    import mlflow
    import pandas as pd

    from pipeline.data.loader import load_split

    result = exported(project, "onnx", "--quantize", "int8", "--calibration", "200", capsys=capsys)
    full, int8 = result["copies"]["float32"], result["copies"]["int8"]
    assert full["max_abs_logit_diff"] <= 1e-5 and full["top1_disagreements"] == 0
    assert full["export_top1"] == full["keras_top1"]
    assert int8["size_vs_float32"] <= 0.30
    assert abs(int8["export_top1"] - int8["keras_top1"]) <= 0.01
    assert result["calibration_images"] == 200

    # The logged ONNX model answers through MLflow with the Keras pyfunc's classes.
    images, _ = load_split(project / "data/prepared", "test")
    batch = np.asarray(images[:40], np.float32)
    with in_project(project):
        client = mlflow.MlflowClient()
        run_id = client.get_model_version_by_alias("cnn", "champion").run_id
        mlflow.set_tracking_uri("sqlite:///mlflow.db")
        (logged,) = mlflow.search_logged_models(
            experiment_ids=[client.get_run(run_id).info.experiment_id],
            filter_string=f"name = 'onnx_float32' AND source_run_id = '{run_id}'",
            output_format="list",
        )
        onnx_answer = mlflow.pyfunc.load_model(logged.model_uri).predict({"image": batch})
        keras_answer = mlflow.pyfunc.load_model(MODEL).predict(
            pd.DataFrame({"array": [image.tolist() for image in images[:40]]})
        )
        metrics = client.get_run(run_id).data.metrics
    classes = json.loads((project / "onnx/data_card.json").read_text())["classes"]
    onnx_classes = [classes[i] for i in np.asarray(onnx_answer["probabilities"]).argmax(axis=1)]
    assert onnx_classes == list(keras_answer["class"])
    assert metrics["export.onnx.int8.size_vs_float32"] == pytest.approx(int8["size_vs_float32"])


@pytest.mark.skipif(not TENSORFLOW, reason="LiteRT converts on the TensorFlow backend")
def test_litert_int8_export_is_small_and_as_accurate(project, capsys):
    result = exported(project, "litert", "--format", "litert", "--quantize", "int8",
                      "--no-log", capsys=capsys)  # fmt: skip
    full, int8 = result["copies"]["float32"], result["copies"]["int8"]
    assert full["max_abs_logit_diff"] <= 1e-5 and full["top1_agreement"] == 1.0
    assert int8["size_vs_float32"] <= 0.30
    assert abs(int8["export_top1"] - int8["keras_top1"]) <= 0.01


BAD_EXPORTS = {
    "calibration without int8": (["--calibration", "10"], "does nothing without --quantize int8"),
    "quantized SavedModel": (
        ["--format", "saved_model", "--quantize", "int8"],
        "a SavedModel is not quantized",
    ),
    "prepared data of other classes": (["--prepared", "other"], "its classes"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORTS))
def test_bad_export_options_are_one_line_exit_2(project, case, capsys):
    args, words = BAD_EXPORTS[case]
    other = project / "other"
    if not other.exists():
        shutil.copytree(project / "data/prepared", other)
        card = json.loads((other / "data_card.json").read_text())
        (other / "data_card.json").write_text(json.dumps({**card, "classes": list("abcdefghij")}))
    code, _, err = cli(
        project, "export", "--model", MODEL, "--out", "bad", *args, "--no-log", capsys=capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (project / "bad").exists()


def test_litert_is_refused_on_jax_in_one_line():
    from pipeline.errors import ConfigError
    from pipeline.tools.export import check_options

    with pytest.raises(ConfigError, match="--format litert needs Keras's TensorFlow backend"):
        check_options("litert", "none", 256, "jax")


@pytest.fixture(scope="module")
def segmenter(project):
    """A 1x1-conv segmentation model (3 classes, 8x8 grey) registered as `seg` @champion."""
    from pipeline.tracking import logged_models, model_registry, runs

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(3, 1, kernel_initializer="he_normal")(x)
    model = keras.Model(inputs, keras.layers.Activation("softmax", name="probs")(x))
    card = {
        "task": "segmentation",
        "classes": ["sky", "road", "car"],
        "num_classes": 3,
        "ignore_index": 255,
        "image_shape": [8, 8, 1],
        "source": {"ignore_index": 255},
    }
    with in_project(project):
        with runs.training_run("score", run_name="seg", params={}, tags={}) as run_id:
            uri = logged_models.log_model(model, card=card)
            runs.log_metrics({"test_miou": 0.5})
        model_registry.register(
            {"run_id": run_id, "model_uri": uri}, "seg", metrics={"test_miou": 0.5}
        )
        model_registry.promote(
            "seg", version="1", metric="test_miou", higher_is_better=True, force=True
        )
    return "models:/seg@champion"


def test_a_segmentation_model_is_scored_with_miou_and_refuses_translated_views(
    project, segmenter, tmp_path, capsys
):
    data = make_tar(tmp_path / "scenes.tar.gz", mask_files(splits=("train/", "test/")))
    code, _, err = cli(
        project, "score", "--model", segmenter, "--data", str(data), "--out", "seg1",
        "--tta", "flip", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    score = json.loads((project / "seg1/score.json").read_text())
    assert 0 <= score["test_miou"] <= 1 and "test_mean_dice" in score
    assert (project / "seg1/tables/per_class_iou.csv").read_text().startswith("class,iou,dice")
    code, _, err = cli(
        project, "score", "--model", segmenter, "--data", str(data), "--out", "seg2",
        "--tta", "flip_translate", capsys=capsys,
    )  # fmt: skip
    assert code == 2 and "flip_translate is for classifiers" in err
    code, _, err = cli(
        project, "score", "--model", MODEL, "--data", str(data), "--out", "seg2", capsys=capsys
    )
    assert code == 2 and "is segmentation data" in err


def test_a_segmentation_model_exports_with_per_pixel_agreement(project, segmenter, capsys):
    prepared = project / "seg_data"
    prepared.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        np.save(prepared / f"{split}_images.npy", rng.integers(0, 256, (count, 8, 8, 1), np.uint8))
        np.save(prepared / f"{split}_labels.npy", rng.integers(0, 3, (count, 8, 8), np.uint8))
    card = {
        "task": "segmentation", "classes": ["sky", "road", "car"], "num_classes": 3,
        "image_shape": [8, 8, 1], "counts": {}, "totals": {"train": 6, "test": 4},
        "source": {}, "data_hash": "x",
    }  # fmt: skip
    (prepared / "data_card.json").write_text(json.dumps(card))
    result = exported(
        project, "seg_onnx", "--model", segmenter, "--prepared", "seg_data",
        "--quantize", "int8", "--calibration", "6", "--no-log", capsys=capsys,
    )  # fmt: skip
    full = result["copies"]["float32"]
    assert full["max_abs_probability_diff"] <= 1e-5
    assert full["top1_disagreements"] == 0 and full["top1_agreement"] == 1.0
    assert result["copies"]["int8"]["top1_agreement"] > 0.8  # per pixel
