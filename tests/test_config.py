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


SHIPPED_TEXT = PARAMS.read_text()


def line_of(text: str) -> int:
    """The line of params.yaml where `text` starts, so cases survive added keys."""
    return SHIPPED_TEXT[: SHIPPED_TEXT.index(text)].count("\n") + 1


EPOCHS = line_of("  epochs: 30\n")  # train.epochs
_AT = SHIPPED_TEXT.index("evaluate:\n")
EVALUATE = SHIPPED_TEXT[_AT : SHIPPED_TEXT.index("\n\n", _AT) + 1]  # the whole section


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
    # params.yaml that is not what it seems (issue 18, class 1)
    (
        "duplicate-key",
        SHIPPED_TEXT.replace("  epochs: 30\n", "  epochs: 30\n  epochs: 3\n"),
        [f"bad.yaml: line {EPOCHS + 1}: duplicate key train.epochs (first at line {EPOCHS})"],
    ),
    (
        "duplicate-section",
        SHIPPED_TEXT + "\ntrain:\n  epochs: 3\n",
        [
            f"bad.yaml: line {SHIPPED_TEXT.count(chr(10)) + 2}: duplicate key train "
            f"(first at line {EPOCHS - 1})"
        ],
    ),
    (
        "duplicate-nested-key",
        SHIPPED_TEXT.replace("aspp_rates: [6, 12, 18]", "aspp_rates: {a: 1, a: 2}"),
        [f"line {line_of('  aspp_rates:')}: duplicate key model.aspp_rates.a"],
    ),
    (
        "latin-1",
        SHIPPED_TEXT.replace("digits-cnn", "digits-café").encode("latin-1"),
        [f"bad.yaml: line {line_of('digits-cnn')}: not UTF-8 (byte 0xe9); save it as UTF-8"],
    ),
    ("utf-16", SHIPPED_TEXT.encode("utf-16"), ["line 1: not UTF-8", "the file is UTF-16"]),
    (
        "nul-byte",
        SHIPPED_TEXT.encode() + b"\x00",
        [f"bad.yaml: line {SHIPPED_TEXT.count(chr(10)) + 1}: a NUL byte"],
    ),
    (
        "control-character",
        SHIPPED_TEXT.replace('grid: ""', 'grid: "a\x07b"'),
        [f"not valid YAML at line {line_of('  grid: ')}", "#x0007"],
    ),
    ("empty-file", "", ["bad.yaml: is empty"]),
    ("comments-only", "# params\n", ["bad.yaml: is empty"]),
    (
        "section-null",
        SHIPPED_TEXT.replace(EVALUATE, "evaluate:\n"),
        [f"line {line_of('evaluate:')}: section evaluate must be a mapping of keys, got nothing"],
    ),
    (
        "section-empty",
        SHIPPED_TEXT.replace(EVALUATE, "evaluate: {}\n"),
        [f"line {line_of('evaluate:')}: section evaluate is empty"],
    ),
    (
        "section-missing",
        SHIPPED_TEXT.replace(EVALUATE, ""),
        ["bad.yaml: section evaluate is missing"],
    ),
    (
        "int-key",
        SHIPPED_TEXT.replace("  epochs: 30\n", "  epochs: 30\n  1: 2\n"),
        [f"line {EPOCHS + 1}: key 1 in train is not a name"],
    ),
    ("null-top-key", SHIPPED_TEXT + "null: 1\n", ["key null in the top level is not a name"]),
    (  # YAML 1.1 read it as true; DVC (YAML 1.2) reads the text yes
        "bare-yes",
        SHIPPED_TEXT.replace("nesterov: true", "nesterov: yes"),
        ["train.nesterov must be true or false, got 'yes'"],
    ),
    (
        "control-char-in-string",
        SHIPPED_TEXT.replace('grid: ""', 'grid: "a\\0b"'),
        ["mlflow.grid must be one line of text", "U+0000"],
    ),
    # numbers a library will not take (issue 18, class 2)
    (
        "timeout-inf",
        params_with({"fetch.source": "archive", "fetch.url": "a.tgz", "fetch.timeout_s": 1e400}),
        ["fetch.timeout_s must be a finite number, got inf"],
    ),
    (
        "timeout-past-a-day",
        params_with({"fetch.source": "archive", "fetch.url": "a.tgz", "fetch.timeout_s": 1e10}),
        ["fetch.timeout_s must be <= 86400"],
    ),
    ("lr-nan", with_value("train", "learning_rate", float("nan")), ["must be a finite number"]),
    (
        "huge-int-as-float",
        with_value("train", "learning_rate", 10**400),
        ["train.learning_rate must be a finite number, got an integer of 1329 bits"],
    ),
    (
        "seed-past-numpy",
        with_value("train", "seed", 2**32),
        ["train.seed must be <= 4294967295, got 4294967296"],
    ),
    ("seed-negative", with_value("prepare", "seed", -1), ["prepare.seed must be >= 0"]),
    ("epochs-huge", with_value("train", "epochs", 10**6), ["train.epochs must be <= 10000"]),
    ("batch-huge", with_value("evaluate", "batch_size", 2**40), ["evaluate.batch_size must be <="]),
    ("groups-huge", with_value("model", "groups", 10**9), ["model.groups must be <= 512"]),
    ("aspp-rate-huge", with_value("model", "aspp_rates", [6, 10**9]), ["model.aspp_rates[1]"]),
    ("padding-huge", with_value("augment", "crop_padding", 10**6), ["augment.crop_padding"]),
    ("mixup-huge", with_value("augment", "mixup_alpha", 1e6), ["augment.mixup_alpha must be <="]),
    (
        "init-from-name-too-long",
        params_with({"train.init_from": "x" * 600 + ".keras"}),
        ["train.init_from is not a path this system takes", "606 bytes"],
    ),
    # strings a later stage, MLflow or DVC would refuse
    (
        "model-name-slash",
        with_value("register", "model_name", "team/digits"),
        ["register.model_name 'team/digits' is not a name MLflow and DVC both take"],
    ),
    ("model-name-space", with_value("register", "model_name", "my model"), ["model_name"]),
    (
        "metric-unknown",
        with_value("register", "metric", "accuracy"),
        ["register.metric 'accuracy' is not a metric evaluate writes", "test_top1"],
    ),
    (
        "metric-of-other-task",
        with_value("register", "metric", "test_miou"),
        ["register.metric 'test_miou' is not written for task: classification"],
    ),
    (
        "loss-gate-upside-down",
        with_value("register", "metric", "test_loss"),
        ["register.higher_is_better: true would promote worse models"],
    ),
]


@pytest.mark.parametrize(
    ("content", "expected"),
    [pytest.param(content, expected, id=name) for name, content, expected in BAD_CASES],
)
def test_bad_params_name_the_key(tmp_path: Path, content, expected: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    elif isinstance(content, str):
        bad.write_text(content)
    else:
        write_params(bad, content)
    with pytest.raises(ConfigError) as info:
        check.run(bad)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} missing from {message!r}"


# spellings PyYAML (YAML 1.1) and DVC's ruamel.yaml (YAML 1.2) read differently
@pytest.mark.parametrize("spelling", ["1e-3", "1E3", "0o17", "017", "yes", "on", "off", "1:30"])
def test_scalars_read_as_dvc_reads_them(tmp_path: Path, spelling: str) -> None:
    """YAML 1.2, as DVC's ruamel.yaml reads params.yaml: `1e-3` is a number, `yes` text."""
    from ruamel.yaml import YAML

    text = f"mlflow:\n  grid: {spelling}\n"
    (tmp_path / "p.yaml").write_text(text)
    assert config.read_params(tmp_path / "p.yaml") == YAML(typ="safe").load(text)


def test_learning_rate_in_exponent_form(tmp_path: Path) -> None:
    """`learning_rate: 1e-3` (a float to DVC) is accepted, and is 0.001."""
    bad = tmp_path / "p.yaml"
    bad.write_text(SHIPPED_TEXT.replace("learning_rate: 0.003", "learning_rate: 1e-3"))
    assert check.run(bad)["train"].learning_rate == 0.001


def test_every_stage_reads_the_file_strictly(tmp_path: Path) -> None:
    """A file-level mistake (a misspelled section, a duplicate anywhere) stops every
    stage, not only `check`: each would otherwise run on what it silently ignored."""
    misspelled = tmp_path / "misspelled.yaml"
    misspelled.write_text(SHIPPED_TEXT.replace("\naugment:", "\naugmnet:"))
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text(SHIPPED_TEXT.replace("  seed: 42\n", "  seed: 42\n  seed: 7\n", 1))
    for section in config.SECTIONS:
        with pytest.raises(ConfigError, match="unknown section 'augmnet'"):
            config.load(section, misspelled)
        with pytest.raises(ConfigError, match="duplicate key prepare.seed"):
            config.load(section, duplicate)


def test_only_documented_sections_may_be_left_out(tmp_path: Path) -> None:
    """augment (all off) and task (classification) may be absent; any other section a
    stage reads is refused, not replaced by code defaults."""
    path = tmp_path / "p.yaml"
    text = SHIPPED_TEXT.replace("task: classification", "")
    start, end = text.index("augment:"), text.index("evaluate:")
    path.write_text(text[:start] + text[end:])
    loaded = check.run(path)
    assert loaded["augment"] == config.AugmentConfig() and loaded["task"] == "classification"
    for section in set(config.SECTIONS) - set(config.OPTIONAL_SECTIONS):
        params = shipped()
        del params[section]
        write_params(path, params)
        with pytest.raises(ConfigError, match=f"section {section} is missing"):
            config.load(section, path)


def test_gate_metrics_are_what_evaluate_writes() -> None:
    """register.metric's allowed names are the test metrics of each task's report."""
    import numpy as np

    from pipeline.scoring.metrics import classification_report, segmentation_report

    probs = np.eye(3)[[0, 1, 2, 0]]
    written = {
        "classification": classification_report(probs, np.array([0, 1, 2, 1]), "abc")[0],
        "segmentation": segmentation_report(np.eye(3, dtype=np.int64) * 5, "abc"),
    }
    for task, report in written.items():
        scores = {k for k, v in report.items() if k.startswith("test_") and isinstance(v, float)}
        assert set(config.GATE_METRICS[task]) == scores, task


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
    # issue 20: weights the model cannot take, fine-tuning with nothing to fine-tune
    "imagenet-hand-written": (
        params_with({"model.arch": "resnet18", "model.pretrained": "imagenet"}),
        "model.pretrained imagenet",
    ),
    "finetune-without-weights": (
        params_with({"train.finetune": "progressive"}),
        "train.finetune: progressive needs weights",
    ),
    # issue 18: a file that is not what it seems, a number a library would not take
    "duplicate-key": (
        SHIPPED_TEXT.replace("  epochs: 30\n", "  epochs: 30\n  epochs: 3\n"),
        f"line {EPOCHS + 1}: duplicate key train.epochs",
    ),
    # issue 23: the seeds' ablation settings
    "kernel-size-even": (with_value("model", "kernel_size", 4), "model.kernel_size must be odd"),
    "dilation-rate-undilated": (
        params_with({"model.dilation_rate": 3}),
        "model.dilation_rate applies to model.conv: dilated only",
    ),
    "kernel-size-lenet": (
        params_with({"model.arch": "lenet5", "model.kernel_size": 5}),
        "model.kernel_size does not apply to lenet5",
    ),
    "padding-valid-resnet": (
        params_with({"model.arch": "resnet18", "model.padding": "valid"}),
        "model.padding valid cannot build resnet18",
    ),
    "timeout-inf": (
        params_with({"fetch.source": "archive", "fetch.url": "a.tgz", "fetch.timeout_s": 1e400}),
        "fetch.timeout_s must be a finite number, got inf",
    ),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_check_reports_one_line(tmp_path: Path, case: str) -> None:
    params, key = CLI_CASES[case]
    bad = tmp_path / "bad.yaml"
    if isinstance(params, str):
        bad.write_text(params)
    else:
        write_params(bad, params)
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
        if stage == "register":
            # the gate (metric, higher_is_better) is applied by promote; register only
            # checks that the metric is one the task's evaluate writes
            expected = {"register.model_name", "task"}
        assert set(stages[stage]["params"]) == expected, stage


def test_cli_predict_without_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(["predict", "--output", "out.csv"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: predict: give a folder of images (predict DIR or --input DIR)"
    ]
    assert not (tmp_path / "out.csv").exists()


def test_every_number_has_a_documented_range() -> None:
    """Each numeric param has a lower and an upper bound, and docs/params.md lists it."""
    import dataclasses
    import typing

    def number(bound: float) -> str:
        return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

    docs = (ROOT / "docs" / "params.md").read_text()
    for section, cls in config.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = {hints[f.name], *typing.get_args(hints[f.name])}
            kinds |= {a for k in list(kinds) for a in typing.get_args(k)}
            if not kinds & {int, float} or hints[f.name] is bool:
                continue
            bounds = f.metadata.get("bounds", {})
            key = f"{section}.{f.name}"
            low = [
                f"{number(bounds[k])} {op} " for k, op in (("ge", "≤"), ("gt", "<")) if k in bounds
            ]
            high = [
                f" {op} {number(bounds[k])}" for k, op in (("le", "≤"), ("lt", "<")) if k in bounds
            ]
            assert low and high, f"{key} needs a lower and an upper bound"
            assert f"| `{key}` | {low[0]}x{high[0]} |" in docs, f"docs/params.md: {key}'s range"
