"""Train stage: build the model by name, fit it, save it, and record the run in MLflow.

`fit_model` is the plain training function (no MLflow, no files beyond its
checkpoints), used by the stage, the tests and benchmarks; `run` is the stage.
"""

from __future__ import annotations

import csv
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import AugmentConfig, MlflowConfig, ModelConfig, TrainConfig, flatten
from pipeline.data.atomic import atomic_dir, atomic_file, write_text
from pipeline.data.layout import CHECKPOINT_DIR, MODEL_DIR, PLOTS_DIR, PREPARED_DIR
from pipeline.errors import PipelineError, TrainingDiverged

NO_AUGMENT = AugmentConfig()
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
RUN_ID_FILE = "mlflow_run_id"  # in the checkpoint dir: the run a resumed training continues


@dataclass
class TrainResult:
    model: object
    history: dict[str, list[float]]
    policy: str
    seconds: float
    images_per_second: float
    # transfer learning: layers initialized from train.init_from
    transferred_layers: int = 0
    stopped_early: bool = False  # by early stopping, or by the time budget
    out_of_time: bool = False  # stopped by train.max_minutes


def check_batch_size(cfg: TrainConfig, train_images: int) -> None:
    if cfg.batch_size > train_images:
        raise PipelineError(
            f"train.batch_size ({cfg.batch_size}) is larger than the training split "
            f"({train_images} images); lower it in params.yaml"
        )


def epoch_seeds_callback(seed: int):
    """Reseed the model's random layers (dropout, stochastic depth) at each epoch's start.

    Their seed generators advance with every step and are not part of the
    checkpoint, so a resumed run would draw other dropout masks than an
    uninterrupted one. Seeding each epoch from (seed, epoch) makes every epoch
    the same however the run got there.
    """
    import keras
    import numpy as np

    class EpochSeeds(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            states = [v for v in self.model.variables if "seed_generator_state" in v.path]
            draws = np.random.default_rng([seed, epoch, 1]).integers(2**31 - 1, size=len(states))
            for variable, draw in zip(states, draws, strict=True):
                variable.assign(np.array([draw, 0], dtype=variable.dtype))

    return EpochSeeds()


def standard_logs_callback():
    """Rename Keras's epoch logs to train_*/val_* and add the learning rate, in place.

    Runs before Keras's History and progress bar (user callbacks come first), so
    every consumer (history CSV, MLflow, console) sees the same names.
    """
    import keras

    class StandardLogs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            for key in [k for k in logs if not k.startswith("val_")]:
                logs[f"train_{key}"] = logs.pop(key)
            lr = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))

    return StandardLogs()


def divergence_guard():
    """Stops `fit` at the first batch whose loss is NaN or infinite and remembers where."""
    import math

    import keras

    class DivergenceGuard(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch, self.found = 0, None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            loss = float((logs or {}).get("loss", 0.0))
            if not math.isfinite(loss) and self.found is None:
                self.found = f"loss became {loss} at epoch {self.epoch + 1}, batch {batch + 1}"
                self.model.stop_training = True

    return DivergenceGuard()


def time_budget(minutes: float, started: float):
    """Stops `fit` after the epoch whose length, once more, would end past `minutes` after
    `started` (a perf_counter time): epochs are never cut short."""
    import keras

    class TimeBudget(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.reached = False

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            if minutes and now + (now - self.epoch_started) > started + 60 * minutes:
                self.reached = True
                self.model.stop_training = True

    return TimeBudget()


def fit_model(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    prepared_dir: Path,
    card: dict,
    *,
    augment_cfg: AugmentConfig = NO_AUGMENT,
    checkpoint_dir: Path = CHECKPOINT_DIR,
    loggers=(),
    extra_callbacks=(),
) -> TrainResult:
    """Build `model_cfg.arch` for the prepared data and fit it; resumes from `checkpoint_dir`.

    Training runs in phases (one unless `cfg.finetune` is progressive), each a
    `fit` over its epochs with its own trainable layers; a phase that finished
    leaves its weights in `checkpoint_dir`, the running one a per-epoch backup.
    `loggers` record each epoch before it is backed up; `extra_callbacks` run
    after the backup.
    """
    import keras

    from pipeline import transfer
    from pipeline.augment import BatchAugmenter, MaskAugmenter, check_augment, is_identity
    from pipeline.backend import set_precision
    from pipeline.checkpoints import AtomicBackupAndRestore, HistoryLog
    from pipeline.data.loader import ArrayBatches, EpochOrder, load_split
    from pipeline.regularize import add_kernel_regularization

    image_shape = tuple(card["image_shape"])
    segmentation = card.get("task") == "segmentation"
    if not segmentation:
        check_augment(augment_cfg, image_shape)
    source = transfer.load_source(cfg.init_from) if cfg.init_from else None
    keras.utils.set_random_seed(cfg.seed)
    policy = set_precision(cfg.precision)
    train_x, train_y = load_split(prepared_dir, "train")
    val_x, val_y = load_split(prepared_dir, "val")
    check_batch_size(cfg, len(train_y))
    num_classes = card["num_classes"]
    if is_identity(augment_cfg):
        augment = None
    elif segmentation:
        augment = MaskAugmenter(augment_cfg, card["ignore_index"], cfg.seed)
    else:
        augment = BatchAugmenter(augment_cfg, image_shape, cfg.seed)
    # Classification labels become one-hot rows (label smoothing, MixUp); masks stay ids.
    loader = {"num_classes": None if segmentation else num_classes, "workers": cfg.loader_workers}
    train_batches = ArrayBatches(
        train_x, train_y, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment, **loader
    )
    val_batches = ArrayBatches(val_x, val_y, cfg.batch_size, **loader) if len(val_y) else None

    model = build(model_cfg, image_shape, num_classes)
    transferred = transfer.copy_matching_weights(source, model) if source is not None else None
    add_kernel_regularization(model, l1=cfg.l1, l2=cfg.l2, max_norm=cfg.max_norm)

    reset_stale_checkpoint(checkpoint_dir, model_cfg, cfg, card, augment_cfg)
    history_csv = checkpoint_dir / HISTORY_FILE
    steps = len(train_batches)
    stopped_early = out_of_time = False
    epochs_run = 0
    started = time.perf_counter()
    for index, phase in enumerate(transfer.phases(cfg)):
        done = checkpoint_dir / f"phase{index}.weights.h5"
        if done.exists():  # finished before an interruption
            model.load_weights(done)
            continue
        backup_dir = checkpoint_dir / f"backup_phase{index}"
        # Keras peeks at batches before BackupAndRestore moves fit to the saved epoch:
        # the loader must already be on that epoch's shuffle.
        train_batches.set_epoch(max(phase.start, backed_up_epoch(backup_dir)))
        transfer.set_trainable(model, phase.unfrozen, cfg.unfreeze_groups)
        compile_for_phase(model, cfg, steps, card, phase.start, train_y if segmentation else None)
        guard = divergence_guard()
        budget = time_budget(cfg.max_minutes, started)
        callbacks = [
            guard,
            EpochOrder(train_batches),
            epoch_seeds_callback(cfg.seed),
            standard_logs_callback(),
            # Record the epoch before backing it up: a crash in between reruns the
            # epoch (identically) rather than leaving it out of the history.
            HistoryLog(history_csv),
            *loggers,
            # Saves model, optimizer and epoch every epoch; a rerun after a crash resumes.
            AtomicBackupAndRestore(str(backup_dir)),
            *early_stopping(cfg),
            budget,
            *extra_callbacks,
        ]
        fitted = model.fit(
            train_batches,
            validation_data=val_batches,
            initial_epoch=phase.start,
            epochs=phase.end,
            callbacks=callbacks,
            # The loader shuffles by (seed, epoch); Keras's own shuffle of batch order
            # draws from Python's global `random`, which a resumed process cannot replay.
            shuffle=False,
            verbose=1 if sys.stdout.isatty() else 2,
        )
        epochs_run += len(fitted.epoch)
        if guard.found:
            raise TrainingDiverged(
                f"train: {guard.found}; lower train.learning_rate or raise train.warmup_epochs "
                "(the run is marked FAILED, nothing is saved or registered)"
            )
        with atomic_file(done) as tmp:  # a torn file here would pass for a finished phase
            model.save_weights(tmp)
        if model.stop_training:
            stopped_early, out_of_time = True, budget.reached
            break
    seconds = time.perf_counter() - started
    return TrainResult(
        model=model,
        history=read_history(history_csv),
        policy=policy,
        seconds=seconds,
        # epochs run by this process: fewer than cfg.epochs when resumed
        images_per_second=epochs_run * len(train_y) / seconds if epochs_run else 0.0,
        transferred_layers=len(transferred.copied) if transferred else 0,
        stopped_early=stopped_early,
        out_of_time=out_of_time,
    )


def backed_up_epoch(backup_dir: Path) -> int:
    """The epoch a `keras.callbacks.BackupAndRestore` in `backup_dir` will resume at (0: none)."""
    import json

    metadata = backup_dir / "training_metadata.json"
    if not metadata.exists():
        return 0
    return int(json.loads(metadata.read_text()).get("epoch", 0))


def build(model_cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int):
    """The classifier or segmentation model `model_cfg` names, for this data."""
    if model_cfg.segmentation:
        from pipeline.models.segmentation import build_segmentation_model

        return build_segmentation_model(
            model_cfg.arch,
            image_shape,
            num_classes,
            encoder=model_cfg.encoder,
            upsampling=model_cfg.upsampling,
            aspp_rates=model_cfg.aspp_rates,
            width_multiplier=model_cfg.width_multiplier,
            dropout=model_cfg.dropout,
        )
    from pipeline.models.registry import build_model

    return build_model(
        model_cfg.arch,
        image_shape,
        num_classes,
        dropout=model_cfg.dropout,
        width_multiplier=model_cfg.width_multiplier,
        small_input=model_cfg.small_input,
        choices=model_cfg.layer_choices(),
        drop_path=model_cfg.drop_path,
    )


def loss_and_metrics(cfg: TrainConfig, card: dict, train_masks=None) -> tuple:
    """Classification: (label-smoothed) cross-entropy, accuracy and top-5. Segmentation:
    `cfg.loss` without void pixels, optional class weights from the training masks, and
    mean IoU over the epoch's accumulated confusion matrix."""
    import keras

    num_classes = card["num_classes"]
    if card.get("task") != "segmentation":
        return keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing), [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ]
    from pipeline.losses import SegmentationLoss, median_frequency_weights

    void = card["ignore_index"]
    weights = None
    if cfg.class_weights == "median_frequency":
        weights = median_frequency_weights(train_masks, num_classes, ignore_index=void)
    loss = SegmentationLoss(
        cfg.loss, num_classes, ignore_index=void, class_weights=weights, focal_gamma=cfg.focal_gamma
    )
    miou = keras.metrics.MeanIoU(
        num_classes, name="miou", ignore_class=void, sparse_y_true=True, sparse_y_pred=False
    )
    return loss, [miou]


def compile_for_phase(
    model, cfg: TrainConfig, steps: int, card: dict, start_epoch: int, train_masks=None
):
    """Compile with a fresh optimizer whose schedule continues at `start_epoch`."""
    from pipeline.optim import build_optimizer
    from pipeline.transfer import backbone_variable_paths

    optimizer = build_optimizer(
        cfg,
        steps,
        lr_scaled=backbone_variable_paths(model) if cfg.init_from else (),
        lr_scale=cfg.backbone_lr_scale,
    )
    loss, metrics = loss_and_metrics(cfg, card, train_masks)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    if start_epoch:
        model.optimizer.build(model.trainable_variables)
        model.optimizer.iterations.assign(start_epoch * steps)


def early_stopping(cfg: TrainConfig) -> list:
    import keras

    if not cfg.early_stopping_patience:
        return []
    return [
        keras.callbacks.EarlyStopping(
            monitor=cfg.early_stopping_monitor,
            mode="min" if cfg.early_stopping_monitor == "val_loss" else "max",
            patience=cfg.early_stopping_patience,
            restore_best_weights=cfg.early_stopping_restore_best,
        )
    ]


def inference_copy(model):
    """`model` without its optimizer and compile config: what is saved and served.

    Smaller (no optimizer slots) and loadable anywhere: the training loss, optimizer
    and schedule may be classes of this package (SegmentationLoss, differential
    learning rates, one-cycle). Rebuilt from its config, not `clone_model`, which
    compiles the clone like the original.
    """
    import keras

    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def reset_stale_checkpoint(
    checkpoint_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    card: dict,
    augment_cfg: AugmentConfig,
) -> str | None:
    """Keep `checkpoint_dir` only if it was made by this exact config and data.

    Resuming is for a run that was interrupted, not for one whose params or data
    changed since: that one starts over. Returns the MLflow run id of the
    interrupted training whose checkpoint was dropped, if any (it will never resume).
    """
    import json

    fingerprint = json.dumps(
        {
            "model": flatten(model_cfg, "model"),
            "train": flatten(cfg, "train"),
            "augment": flatten(augment_cfg, "augment"),
            "data": card["data_hash"],
        },
        sort_keys=True,
    )
    stamp = checkpoint_dir / "fingerprint.json"
    abandoned = None
    if stamp.exists() and stamp.read_text() != fingerprint:
        run_file = checkpoint_dir / RUN_ID_FILE
        abandoned = run_file.read_text().strip() if run_file.exists() else None
        print(
            f"train: {checkpoint_dir} is from other params or data; starting over", file=sys.stderr
        )
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_text(stamp, fingerprint)
    return abandoned


def read_history(path: Path) -> dict[str, list[float]]:
    """Per-epoch history from the CSV log; the last row wins for an epoch run twice (resume)."""
    rows: dict[int, dict[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = row
    keys = [k for k in next(iter(rows.values())) if k != "epoch"] if rows else []
    history = {"epoch": [e + 1 for e in sorted(rows)]}
    history.update({k: [float(rows[e][k]) for e in sorted(rows)] for k in keys})
    return history


def write_history(history: dict[str, list[float]], path: Path) -> None:
    keys = list(history)
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        writer.writerows(zip(*(history[k] for k in keys), strict=True))


def model_summary(model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=110)
    return "\n".join(lines)


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

    from pipeline import tracking
    from pipeline.augment import check_augment, check_mask_augment
    from pipeline.config import check_task
    from pipeline.data.prepare import read_card
    from pipeline.models.card import model_card
    from pipeline.models.registry import check_buildable
    from pipeline.transfer import check_init_from

    card = read_card(prepared_dir)
    # Bad input fails here, before an MLflow run or a file is created.
    check_prepared_task(task, card, prepared_dir)
    check_task(task, model_cfg, cfg)
    check_batch_size(cfg, card["totals"]["train"])
    image_shape = tuple(card["image_shape"])
    if model_cfg.segmentation:
        from pipeline.models.segmentation import check_segmentation_buildable

        check_segmentation_buildable(model_cfg.arch, model_cfg.encoder, image_shape)
        check_mask_augment(augment_cfg)
    else:
        check_buildable(model_cfg.arch, image_shape, model_cfg.layer_choices(), model_cfg.drop_path)
        check_augment(augment_cfg, image_shape)
    check_init_from(cfg.init_from)
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
    }
    tags = {
        "task": task,
        "architecture": model_cfg.arch,
        "data_hash": card["data_hash"],
        "data_source_sha256": card["source"].get("sha256", ""),
        **({"grid": mlflow_cfg.grid} if mlflow_cfg.grid else {}),
    }
    # Before the run starts: a checkpoint of other params must not continue its run,
    # and the interrupted run it belonged to is closed as FAILED rather than left RUNNING.
    abandoned = reset_stale_checkpoint(checkpoint_dir, model_cfg, cfg, card, augment_cfg)
    if abandoned:
        tracking.fail_abandoned_run(
            abandoned, "interrupted; not resumed because params or data changed since"
        )
    with (
        # the store failing mid-training: one line; the checkpoint stays for the rerun
        tracking.reaching_the_store(
            "training stopped; rerun train to resume at its last epoch", file_errors=False
        ),
        tracking.training_run(
            mlflow_cfg.experiment,
            run_name=model_cfg.arch,
            params=params,
            tags=tags,
            resume_file=checkpoint_dir / RUN_ID_FILE,
        ) as run_id,
    ):
        try:
            result = fit_model(
                model_cfg,
                cfg,
                prepared_dir,
                card,
                augment_cfg=augment_cfg,
                checkpoint_dir=checkpoint_dir,
                loggers=[tracking.epoch_logger()],
            )
        except TrainingDiverged as exc:
            # The run (its NaN epoch logged) ends FAILED with the reason; the checkpoint
            # goes, so the next run starts afresh instead of resuming diverged weights.
            tracking.set_tags({"failure_reason": str(exc)})
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            raise
        model = inference_copy(result.model)
        summary = model_summary(model)
        tracking.log_text(summary, "model_summary.txt")
        figures = model_card(model)
        tracking.log_params(
            {"precision_policy": result.policy, "transferred_layers": result.transferred_layers}
            | {f"model.{k}": v for k, v in figures.items() if isinstance(v, int)}
        )
        tracking.set_tags(
            {"stopped_early": str(result.stopped_early), "out_of_time": str(result.out_of_time)}
        )
        tracking.log_dict(figures, "model_card.json")
        tracking.log_dict(card, tracking.DATA_CARD_ARTIFACT)
        tracking.log_metrics(
            {"train_seconds": result.seconds, "train_images_per_second": result.images_per_second}
        )
        model_uri = tracking.log_model(model, card=card)
        with atomic_dir(out_dir) as tmp:
            model.save(tmp / MODEL_FILE)
            (tmp / "summary.txt").write_text(summary + "\n")
            tracking.write_run_file(run_id, model_uri, tmp)
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
