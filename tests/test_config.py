"""params.yaml validation: the shipped file passes, every kind of mistake names its key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import params_with, run_cli

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.tools import check

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


def shipped() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def with_value(section: str, key: str, value) -> dict:
    """The shipped params with one key set (or added)."""
    return params_with({f"{section}.{key}": value})


def write_params(path: Path, params) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the shipped file


def test_shipped_params_validate() -> None:
    loaded = config.load_all(PARAMS)
    assert set(loaded) == {*config.SECTIONS, "task"}
    raw = shipped()
    assert loaded["task"] == raw.pop("task") == "classification"
    # Every value written in params.yaml arrives in its config object unchanged.
    for section, values in raw.items():
        for key, value in values.items():
            expected = tuple(value) if isinstance(value, list) else value
            assert getattr(loaded[section], key) == expected, f"{section}.{key}"
    assert isinstance(loaded["train"], config.TrainConfig)
    assert isinstance(loaded["train"].learning_rate, float)


# --------------------------------------------------------------------------- bad values

# (id, params or a text to write, substrings the error message must contain)
BAD_CASES = [
    ("unknown-key", with_value("train", "lr", 0.1), ["train.lr", "learning_rate", "epochs"]),
    (
        "unknown-section",
        {**shipped(), "trian": {"epochs": 3}},
        ["'trian'", "allowed", "train", "prepare"],
    ),
    ("epochs-str", with_value("train", "epochs", "ten"), ["train.epochs", "integer", "'ten'"]),
    ("epochs-float", with_value("train", "epochs", 2.5), ["train.epochs", "integer", "2.5"]),
    (
        "small-input-str",
        with_value("model", "small_input", "yes"),
        ["model.small_input", "true or false", "'yes'"],
    ),
    (
        "batch-size-bool",
        with_value("train", "batch_size", True),
        ["train.batch_size", "integer", "True"],
    ),
    ("lr-zero", with_value("train", "learning_rate", 0), ["train.learning_rate", "> 0"]),
    ("lr-negative", with_value("train", "learning_rate", -0.1), ["train.learning_rate", "> 0"]),
    (
        "test-fraction-one",
        with_value("prepare", "test_fraction", 1.0),
        ["prepare.test_fraction", "< 1"],
    ),
    ("dropout-one", with_value("model", "dropout", 1.0), ["model.dropout", "< 1"]),
    (
        "optimizer-adagrad",
        with_value("train", "optimizer", "adagrad"),
        ["train.optimizer", "'sgd'", "'adamw'", "'adagrad'"],
    ),
    (
        "precision-fp16",
        with_value("train", "precision", "fp16"),
        ["train.precision", "'float32'", "'mixed_bfloat16'", "'mixed_float16'", "'fp16'"],
    ),
    ("channels-2", with_value("prepare", "channels", 2), ["prepare.channels", "1, 3", "got 2"]),
    (
        "on-corrupt-ignore",
        with_value("prepare", "on_corrupt", "ignore"),
        ["prepare.on_corrupt", "'fail', 'skip'", "got 'ignore'"],
    ),
    (
        "unknown-arch",
        with_value("model", "arch", "resnet9000"),
        ["model.arch", "'resnet9000'", "simple_cnn", "resnet18"],
    ),
    (
        "fractions-sum-one",
        {
            **shipped(),
            "prepare": {**shipped()["prepare"], "val_fraction": 0.5, "test_fraction": 0.5},
        },
        ["prepare.val_fraction", "prepare.test_fraction", "< 1"],
    ),
    (
        "warmup-not-below-epochs",
        {**shipped(), "train": {**shipped()["train"], "epochs": 3, "warmup_epochs": 3}},
        ["train.warmup_epochs", "train.epochs", "less than"],
    ),
    (
        "archive-without-url",
        {**shipped(), "fetch": {**shipped()["fetch"], "source": "archive", "url": ""}},
        ["fetch.url", "archive"],
    ),
    (
        "sha256-not-hex",
        params_with({"fetch.source": "archive", "fetch.url": "a.tgz", "fetch.sha256": "xyz" * 20}),
        ["fetch.sha256", "64 hex"],
    ),
    (
        "file-url",
        params_with({"fetch.source": "archive", "fetch.url": "file:///srv/a.tgz"}),
        ["fetch.url", "path", "file:"],
    ),
    ("url-for-digits", with_value("fetch", "url", "a.tgz"), ["fetch.url", "archive", "digits"]),
    ("sha256-for-digits", with_value("fetch", "sha256", "0" * 64), ["fetch.sha256", "archive"]),
    ("task-unknown", {**shipped(), "task": "detection"}, ["task", "segmentation", "'detection'"]),
    ("unet-for-classification", with_value("model", "arch", "unet"), ["model.arch", "'unet'"]),
    (
        "classifier-for-segmentation",
        {**shipped(), "task": "segmentation"},
        ["model.arch", "'simple_cnn'", "task: segmentation", "unet"],
    ),
    (
        "unknown-encoder",
        {**shipped(), "model": {**shipped()["model"], "arch": "unet", "encoder": "resnet9"}},
        ["model.encoder", "'resnet9'", "plain", "resnet18"],
    ),
    (
        "deeplab-without-encoder",
        with_value("model", "arch", "deeplabv3plus"),
        ["model.encoder", "deeplabv3plus", "zoo encoder"],
    ),
    (
        "dice-for-classification",
        with_value("train", "loss", "dice"),
        ["train.loss", "task: segmentation"],
    ),
    (
        "image-size-three-sides",
        with_value("prepare", "image_size", [64, 64, 64]),
        ["prepare.image_size", "[height, width]"],
    ),
    (
        "image-size-height-too-small",
        with_value("prepare", "image_size", [4, 64]),
        ["prepare.image_size[0]", ">= 8"],
    ),
    (
        "image-size-text",
        with_value("prepare", "image_size", "large"),
        ["prepare.image_size", "an integer or a list", "large"],
    ),
    ("not-yaml", "train: [unclosed\n", ["bad.yaml", "not valid YAML"]),
    ("top-level-list", "- train\n- model\n", ["bad.yaml", "mapping", "list"]),
]


@pytest.mark.parametrize(
    ("content", "expected"),
    [pytest.param(content, expected, id=name) for name, content, expected in BAD_CASES],
)
def test_bad_params_name_the_key(tmp_path: Path, content, expected: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    if isinstance(content, str):
        bad.write_text(content)
    else:
        write_params(bad, content)
    with pytest.raises(ConfigError) as info:
        check.run(bad)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} missing from {message!r}"


def test_image_size_is_a_side_or_height_and_width() -> None:
    square = config.parse(config.PrepareConfig, {"image_size": 32}, "prepare")
    camvid = config.parse(config.PrepareConfig, {"image_size": [192, 256]}, "prepare")
    assert square.height_width == (32, 32)
    assert camvid.height_width == (192, 256)


def test_missing_params_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        config.load_all(missing)


def test_one_stage_loads_only_its_section(tmp_path: Path) -> None:
    """A mistake in train does not stop prepare (DVC runs stages on their own sections)."""
    bad = write_params(tmp_path / "bad.yaml", with_value("train", "learning_rate", -1))
    assert config.load("prepare", bad) == config.PrepareConfig(**shipped()["prepare"])
    with pytest.raises(ConfigError, match="train.learning_rate"):
        config.load("train", bad)


# --------------------------------------------------------------------------- the CLI


def check_cli(params: Path, command: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(["--params", str(params), command], cwd)


CLI_CASES = {
    "unknown-key": (with_value("train", "lr", 0.1), "train.lr"),
    "lr-negative": (with_value("train", "learning_rate", -0.1), "train.learning_rate"),
    "optimizer-adagrad": (with_value("train", "optimizer", "adagrad"), "train.optimizer"),
    "unknown-arch": (with_value("model", "arch", "resnet9000"), "model.arch"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_check_reports_one_line(tmp_path: Path, case: str) -> None:
    params, key = CLI_CASES[case]
    bad = write_params(tmp_path / "bad.yaml", params)
    result = check_cli(bad, "check", tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: ")
    assert key in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_check_accepts_shipped_params(tmp_path: Path) -> None:
    result = check_cli(PARAMS, "check", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("params.yaml: valid")
    assert result.stderr == ""


def test_cli_train_fails_before_writing_anything(tmp_path: Path) -> None:
    bad = write_params(tmp_path / "bad.yaml", with_value("train", "learning_rate", -1))
    result = check_cli(bad, "train", tmp_path)
    assert result.returncode == 2, result.stderr
    assert "train.learning_rate" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    for name in ("data", "mlflow.db", "mlartifacts"):
        assert not (tmp_path / name).exists()


def test_dvc_yaml_lists_exactly_the_keys_each_stage_reads() -> None:
    """A param a stage reads but dvc.yaml omits would not rerun the stage when changed;
    one listed but not read would rerun it for nothing."""
    import dataclasses

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    reads = {
        "fetch": ["fetch"],
        "prepare": ["prepare"],
        "train": ["model", "train", "augment", "mlflow"],
        "evaluate": ["evaluate"],
        "register": ["register"],
    }
    for stage, sections in reads.items():
        expected = {
            f"{section}.{f.name}"
            for section in sections
            for f in dataclasses.fields(config.SECTIONS[section])
        }
        if stage == "train":
            expected.add("task")
        if stage == "register":  # the gate (metric, higher_is_better) is read by promote
            expected = {"register.model_name"}
        assert set(stages[stage]["params"]) == expected, stage


def test_cli_predict_without_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(["predict", "--output", "out.csv"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: predict: give a folder of images (predict DIR or --input DIR)"
    ]
    assert not (tmp_path / "out.csv").exists()
