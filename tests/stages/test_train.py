"""Training on real (small) data: history, schedule, precision, resume, and the JAX backend."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from functools import partial

import keras
import numpy as np
import pytest
from conftest import QUICK_RUN, ROOT, SHORT_TRAIN, TINY_MODEL, edit_params, epoch_counter, run_cli

from pipeline.config import AugmentConfig, ModelConfig, TrainConfig
from pipeline.data.data_card import read_card
from pipeline.training.fit import fit_model
from pipeline.training.precision import resolve_precision

SMALL_MODEL, SHORT = TINY_MODEL, SHORT_TRAIN


def workspace(prepared, root, params=None) -> None:
    """A project folder at `root`: the prepared digits and params.yaml with these changes."""
    shutil.copytree(prepared, root / "data" / "prepared")
    edit_params(root / "params.yaml", params or {})


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_fit_learns_and_records_history(digits_prepared, tmp_path):
    result = fit_model(
        SMALL_MODEL,
        SHORT,
        digits_prepared,
        read_card(digits_prepared),
        checkpoint_dir=tmp_path / "ckpt",
    )
    history = result.history
    assert history["epoch"] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "learning_rate"):
        assert len(history[key]) == 3, key
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["val_accuracy"][-1] > 0.5  # ten classes: chance is 0.1
    # Warmup reaches the peak after epoch 1, then cosine decays to zero at the end.
    lr = history["learning_rate"]
    assert lr[0] == pytest.approx(SHORT.learning_rate, rel=1e-3)
    assert lr[0] > lr[1] > lr[2] >= 0
    assert lr[2] == pytest.approx(0, abs=1e-6)


def test_saved_model_has_no_training_config_and_loads_without_this_package(
    digits_prepared, tmp_path
):
    """The saved/logged model is the inference graph: no optimizer, loss or schedule of
    this package, so plain Keras in another process loads it (one-cycle is our class)."""
    import subprocess
    import sys
    import zipfile

    from pipeline.models.saved import inference_copy

    cfg = replace(SHORT, epochs=1, schedule="onecycle")
    model = fit_model(
        SMALL_MODEL, cfg, digits_prepared, read_card(digits_prepared), checkpoint_dir=tmp_path / "c"
    ).model
    path = tmp_path / "model.keras"
    inference_copy(model).save(path)
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    assert not config.get("compile_config")
    code = "import sys, keras; keras.saving.load_model(sys.argv[1]); print('loaded')"
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.stdout.strip() == "loaded", done.stderr[-2000:]


def test_auto_precision_is_float32_on_cpu():
    assert resolve_precision("auto") == "float32"
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"


def test_mixed_bfloat16_computes_in_bfloat16_with_float32_output(digits_prepared, tmp_path):
    cfg = replace(SHORT, epochs=2, precision="mixed_bfloat16")
    result = fit_model(
        SMALL_MODEL,
        cfg,
        digits_prepared,
        read_card(digits_prepared),
        checkpoint_dir=tmp_path / "ckpt",
    )
    model = result.model
    assert result.policy == "mixed_bfloat16"
    conv = model.get_layer("stage1_1_conv")
    assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"
    assert model.output.dtype == "float32"
    assert np.isfinite(result.history["train_loss"]).all()


def test_mixed_float16_uses_loss_scaling(digits_prepared, tmp_path):
    cfg = replace(SHORT, epochs=1, warmup_epochs=0, precision="mixed_float16")
    result = fit_model(
        SMALL_MODEL,
        cfg,
        digits_prepared,
        read_card(digits_prepared),
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert isinstance(result.model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(result.history["train_loss"]).all()


def test_interrupted_training_resumes_and_ends_as_if_never_stopped(digits_prepared, tmp_path):
    """Stopped after epoch 2 and resumed: only epoch 3 runs, and the final weights and
    history are bit-identical to an uninterrupted run (dropout, random augmentation
    and MixUp/CutMix included)."""
    card = read_card(digits_prepared)
    augment = AugmentConfig(translate=0.1, mixup_alpha=0.2, cutmix_alpha=0.5, mix_prob=0.5)
    assert SMALL_MODEL.dropout > 0
    fit = partial(fit_model, SMALL_MODEL, SHORT, digits_prepared, card, augment_cfg=augment)
    uninterrupted = fit(checkpoint_dir=tmp_path / "once")

    ckpt = tmp_path / "ckpt"
    first = epoch_counter(stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        fit(checkpoint_dir=ckpt, extra_callbacks=[first])
    assert first.epochs == [0, 1]
    second = epoch_counter()
    resumed = fit(checkpoint_dir=ckpt, extra_callbacks=[second])

    assert second.epochs == [2]  # epochs 0 and 1 were restored, not rerun
    assert resumed.history == uninterrupted.history
    weights = zip(uninterrupted.model.get_weights(), resumed.model.get_weights(), strict=True)
    for before, after in weights:
        np.testing.assert_array_equal(before, after)
    assert resumed.images_per_second == pytest.approx(card["totals"]["train"] / resumed.seconds)


def test_time_budget_ends_training_after_the_epoch_that_leaves_no_time(digits_prepared, tmp_path):
    """train.max_minutes: the epoch in progress ends, no new one starts past the budget."""
    card = read_card(digits_prepared)
    counter = epoch_counter()
    result = fit_model(
        SMALL_MODEL,
        replace(SHORT, max_minutes=0.001),  # 60 ms: less than one epoch
        digits_prepared,
        card,
        checkpoint_dir=tmp_path / "ckpt",
        extra_callbacks=[counter],
    )
    assert counter.epochs == [0] and result.history["epoch"] == [1]
    assert result.out_of_time and result.stopped_early


def test_checkpoint_of_other_params_is_not_resumed(digits_prepared, tmp_path):
    card = read_card(digits_prepared)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit_model(
            SMALL_MODEL,
            SHORT,
            digits_prepared,
            card,
            checkpoint_dir=ckpt,
            extra_callbacks=[epoch_counter(stop_after=0)],
        )
    counter = epoch_counter()
    fit_model(
        replace(SMALL_MODEL, dropout=0.3),
        SHORT,
        digits_prepared,
        card,
        checkpoint_dir=ckpt,
        extra_callbacks=[counter],
    )
    assert counter.epochs == [0, 1, 2]


def test_train_and_evaluate_stages_on_jax_backend(digits_prepared, tmp_path):
    """The GPU machine has JAX and no TensorFlow: the stages must run on KERAS_BACKEND=jax."""
    pytest.importorskip("jax")
    workspace(digits_prepared, tmp_path, {**QUICK_RUN, "train.epochs": 2})

    for stage in ("train", "evaluate"):
        done = run_cli([stage], tmp_path, KERAS_BACKEND="jax")
        assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert 0.0 <= report["test_top1"] <= 1.0 and report["num_test_images"] == 270

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("digits-cnn").experiment_id])
    assert run.data.params["keras.backend"] == "jax"
    assert run.data.metrics["test_top1"] == pytest.approx(report["test_top1"])


def test_nan_loss_stops_training_marks_the_run_failed_and_registers_nothing(
    digits_prepared, tmp_path
):
    """A learning rate that blows up: exit 1 with the reason in one line, the MLflow run
    FAILED with that reason, no model written, no checkpoint left to resume, nothing
    registered by the next stage."""
    workspace(
        digits_prepared,
        tmp_path,
        {
            **QUICK_RUN,
            "model.norm": "none",
            "train.epochs": 3,
            "train.optimizer": "sgd",
            "train.learning_rate": 10.0,
        },
    )

    done = run_cli(["train"], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]  # TensorFlow's own log lines come first
    assert "Traceback" not in done.stderr and error.startswith("error: train: loss became ")
    assert "train.learning_rate" in error
    assert not (tmp_path / "data" / "model").exists()
    assert not (tmp_path / "data" / "checkpoints").exists()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("digits-cnn").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] in error
    register = run_cli(["register"], tmp_path)
    assert register.returncode == 2 and "run `python -m pipeline train` first" in register.stderr
    assert not client.search_registered_models()


def test_batch_size_larger_than_the_training_split_names_the_key(digits_prepared) -> None:
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=r"train.batch_size \(5000\) is larger than"):
        fit_model(
            ModelConfig(arch="simple_cnn"),
            TrainConfig(batch_size=5000),
            digits_prepared,
            read_card(digits_prepared),
        )


def test_interrupted_run_that_cannot_resume_is_closed_as_failed(digits_prepared, tmp_path):
    """A training killed mid-run leaves its run RUNNING and a checkpoint; if params change
    before the rerun, the checkpoint is dropped and that run is marked FAILED with the
    reason, not left RUNNING forever."""
    from mlflow import MlflowClient

    from pipeline.training.checkpoints import RUN_ID_FILE

    workspace(digits_prepared, tmp_path, QUICK_RUN)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = (tmp_path / "mlartifacts").as_uri()
    experiment = client.create_experiment("digits-cnn", artifact_location=artifacts)
    killed = client.create_run(experiment, run_name="killed").info.run_id  # left RUNNING
    checkpoint = tmp_path / "data" / "checkpoints"
    checkpoint.mkdir(parents=True)
    (checkpoint / RUN_ID_FILE).write_text(killed)
    (checkpoint / "fingerprint.json").write_text('{"params": "of another config"}')

    done = run_cli(["train"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is from other params or data; starting over" in done.stderr
    old = client.get_run(killed)
    assert old.info.status == "FAILED"
    assert "not resumed because params or data changed" in old.data.tags["failure_reason"]
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
    assert len(statuses) == 2 and list(statuses.values()).count("FINISHED") == 1
    assert not (ROOT / "mlruns").exists()


@pytest.mark.parametrize("store", ["http://mlflow:s3cret@127.0.0.1:{port}", "sqlite:///{file}/db"])
def test_unreachable_tracking_store_is_one_line_before_training(store, digits_prepared, tmp_path):
    """A server that does not answer, or a SQLite file that cannot be created: exit 2 with
    one line naming the store (password masked), no training, no model written."""
    from conftest import free_port

    workspace(digits_prepared, tmp_path, {"train.epochs": 1, "train.warmup_epochs": 0})
    (tmp_path / "not-a-folder").write_text("")
    uri = store.format(port=free_port(), file=tmp_path / "not-a-folder")
    done = run_cli(
        ["train"], tmp_path, MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"
    )
    assert done.returncode == 2, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert (
        error.startswith("error: MLFLOW_TRACKING_URI ") and "cannot use the tracking store" in error
    )
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr
    assert "Epoch 1" not in done.stdout and not (tmp_path / "data" / "model").exists()


def test_locked_store_is_one_line_before_training(digits_prepared, tmp_path):
    """Another process holds mlflow.db in an exclusive transaction for longer than SQLite's
    busy wait: train stops with one line naming the store, before any epoch; once the lock
    is released, train runs."""
    import sqlite3

    from mlflow import MlflowClient

    workspace(digits_prepared, tmp_path, QUICK_RUN)
    db = tmp_path / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # creates the store
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        done = run_cli(["train"], tmp_path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: MLFLOW_TRACKING_URI sqlite:///")
    assert "database is locked" in error and error.endswith("no training started")
    assert "Epoch 1" not in done.stdout and not (tmp_path / "data" / "model").exists()
    assert run_cli(["train"], tmp_path).returncode == 0


def test_store_gone_after_training_fails_evaluate_and_register_in_one_line(
    digits_prepared, tmp_path
):
    """The tracking server stops answering between stages: evaluate and register each exit
    2 with one line naming the store and what was kept; once it answers again, the same
    commands log the metrics and register the model."""
    from conftest import free_port
    from mlflow import MlflowClient

    workspace(digits_prepared, tmp_path, QUICK_RUN)
    assert run_cli(["train"], tmp_path).returncode == 0
    gone = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    gone["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    for stage, kept in [
        ("evaluate", "metrics/eval.json is written; rerun evaluate when it answers"),
        ("register", "nothing new is registered; rerun register when it answers"),
    ]:
        failed = run_cli([stage], tmp_path, **gone)
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert "Traceback" not in failed.stderr
        error = failed.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: MLFLOW_TRACKING_URI {gone['MLFLOW_TRACKING_URI']}: ")
        assert error.endswith(kept)
        assert run_cli([stage], tmp_path).returncode == 0

    (run,) = client.search_runs([client.get_experiment_by_name("digits-cnn").experiment_id])
    assert run.info.status == "FINISHED" and "test_top1" in run.data.metrics
    assert str(client.get_model_version_by_alias("digits-classifier", "challenger").version) == "1"


def test_image_size_below_the_architecture_minimum_is_one_line_before_any_run(
    digits_prepared, tmp_path
):
    """Digits prepared at 16x16 and model.arch vgg16 (needs 32): exit 2 naming both keys,
    before an MLflow run or a checkpoint exists."""
    workspace(digits_prepared, tmp_path, {"model.arch": "vgg16"})
    done = run_cli(["train"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error == (
        "error: model.arch vgg16 needs images of at least 32x32, got 16x16 "
        "(raise prepare.image_size)"
    )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data" / "model").exists()
