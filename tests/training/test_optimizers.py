"""Optimizers and schedules: each knob changes what it claims, checked against its formula."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.training.optimizers import build_optimizer, build_schedule

STEPS = 10  # steps per epoch
LR = 0.1


def lr_at(schedule, step: int) -> float:
    if isinstance(schedule, float):
        return schedule
    return float(keras.ops.convert_to_numpy(schedule(step)))


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 10, "learning_rate": LR, **overrides})


def expected_lr(cfg: TrainConfig, step: int) -> float:
    """The schedules' formulas, written out independently of Keras."""
    total = cfg.epochs * STEPS
    if cfg.schedule == "constant":
        return LR
    if cfg.schedule == "step":
        return LR * cfg.gamma ** math.floor(step / (cfg.step_epochs * STEPS))
    if cfg.schedule == "multistep":
        return LR * cfg.gamma ** sum(step >= m * STEPS for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return LR * 0.5 * (1 + math.cos(math.pi * step / total))
    if cfg.schedule == "warmup_cosine":
        warmup = cfg.warmup_epochs * STEPS
        if step < warmup:
            return LR * step / warmup
        return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    # one-cycle, PyTorch's OneCycleLR (cos annealing)
    initial = LR / cfg.onecycle_div_factor
    final = initial / cfg.onecycle_final_div_factor
    peak = cfg.onecycle_pct_start * total - 1
    if step <= peak:
        return final_cos(initial, LR, step / peak)
    return final_cos(LR, final, (step - peak) / (total - 1 - peak))


def final_cos(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))


@pytest.mark.parametrize(
    "cfg",
    [
        config(schedule="constant"),
        config(schedule="step", step_epochs=3, gamma=0.5),
        config(schedule="multistep", milestones=(4, 7), gamma=0.1),
        config(schedule="cosine"),
        config(schedule="warmup_cosine", warmup_epochs=2),
        config(schedule="onecycle", onecycle_pct_start=0.25),
    ],
    ids=lambda c: c.schedule,
)
def test_schedule_per_step_matches_its_formula(cfg):
    schedule = build_schedule(cfg, STEPS)
    for step in range(0, cfg.epochs * STEPS):
        assert lr_at(schedule, step) == pytest.approx(expected_lr(cfg, step), rel=1e-4, abs=1e-8)


def test_onecycle_starts_low_peaks_at_the_rate_and_ends_near_zero():
    cfg = config(schedule="onecycle")
    schedule = build_schedule(cfg, STEPS)
    values = [lr_at(schedule, s) for s in range(cfg.epochs * STEPS)]
    assert values[0] == pytest.approx(LR / 25)
    assert max(values) == pytest.approx(LR, rel=1e-3)
    assert values[-1] == pytest.approx(LR / 25 / 1e4, rel=1e-3)


@pytest.mark.parametrize(
    ("name", "cls", "checks"),
    [
        ("sgd", keras.optimizers.SGD, {"momentum": 0.9, "nesterov": True}),
        ("adam", keras.optimizers.Adam, {}),
        ("adamw", keras.optimizers.AdamW, {"weight_decay": 0.0005}),
        ("rmsprop", keras.optimizers.RMSprop, {"momentum": 0.9}),
    ],
)
def test_each_optimizer_is_the_keras_one_with_its_settings(name, cls, checks):
    optimizer = build_optimizer(config(optimizer=name), STEPS)
    assert isinstance(optimizer, cls)
    for attribute, value in checks.items():
        assert getattr(optimizer, attribute) == pytest.approx(value)


def apply(optimizer, grads, variables):
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)


def test_weight_decay_is_decoupled_and_skips_biases():
    cfg = config(optimizer="sgd", momentum=0.0, schedule="constant", weight_decay=0.1)
    layer = keras.layers.Dense(3, bias_initializer="ones")
    layer.build((None, 4))
    kernel_before = layer.kernel.numpy().copy()
    optimizer = build_optimizer(cfg, STEPS)
    apply(optimizer, [np.zeros((4, 3), "float32"), np.zeros(3, "float32")], layer.trainable_weights)
    # zero gradient: the kernel shrinks by lr * wd, the bias keeps its value
    np.testing.assert_allclose(layer.kernel.numpy(), kernel_before * (1 - LR * 0.1), rtol=1e-6)
    np.testing.assert_array_equal(layer.bias.numpy(), np.ones(3))


def test_clip_norm_bounds_the_update():
    variable = keras.Variable(np.zeros(4, "float32"))
    cfg = config(optimizer="sgd", momentum=0.0, schedule="constant", weight_decay=0.0)
    apply(build_optimizer(cfg, STEPS), [np.full(4, 100.0, "float32")], [variable])
    assert np.linalg.norm(variable.numpy()) == pytest.approx(LR * 200)

    variable.assign(np.zeros(4, "float32"))
    apply(
        build_optimizer(config(**{**vars(cfg), "clip_norm": 1.0}), STEPS),
        [np.full(4, 100.0, "float32")],
        [variable],
    )
    assert np.linalg.norm(variable.numpy()) == pytest.approx(LR * 1.0, rel=1e-5)


def test_backbone_lr_scale_scales_only_the_named_variables():
    backbone = keras.Variable(np.zeros(2, "float32"), name="backbone")
    head = keras.Variable(np.zeros(2, "float32"), name="head")
    cfg = config(optimizer="sgd", momentum=0.0, schedule="constant", weight_decay=0.0)
    optimizer = build_optimizer(cfg, STEPS, lr_scaled={backbone.path}, lr_scale=0.1)
    apply(optimizer, [np.ones(2, "float32"), np.ones(2, "float32")], [backbone, head])
    np.testing.assert_allclose(head.numpy(), [-LR, -LR], rtol=1e-6)
    np.testing.assert_allclose(backbone.numpy(), [-LR * 0.1, -LR * 0.1], rtol=1e-6)


def test_ema_ends_training_on_the_moving_average_of_the_weights():
    """EMA leaves the raw updates alone and ends on their exponential average."""
    momentum = 0.9
    trajectory: list[list[np.ndarray]] = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            trajectory.append([w.copy() for w in self.model.get_weights()])

    def train(ema: float, callbacks=()):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        cfg = config(optimizer="sgd", schedule="constant", ema_momentum=ema, weight_decay=0.0)
        model.compile(optimizer=build_optimizer(cfg, STEPS), loss="mse")
        x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
        model.fit(
            x, x.sum(1, keepdims=True), epochs=2, batch_size=16, verbose=0, callbacks=callbacks
        )
        return model.get_weights()

    raw = train(0.0, [Record()])
    averaged = [w.copy() for w in trajectory[0]]  # Keras starts the average at step 1
    for weights in trajectory[1:]:
        averaged = [
            momentum * a + (1 - momentum) * w for a, w in zip(averaged, weights, strict=True)
        ]
    with_ema = train(momentum)
    for got, want, last in zip(with_ema, averaged, raw, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, last)
