"""Train stage: fit the model that params.yaml names inside an MLflow run, then write
the model, its history and the run file (`pipeline.training.fit` does the fitting)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.atomic import atomic_dir
from pipeline.config import AugmentConfig, MlflowConfig, ModelConfig, TrainConfig, flatten
from pipeline.errors import TrainingDiverged
from pipeline.layout import CHECKPOINT_DIR, MODEL_DIR, PLOTS_DIR, PREPARED_DIR
from pipeline.models.saved import MODEL_FILE
from pipeline.training.fit import NO_AUGMENT, TrainResult, check_batch_size, fit_model
from pipeline.training.history import HISTORY_FILE, write_history
from pipeline.training.parent_watch import stop_with_dvc


def run(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    mlflow_cfg: MlflowConfig,
    *,
    augment_cfg: AugmentConfig = NO_AUGMENT,
    prepared_dir: Path = PREPARED_DIR,
    out_dir: Path = MODEL_DIR,
    plots_dir: Path = PLOTS_DIR,
    checkpoint_dir: Path = CHECKPOINT_DIR,
    task: str = "classification",
) -> TrainResult:
    """The stage: train inside an MLflow run, then write the model, history and run file."""
    import keras

    from pipeline.config import check_task, check_transfer
    from pipeline.data.data_card import read_card
    from pipeline.data.loader import load_split
    from pipeline.models import pretrained
    from pipeline.models.from_config import check_model
    from pipeline.models.model_card import model_card
    from pipeline.models.saved import inference_copy, model_summary
    from pipeline.tracking import datasets, logged_models, runs, store
    from pipeline.training import devices
    from pipeline.training.augment import check_augment, check_mask_augment
    from pipeline.training.checkpoints import RUN_ID_FILE, reset_stale_checkpoint
    from pipeline.training.fit import check_placement
    from pipeline.training.transfer import check_init_from

    card = read_card(prepared_dir)
    for split in ("train", "val"):  # damaged arrays: one line, before a run or checkpoint
        load_split(prepared_dir, split)
    # Bad input fails here, before an MLflow run or a file is created.
    check_prepared_task(task, card, prepared_dir)
    check_task(task, model_cfg, cfg)
    check_transfer(model_cfg, cfg)
    check_batch_size(cfg, card["totals"]["train"])
    image_shape = tuple(card["image_shape"])
    check_model(model_cfg, image_shape)
    if model_cfg.segmentation:
        check_mask_augment(augment_cfg)
    else:
        check_augment(augment_cfg, image_shape)
    check_init_from(cfg.init_from)
    placement = devices.plan(cfg.distribution, cfg.batch_size)
    check_placement(cfg, placement)
    # a missing file, an unreachable URL, uncached imagenet weights: one line, no run
    weights = pretrained.resolve(model_cfg, image_shape)
    fit_args = {"augment_cfg": augment_cfg, "checkpoint_dir": checkpoint_dir, "weights": weights}
    if not placement.chief:  # the chief alone writes outputs, checkpoints and the run
        return fit_model(model_cfg, cfg, prepared_dir, card, **fit_args)
    params = {
        **flatten(model_cfg, "model"),
        **flatten(cfg, "train"),
        **flatten(augment_cfg, "augment"),
        "data.source": card["source"]["source"],
        "data.url": card["source"].get("url", ""),
        "data.image_shape": "x".join(map(str, card["image_shape"])),
        "data.num_classes": card["num_classes"],
        **{f"data.{split}_images": n for split, n in card["totals"].items()},
        **flatten_prepare(card),
        "keras.backend": keras.backend.backend(),
        "model.input_scaling": pretrained.input_norm(model_cfg),
        **placement.params(cfg.batch_size),
    }
    tags = {
        "task": task,
        "architecture": model_cfg.arch,
        "data_hash": card["data_hash"],
        "data_source_sha256": card["source"].get("sha256", ""),
        **({"grid": mlflow_cfg.grid} if mlflow_cfg.grid else {}),
        **({"pretrained_sha256": weights.sha256} if weights else {}),
    }
    # Before the run starts: a checkpoint of other params (or damaged) must not continue its run,
    # and the interrupted run it belonged to is closed as FAILED rather than left RUNNING.
    abandoned = reset_stale_checkpoint(
        checkpoint_dir, model_cfg, cfg, card, augment_cfg, stamp=False
    )
    if abandoned:
        runs.fail_abandoned_run(abandoned.run_id, abandoned.reason)
    with (
        # `dvc repro` killed: stop too (the next repro resumes), not train on unrecorded
        stop_with_dvc("train"),
        # the store failing mid-training: one line; the checkpoint stays for the rerun
        store.reaching_the_store(
            "training stopped; rerun train to resume at its last epoch", file_errors=False
        ),
        runs.training_run(
            mlflow_cfg.experiment,
            run_name=model_cfg.arch,
            params=params,
            tags=tags,
            resume_file=checkpoint_dir / RUN_ID_FILE,
        ) as run_id,
    ):
        datasets.log_inputs(datasets.training_inputs(card))  # the run page's Datasets panel
        try:
            result = fit_model(
                model_cfg, cfg, prepared_dir, card, **fit_args, loggers=[runs.epoch_logger()]
            )
        except TrainingDiverged as exc:
            # The run (its NaN epoch logged) ends FAILED with the reason; the checkpoint
            # goes, so the next run starts afresh instead of resuming diverged weights.
            runs.set_tags({"failure_reason": str(exc)})
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise
        model = inference_copy(result.model)
        summary = model_summary(model)
        runs.log_text(summary, "model_summary.txt")
        figures = model_card(model)
        runs.log_params(
            {
                "precision_policy": result.policy,
                "transferred_layers": result.transferred_layers,
                **({"pretrained_fresh_head": result.fresh_head} if weights else {}),
            }
            | {f"model.{k}": v for k, v in figures.items() if isinstance(v, int)}
        )
        runs.set_tags(
            {"stopped_early": str(result.stopped_early), "out_of_time": str(result.out_of_time)}
        )
        runs.log_dict(figures, "model_card.json")
        runs.log_dict(card, runs.DATA_CARD_ARTIFACT)
        runs.log_metrics(
            {"train_seconds": result.seconds, "train_images_per_second": result.images_per_second}
        )
        model_uri = logged_models.log_model(model, card=card)
        with atomic_dir(out_dir) as tmp:
            model.save(tmp / MODEL_FILE)
            (tmp / "summary.txt").write_text(summary + "\n")
            runs.write_run_file(run_id, model_uri, tmp)
        write_history(result.history, plots_dir / HISTORY_FILE)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return result


def check_prepared_task(task: str, card: dict, prepared_dir: Path) -> None:
    """The prepared data must be of the task params.yaml asks for."""
    from pipeline.errors import ConfigError

    prepared = card.get("task", "classification")
    if prepared != task:
        source = "digits" if task == "classification" else "digit_scenes"
        raise ConfigError(
            f"task: {task}, but {prepared_dir} holds {prepared} data; fetch and prepare "
            f"{task} data (e.g. fetch.source: {source})"
        )


def flatten_prepare(card: dict) -> dict[str, object]:
    """The prepare settings the data was made with, as `prepare.*` params."""
    return {f"prepare.{k}": v for k, v in card.get("prepare", {}).items()}
