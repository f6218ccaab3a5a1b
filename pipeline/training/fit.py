"""The fit loop: build the model for the prepared data, compile per phase, fit, resume.

`fit_model` is the plain training function (no MLflow, no files beyond its
checkpoints), used by the train stage, the tests and benchmarks.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import atomic_file
from pipeline.config import AugmentConfig, ModelConfig, TrainConfig
from pipeline.errors import PipelineError, TrainingDiverged
from pipeline.layout import CHECKPOINT_DIR
from pipeline.training.history import HISTORY_FILE, read_history

NO_AUGMENT = AugmentConfig()


@dataclass
class TrainResult:
    model: object
    history: dict[str, list[float]]
    policy: str
    seconds: float
    images_per_second: float
    # transfer learning: layers initialized from train.init_from or model.pretrained
    transferred_layers: int = 0
    # model.pretrained: the classifier head started fresh (another class count)
    fresh_head: bool = False
    stopped_early: bool = False  # by early stopping, or by the time budget
    out_of_time: bool = False  # stopped by train.max_minutes


def check_batch_size(cfg: TrainConfig, train_images: int) -> None:
    if cfg.batch_size > train_images:
        raise PipelineError(
            f"train.batch_size ({cfg.batch_size}) is larger than the training split "
            f"({train_images} images); lower it in params.yaml"
        )


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
    weights=None,
) -> TrainResult:
    """Build `model_cfg.arch` for the prepared data and fit it; resumes from `checkpoint_dir`.

    On the devices `cfg.distribution` places it on (`pipeline.training.devices`); of
    several processes, only the chief (process 0) writes the checkpoint.

    Training runs in phases (one unless `cfg.finetune` is progressive), each a
    `fit` over its epochs with its own trainable layers; a phase that finished
    leaves its weights in `checkpoint_dir`, the running one a per-epoch backup.
    `loggers` record each epoch before it is backed up; `extra_callbacks` run
    after the backup. `weights`: `model_cfg.pretrained` resolved
    (`models.pretrained.resolve`; resolved here when not given).
    """
    import keras

    from pipeline.config import check_transfer
    from pipeline.data.loader import ArrayBatches, EpochOrder, load_split
    from pipeline.models import pretrained
    from pipeline.models.from_config import build, encoder_classifier
    from pipeline.training import devices, transfer
    from pipeline.training.augment import BatchAugmenter, MaskAugmenter, check_augment, is_identity
    from pipeline.training.callbacks import (
        divergence_guard,
        epoch_seeds_callback,
        standard_logs_callback,
        time_budget,
    )
    from pipeline.training.checkpoints import (
        AtomicBackupAndRestore,
        HistoryLog,
        backed_up_epoch,
        reset_stale_checkpoint,
    )
    from pipeline.training.precision import set_precision
    from pipeline.training.regularize import add_kernel_regularization

    placement = devices.plan(cfg.distribution, cfg.batch_size)
    check_placement(cfg, placement)
    image_shape = tuple(card["image_shape"])
    segmentation = card.get("task") == "segmentation"
    if not segmentation:
        check_augment(augment_cfg, image_shape)
    check_transfer(model_cfg, cfg)
    source = transfer.load_source(cfg.init_from) if cfg.init_from else None
    if weights is None:
        weights = pretrained.resolve(model_cfg, image_shape)
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
    loader = {
        "num_classes": None if segmentation else num_classes,
        "workers": cfg.loader_workers,
        "replicas": placement.replicas,
        "process": (placement.process_id, placement.processes),
    }
    train_batches = ArrayBatches(
        train_x, train_y, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment, **loader
    )
    void = card.get("ignore_index") if segmentation else None
    val_batches = (
        ArrayBatches(val_x, val_y, cfg.batch_size, pad=True, ignore_index=void, **loader)
        if len(val_y)
        else None
    )
    with devices.scope(placement):
        model = build(model_cfg, image_shape, num_classes)
        devices.synchronize_batch_norm(model, placement)
        transferred = transfer.copy_matching_weights(source, model) if source is not None else None
        fresh_head = False
        if weights is not None and model_cfg.segmentation:
            encoder = encoder_classifier(model_cfg, image_shape)
            pretrained.load_encoder(encoder, model_cfg, weights)
            transferred = transfer.copy_matching_weights(encoder, model)
        elif weights is not None:
            transferred = pretrained.load(model, model_cfg, weights)
            fresh_head = transferred.fresh_head
        add_kernel_regularization(model, l1=cfg.l1, l2=cfg.l2, max_norm=cfg.max_norm)

        if placement.chief:
            reset_stale_checkpoint(checkpoint_dir, model_cfg, cfg, card, augment_cfg)
        devices.barrier(placement, "checkpoint checked")  # the others read what the chief kept
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
            resume_at = max(phase.start, backed_up_epoch(backup_dir))
            devices.agree(placement, resume_at, f"the epoch phase {index + 1} resumes at")
            train_batches.set_epoch(resume_at)
            transfer.set_trainable(model, phase.unfrozen, cfg.unfreeze_groups)
            compile_for_phase(
                model,
                cfg,
                steps,
                card,
                phase.start,
                train_y if segmentation else None,
                weighted=placement.replicas > 1,
                transferred=transferred is not None,
            )
            guard = divergence_guard()
            budget = time_budget(cfg.max_minutes, started)
            callbacks = [
                guard,
                EpochOrder(train_batches),
                epoch_seeds_callback(cfg.seed),
                standard_logs_callback(),
                # Record the epoch before backing it up: a crash in between reruns the
                # epoch (identically) rather than leaving it out of the history.
                HistoryLog(history_csv, write=placement.chief),
                *loggers,
                # Saves model, optimizer and epoch every epoch; a rerun after a crash resumes.
                AtomicBackupAndRestore(str(backup_dir), write=placement.chief),
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
            if placement.chief:  # a torn file here would pass for a finished phase
                with devices.local_variables(), atomic_file(done) as tmp:
                    model.save_weights(tmp)
            if model.stop_training:
                stopped_early, out_of_time = True, budget.reached
                break
    seconds = time.perf_counter() - started
    return TrainResult(
        model=model,
        history=read_history(history_csv) if placement.chief else {},
        policy=policy,
        seconds=seconds,
        # epochs run by this process: fewer than cfg.epochs when resumed
        images_per_second=epochs_run * len(train_y) / seconds if epochs_run else 0.0,
        transferred_layers=len(transferred.copied) if transferred else 0,
        fresh_head=fresh_head,
        stopped_early=stopped_early,
        out_of_time=out_of_time,
    )


def loss_and_metrics(cfg: TrainConfig, card: dict, train_masks=None, weighted=False) -> tuple:
    """Classification: (label-smoothed) cross-entropy, accuracy and top-5. Segmentation:
    `cfg.loss` without void pixels, optional class weights from the training masks, and
    mean IoU over the epoch's accumulated confusion matrix.

    `weighted`: the classification loss is the mean over rows of nonzero sample weight,
    so the rows that pad a data-parallel evaluation batch do not dilute it."""
    import keras

    num_classes = card["num_classes"]
    if card.get("task") != "segmentation":
        reduction = "mean_with_sample_weight" if weighted else "sum_over_batch_size"
        loss = keras.losses.CategoricalCrossentropy(
            label_smoothing=cfg.label_smoothing, reduction=reduction
        )
        return loss, [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ]
    from pipeline.training.losses import SegmentationLoss, median_frequency_weights

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
    model,
    cfg: TrainConfig,
    steps: int,
    card: dict,
    start_epoch: int,
    train_masks=None,
    *,
    weighted: bool = False,
    transferred: bool = False,
):
    """Compile with a fresh optimizer whose schedule continues at `start_epoch`;
    `transferred`: the backbone was loaded (train.backbone_lr_scale applies to it)."""
    from pipeline.training.optimizers import build_optimizer
    from pipeline.training.transfer import backbone_variable_paths

    optimizer = build_optimizer(
        cfg,
        steps,
        lr_scaled=backbone_variable_paths(model) if transferred else (),
        lr_scale=cfg.backbone_lr_scale,
    )
    loss, metrics = loss_and_metrics(cfg, card, train_masks, weighted)
    # Keras weighs only `weighted_metrics` by the sample weights that mark padding rows.
    metric_arg = "weighted_metrics" if weighted else "metrics"
    model.compile(optimizer=optimizer, loss=loss, **{metric_arg: metrics})
    if start_epoch:
        model.optimizer.build(model.trainable_variables)
        model.optimizer.iterations.assign(start_epoch * steps)


def check_placement(cfg: TrainConfig, placement) -> None:
    """Settings that several processes cannot share."""
    if placement.processes > 1 and cfg.max_minutes:
        raise PipelineError(
            f"train.max_minutes ({cfg.max_minutes:g}) cannot stop {placement.processes} "
            "processes together (each would judge time by its own clock); set it to 0 for a "
            "multi-process training, or bound it with train.epochs"
        )


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
