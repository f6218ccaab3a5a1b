"""Damaged artifacts on disk: every file a stage or tool reads goes through one guarded
reader (`pipeline.artifacts`), so a missing, cut, garbled or mis-shaped file is one
DataError line naming it, what is wrong, and how to rebuild or restore it; files that
contradict each other (card and model, card and arrays, run file and store) are refused
by name; a damaged training checkpoint is dropped with a warning and training starts over.

The end-to-end version, every artifact of a repro'd project against every command that
reads it, is tests/e2e/test_artifact_fuzz.py.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, SHORT_TRAIN, TINY_MODEL, epoch_counter

from pipeline.errors import DataError
from pipeline.layout import PREPARED_DIR


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _random(data: bytes) -> bytes:
    return np.random.default_rng(0).bytes(len(data))


def _empty(data: bytes) -> bytes:
    return b""


CORRUPTIONS = {"truncated": _truncated, "random-bytes": _random, "empty": _empty}


def tiny_model(image_shape, outputs: int):
    import keras

    return keras.Sequential(
        [keras.Input(tuple(image_shape)), keras.layers.Flatten(), keras.layers.Dense(outputs)]
    )


@pytest.fixture
def project(digits_prepared, tmp_path, monkeypatch) -> Path:
    """A project folder (the working directory) holding every kind of artifact, all good:
    data/raw/source.json, the prepared digits, a model fitting their card, the run file,
    plots/history.csv and metrics/eval.json."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(digits_prepared, tmp_path / "data/prepared")
    raw = tmp_path / "data/raw"
    raw.mkdir()
    shutil.copy2(digits_prepared.parent / "raw/source.json", raw / "source.json")
    card = json.loads((tmp_path / "data/prepared/data_card.json").read_text())
    model_dir = tmp_path / "data/model"
    model_dir.mkdir()
    tiny_model(card["image_shape"], card["num_classes"]).save(model_dir / "model.keras")
    run = {"run_id": "0" * 32, "model_uri": "models:/m-1", "tracking_uri": "sqlite:///x"}
    (model_dir / "mlflow_run.json").write_text(json.dumps(run))
    (tmp_path / "plots").mkdir()
    rows = ["epoch,train_loss,val_loss"] + [
        f"{e},{1.5 - e / 10:.6f},{1.6 - e / 9:.6f}" for e in range(4)
    ]
    (tmp_path / "plots/history.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text(json.dumps({"test_top1": 0.9, "test_loss": 0.3}))
    return tmp_path


def _read_source():
    from pipeline.data.folders import read_source

    return read_source(Path("data/raw"))


def _read_card():
    from pipeline.data.data_card import read_card

    return read_card()


def _load_train_split():
    from pipeline.data.loader import load_split

    return load_split(PREPARED_DIR, "train")


def _load_model():
    from pipeline.models.saved import load_trained_model

    return load_trained_model()


def _read_run_file():
    from pipeline.tracking.runs import read_run_file

    return read_run_file()


def _read_history():
    from pipeline.training.history import read_history

    return read_history(Path("plots/history.csv"))


def _read_eval():
    from pipeline.artifacts import read_json

    return read_json(Path("metrics/eval.json"))


# artifact -> (the reader a stage or tool calls, the stage that rebuilds it, restored by)
READERS = {
    "data/raw/source.json": (_read_source, "fetch", "dvc checkout"),
    "data/prepared/data_card.json": (_read_card, "prepare", "dvc checkout"),
    "data/prepared/train_images.npy": (_load_train_split, "prepare", "dvc checkout"),
    "data/prepared/train_labels.npy": (_load_train_split, "prepare", "dvc checkout"),
    "data/model/model.keras": (_load_model, "train", "dvc checkout"),
    "data/model/mlflow_run.json": (_read_run_file, "train", "dvc checkout"),
    "plots/history.csv": (_read_history, "train", "git checkout"),
    "metrics/eval.json": (_read_eval, "evaluate", "git checkout"),
}


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("name", READERS)
def test_a_damaged_artifact_is_one_line_naming_it_and_its_rebuild(project, name, corruption):
    read, stage, restore = READERS[name]
    read()  # the good file reads
    path = project / name
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    with pytest.raises(DataError) as exc:
        read()
    message = one_line(exc)
    assert f"{name}: " in message
    assert message.endswith(
        f"; rebuild it with `dvc repro -f {stage}` (or `{restore} {name}` to restore the "
        "committed one)"
    ), message


@pytest.mark.parametrize("name", READERS)
def test_a_missing_artifact_says_which_stage_to_run(project, name):
    read, stage, restore = READERS[name]
    (project / name).unlink()
    with pytest.raises(DataError) as exc:
        read()
    assert one_line(exc).endswith(
        f"{name} not found; run `python -m pipeline {stage}` first "
        f"(or `{restore} {name}` to restore the committed one)"
    )


def _edit_card(project: Path, **changes) -> None:
    path = project / "data/prepared/data_card.json"
    card = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del card[key]
        else:
            card[key] = value
    path.write_text(json.dumps(card))


def _save(project: Path, name: str, array) -> None:
    np.save(project / "data/prepared" / name, array)


def card_without_num_classes(project):
    _edit_card(project, num_classes=None)
    return _read_card, "data/prepared/data_card.json: 'num_classes' must be an integer, got nothing"


def card_that_is_a_list(project):
    (project / "data/prepared/data_card.json").write_text("[1, 2]")
    return _read_card, "data/prepared/data_card.json: holds a JSON list, not an object"


def card_counting_other_classes(project):
    _edit_card(project, num_classes=3)
    return _read_card, "data/prepared/data_card.json: names 10 classes but 'num_classes' is 3"


def labels_shorter_than_images(project):
    labels = np.load(project / "data/prepared/train_labels.npy")
    _save(project, "train_labels.npy", labels[:-1])
    n = len(labels)
    return _load_train_split, f"data/prepared/train_labels.npy: holds {n - 1} labels for {n} images"


def images_of_another_shape(project):
    images = np.load(project / "data/prepared/train_images.npy")
    _save(project, "train_images.npy", images[:, :8])
    return _load_train_split, "data/prepared/train_images.npy: holds images of [8, 16, 1]"


def images_not_counted_by_the_card(project):
    images = np.load(project / "data/prepared/train_images.npy")
    _save(project, "train_images.npy", images[:-5])
    n = len(images)
    return _load_train_split, f"train_images.npy: holds {n - 5} images, the data card {n}"


def labels_beyond_the_classes(project):
    labels = np.load(project / "data/prepared/train_labels.npy")
    labels[0] = 10
    _save(project, "train_labels.npy", labels)
    return _load_train_split, "train_labels.npy: holds labels outside 0..9"


def labels_of_floats(project):
    labels = np.load(project / "data/prepared/train_labels.npy")
    _save(project, "train_labels.npy", labels.astype(np.float32))
    return _load_train_split, "train_labels.npy: holds float32 of shape"


def run_file_without_run_id(project):
    (project / "data/model/mlflow_run.json").write_text('{"model_uri": "models:/m-1"}')
    return _read_run_file, "data/model/mlflow_run.json: 'run_id' must be a string, got nothing"


def history_with_a_cut_row(project):
    path = project / "plots/history.csv"
    path.write_text(path.read_text() + "4,0.3\n")
    return _read_history, "plots/history.csv: line 6 has 2 fields, the header 3"


def history_without_epochs(project):
    path = project / "plots/history.csv"
    path.write_text(path.read_text().replace("epoch,", "epo,"))
    return _read_history, "plots/history.csv: has no column 'epoch'"


@pytest.mark.parametrize(
    "case",
    [
        card_without_num_classes,
        card_that_is_a_list,
        card_counting_other_classes,
        labels_shorter_than_images,
        images_of_another_shape,
        images_not_counted_by_the_card,
        labels_beyond_the_classes,
        labels_of_floats,
        run_file_without_run_id,
        history_with_a_cut_row,
        history_without_epochs,
    ],
)
def test_a_well_formed_file_of_the_wrong_shape_is_refused_by_name(project, case):
    read, expected = case(project)
    with pytest.raises(DataError) as exc:
        read()
    message = one_line(exc)
    assert expected in message, message
    assert "rebuild it with `dvc repro -f " in message


def test_every_dvc_output_has_its_stage_in_the_table():
    """layout.OUTPUTS (the rebuild hints) lists each output of dvc.yaml with its stage, and
    whether DVC caches it; nothing else."""
    from pipeline.layout import OUTPUTS, producer

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {}
    for stage, spec in stages.items():
        for out in [*spec.get("outs", []), *spec.get("metrics", [])]:
            name, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            declared[Path(name)] = (stage, options.get("cache", True))
    assert declared == OUTPUTS
    assert producer(Path("data/prepared/val_labels.npy")) == ("prepare", True)
    assert producer(Path("data/checkpoints/fingerprint.json")) is None
    assert producer(Path("mlartifacts/1/models/m-1/artifacts/model.keras")) is None


# --------------------------------------------------------------------------- across files


def _wrong_model(project: Path) -> None:
    """A model of 3 classes in place of the 10-class one: trained on other data."""
    tiny_model((16, 16, 1), 3).save(project / "data/model/model.keras")


CLASS_COUNT = (
    "data/prepared/data_card.json has 10 classes but data/model/model.keras outputs 3: the "
    "model was trained on other data; rebuild it with `dvc repro -f train`"
)


def test_evaluate_refuses_a_model_of_another_class_count_before_writing(project):
    from pipeline.config import EvaluateConfig
    from pipeline.stages import evaluate

    _wrong_model(project)
    with pytest.raises(DataError) as exc:
        evaluate.run(EvaluateConfig())
    assert one_line(exc).startswith(CLASS_COUNT)
    assert not (project / "metrics/per_class.json").exists()
    assert not (project / "plots/images").exists()


def test_predict_refuses_a_model_of_another_class_count(project, digits_prepared):
    from pipeline.tools import predict

    images = project / "in"
    images.mkdir()
    shutil.copy2(next((digits_prepared.parent / "raw").rglob("*.png")), images / "a.png")
    _wrong_model(project)
    with pytest.raises(DataError) as exc:
        predict.run(images, project / "out.csv")
    assert one_line(exc).startswith(CLASS_COUNT)
    assert not (project / "out.csv").exists()


def test_register_refuses_a_run_file_naming_a_run_the_store_lacks(project, monkeypatch):
    """A run file of another store (or a deleted run): refused naming the file and the
    run, before anything is registered."""
    from mlflow import MlflowClient

    from pipeline.config import RegisterConfig
    from pipeline.stages import register

    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(DataError) as exc:
        register.run(RegisterConfig())
    assert one_line(exc).startswith(
        f"data/model/mlflow_run.json: names MLflow run {'0' * 32}, which the tracking store "
        f"{uri} does not hold (another store's, or deleted); rebuild it with `dvc repro -f train`"
    )
    assert MlflowClient(uri).search_registered_models() == []
    assert not (project / "metrics/registered.json").exists()


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def interrupted(digits_prepared, tmp_path_factory) -> Path:
    """A real checkpoint: 1-epoch training of the tiny model stopped after its backup."""
    from pipeline.data.data_card import read_card
    from pipeline.training.fit import fit_model

    ckpt = tmp_path_factory.mktemp("interrupted") / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_model(
            TINY_MODEL,
            ONE_EPOCH,
            digits_prepared,
            read_card(digits_prepared),
            checkpoint_dir=ckpt,
            extra_callbacks=[epoch_counter(stop_after=0)],
        )
    (ckpt / "mlflow_run_id").write_text("abc123")  # the run train.run would have started
    return ckpt


ONE_EPOCH = replace(SHORT_TRAIN, epochs=1, warmup_epochs=0)
CHECKPOINT_DAMAGE = [
    ("backup_phase0/latest.weights.h5", "truncated", "is not a whole HDF5 weights file"),
    ("backup_phase0/latest.weights.h5", "random-bytes", "is not a whole HDF5 weights file"),
    ("backup_phase0/training_metadata.json", "truncated", "is not valid JSON"),
    ("backup_phase0/training_metadata.json", "random-bytes", "is not text"),
    ("history.csv", "truncated", "fields, the header"),
    ("fingerprint.json", "random-bytes", "is not text"),
]


@pytest.mark.parametrize("name,corruption,what", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_dropped_with_a_warning_and_its_run_given_up(
    interrupted, digits_prepared, tmp_path, capsys, name, corruption, what
):
    """Resuming must never read half a backup: the checkpoint goes, with one warning line
    naming the file, and the interrupted run is to be closed (train.run marks it FAILED)."""
    from pipeline.config import AugmentConfig
    from pipeline.data.data_card import read_card
    from pipeline.training.checkpoints import Abandoned, reset_stale_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(interrupted, ckpt)
    path = ckpt / name
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    card = read_card(digits_prepared)
    dropped = reset_stale_checkpoint(ckpt, TINY_MODEL, ONE_EPOCH, card, AugmentConfig())
    reason = "interrupted; not resumed because its checkpoint is damaged"
    assert dropped == Abandoned("abc123", reason)
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: train: {path}: ") and what in warning, warning
    assert warning.endswith("; starting over\n") and warning.count("\n") == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["fingerprint.json"]


def test_a_whole_checkpoint_is_kept(interrupted, digits_prepared, tmp_path, capsys):
    from pipeline.config import AugmentConfig
    from pipeline.data.data_card import read_card
    from pipeline.training.checkpoints import reset_stale_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(interrupted, ckpt)
    card = read_card(digits_prepared)
    assert reset_stale_checkpoint(ckpt, TINY_MODEL, ONE_EPOCH, card, AugmentConfig()) is None
    assert capsys.readouterr().err == ""
    assert (ckpt / "backup_phase0/latest.weights.h5").exists()


def test_training_on_a_cut_backup_starts_over(interrupted, digits_prepared, tmp_path, capsys):
    """Today: h5py's traceback from inside Keras's BackupAndRestore; now every epoch runs."""
    from pipeline.data.data_card import read_card
    from pipeline.training.fit import fit_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(interrupted, ckpt)
    weights = ckpt / "backup_phase0/latest.weights.h5"
    weights.write_bytes(_truncated(weights.read_bytes()))
    counter = epoch_counter()
    result = fit_model(
        TINY_MODEL,
        ONE_EPOCH,
        digits_prepared,
        read_card(digits_prepared),
        checkpoint_dir=ckpt,
        extra_callbacks=[counter],
    )
    assert counter.epochs == [0] and result.history["epoch"] == [1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "starting over" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: train: {weights}: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_an_unreadable_artifact_is_one_line_for_another_user(digits_prepared, monkeypatch):
    """EACCES (root reads anything, so this process acts as user nobody for the read)."""
    import pwd
    import tempfile

    from pipeline.data.data_card import read_card

    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="unreadable-"))
    try:
        root.chmod(0o755)
        shutil.copytree(digits_prepared, root / "data/prepared")
        (root / "data/prepared/data_card.json").chmod(0o000)
        monkeypatch.chdir(root)
        os.seteuid(nobody.pw_uid)
        try:
            with pytest.raises(DataError) as exc:
                read_card()
        finally:
            os.seteuid(0)
        assert one_line(exc) == (
            "data/prepared/data_card.json: cannot be read by this user (Permission denied); fix "
            "its permissions; rebuild it with `dvc repro -f prepare` (or `dvc checkout "
            "data/prepared/data_card.json` to restore the committed one)"
        )
    finally:
        shutil.rmtree(root)
