"""`python -m pipeline explain` on models registered in a real MLflow SQLite store: the
PNGs and index.json it writes, and each bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from pipeline.__main__ import main

SIDE = 16  # the prepared digits' 16x16x1


def register(name: str, model, card: dict) -> None:
    """Log `model` in a run, register it and point @champion at it (the real store)."""
    from pipeline.tracking import logged_models, model_registry, runs

    with runs.training_run("explain", run_name=name, params={}, tags={}) as run_id:
        uri = logged_models.log_model(model, card=card)
        runs.log_metrics({"test_top1": 0.5})
    version = model_registry.register(
        {"run_id": run_id, "model_uri": uri}, name, metrics={"test_top1": 0.5}
    )
    model_registry.promote(
        name, version=version, metric="test_top1", higher_is_better=True, force=True
    )


@pytest.fixture(scope="module")
def project(digits_prepared, tmp_path_factory):
    """A project folder: the prepared digits, a folder of images, and three models
    registered as @champion: a simple_cnn (`cnn`), a resnet18 (`res`, skip connections), a
    class-token ViT (`vit`) and a per-pixel classifier (`seg`, a segmentation model)."""
    import keras

    from pipeline.models.architectures import build_model

    root = tmp_path_factory.mktemp("explain")
    shutil.copytree(digits_prepared, root / "data/prepared")
    card = json.loads((root / "data/prepared/data_card.json").read_text())
    classes = card["classes"]
    rng = np.random.default_rng(0)
    (root / "images/more").mkdir(parents=True)
    for path in ("images/a.png", "images/b.jpg", "images/more/c.png"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / path)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        keras.utils.set_random_seed(0)
        shape = (SIDE, SIDE, 1)
        register("cnn", build_model("simple_cnn", shape, len(classes), width_multiplier=0.25), card)
        register("res", build_model("resnet18", shape, len(classes), width_multiplier=0.25), card)
        vit = build_model("vit_tiny", shape, len(classes), width_multiplier=0.25, class_token=True)
        register("vit", vit, card)
        inputs = keras.Input(shape)
        scores = keras.layers.Conv2D(3, 1, activation="softmax", name="scores")(
            keras.layers.Rescaling(1 / 255)(inputs)
        )
        seg_card = {"classes": ["bg", "a", "b"], "image_shape": list(shape)}
        register("seg", keras.Model(inputs, scores), {**seg_card, "task": "segmentation"})
    return root


def explain(project: Path, *args: str, capsys) -> tuple[int, str]:
    """The CLI's main in this process (the models load in seconds, not a fresh
    interpreter's tens): exit code and stderr."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        code = main(["explain", *args])
    return code, capsys.readouterr().err


def test_explain_a_registered_model_writes_pngs_and_an_index(project):
    out = project / "out_cnn"
    methods = "gradcam,gradcampp,saliency,smoothgrad,features,filters,maximize"
    result = run_cli(
        ["explain", "--model", "models:/cnn@champion", "--input", "images", "--out", "out_cnn"]
        + ["--method", methods, "--class", "7"],
        project,
    )
    assert result.returncode == 0, result.stderr
    assert "explain: 3 images" in result.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["model"] == "models:/cnn@champion"
    assert index["methods"] == methods.split(",")
    assert [e["file"] for e in index["images"]] == ["a.png", "b.jpg", "more/c.png"]
    first = index["images"][0]
    assert first["explained_class"] == "7"
    assert first["class"] in index["classes"] and 0 < first["probability"] <= 1
    assert first["png"]["gradcam"] == "gradcam/a.png"
    assert first["layer"] == {
        "gradcam": "stage3_down_maxpool",
        "gradcampp": "stage3_down_maxpool",
        "saliency": None,
        "smoothgrad": None,
        "features": "stage1_2_relu",
    }
    assert index["model_figures"]["filters"]["layer"] == "stage1_1_conv"
    assert index["model_figures"]["maximize"]["channels"] == list(range(8))
    pngs = [out / p for e in index["images"] for p in e["png"].values()]
    pngs += [out / f["png"] for f in index["model_figures"].values()]
    assert len(pngs) == 3 * 5 + 2
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG"
    total = sum(p.stat().st_size for p in out.rglob("*"))
    assert total < 1_000_000, f"{total} bytes"
    assert not list(project.glob(".out_cnn.tmp-*"))


def test_explain_a_split_on_another_layer(project, capsys):
    code, err = explain(
        project,
        *("--model", "models:/res@champion", "--input", "test", "--out", "out_split"),
        *("--method", "gradcam,features", "--layer", "stage3_block2_out_relu", "--limit", "2"),
        capsys=capsys,
    )
    assert code == 0, err
    index = json.loads((project / "out_split/index.json").read_text())
    labels = np.load(project / "data/prepared/test_labels.npy")[:2]
    assert [e["file"] for e in index["images"]] == ["test_00000", "test_00001"]
    assert [e["label"] for e in index["images"]] == [str(v) for v in labels]
    assert index["images"][0]["layer"]["gradcam"] == "stage3_block2_out_relu"
    assert (project / "out_split/gradcam/test_00001.png").is_file()


def test_explain_a_vit_with_attention_rollout(project, capsys):
    code, err = explain(
        project,
        *("--model", "models:/vit@champion", "--input", "images", "--out", "out_vit"),
        *("--method", "attention,gradcam", "--limit", "1"),
        capsys=capsys,
    )
    assert code == 0, err
    entry = json.loads((project / "out_vit/index.json").read_text())["images"][0]
    assert entry["png"] == {"attention": "attention/a.png", "gradcam": "gradcam/a.png"}
    assert entry["layer"] == {"attention": "block12_attn", "gradcam": "stem_patch_conv"}


BAD = {
    "unknown layer": (
        ["--layer", "nope"],
        "--layer 'nope': simple_cnn has no such layer",
    ),
    "non-spatial layer": (
        ["--layer", "head_dense"],
        "--layer 'head_dense': its output (None, 10) is not a spatial map",
    ),
    "unknown method": (["--method", "gradcam,xray"], "--method xray: unknown; choose from"),
    "unknown class": (["--class", "eleven"], "--class 'eleven': not a class of this model"),
    "attention on a CNN": (
        ["--method", "attention"],
        "--method attention: simple_cnn has no self-attention layers",
    ),
    "missing input": (
        ["--input", "no_such_folder"],
        "--input no_such_folder: neither a folder of images nor a split",
    ),
    "skip connection": (
        ["--model", "models:/res@champion", "--layer", "stage2_block1_1_relu"],
        "--layer 'stage2_block1_1_relu': the output does not depend on it alone",
    ),
    "segmentation model": (
        ["--model", "models:/seg@champion", "--method", "saliency"],
        "is a segmentation model; class attributions need a classifier",
    ),
    "unknown model": (
        ["--model", "models:/nobody@champion"],
        "explain --model",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(project, capsys, case):
    args, message = BAD[case]
    defaults = {"--model": "models:/cnn@champion", "--input": "images", "--out": "bad_out"}
    given = dict(zip(args[::2], args[1::2], strict=True))
    argv = [x for key, value in {**defaults, **given}.items() for x in (key, value)]
    code, err = explain(project, *argv, capsys=capsys)
    assert code == 2
    # MLflow's download progress bar aside (it draws over itself with \r)
    lines = [line for line in err.splitlines() if line and "Downloading artifacts" not in line]
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert not (project / "bad_out").exists()
    assert not list(project.glob(".bad_out.tmp-*"))


def test_a_bad_run_leaves_an_earlier_output_and_a_foreign_folder_alone(project, capsys):
    out = project / "kept"
    code, err = explain(project, "--model", "models:/cnn@champion", "--input", "images",
                        "--out", "kept", "--limit", "1", capsys=capsys)  # fmt: skip
    assert code == 0, err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = explain(project, "--model", "models:/cnn@champion", "--input", "images",
                        "--out", "kept", "--layer", "nope", capsys=capsys)  # fmt: skip
    assert code == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (project / "mine").mkdir()
    (project / "mine/notes.txt").write_text("keep me")
    code, err = explain(project, "--input", "images", "--out", "mine", capsys=capsys)
    assert code == 2 and "--out mine: exists and is not an earlier explain output" in err
    assert (project / "mine/notes.txt").read_text() == "keep me"
