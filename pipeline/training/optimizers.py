"""Optimizers and learning-rate schedules from `TrainConfig`.

Keras provides the optimizers (with decoupled weight decay, gradient clipping
and an EMA of the weights) and most schedules; this module maps the params to
them. Written here only what Keras lacks: the one-cycle schedule, and a
per-variable learning-rate scale for differential learning rates when
fine-tuning (Keras optimizers have one rate for all variables).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import keras

from pipeline.config import TrainConfig

# Normalization layers and biases are not decayed (the usual practice since AdamW).
NO_DECAY = ["gamma", "beta", "bias"]


@keras.saving.register_keras_serializable(package="pipeline")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Smith's one-cycle policy with cosine annealing (PyTorch's OneCycleLR defaults).

    Rises from max_lr / div_factor to max_lr over the first pct_start of the steps,
    then falls to max_lr / (div_factor * final_div_factor) at total_steps.
    """

    def __init__(
        self,
        max_lr: float,
        total_steps: int,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ):
        self.max_lr = max_lr
        self.total_steps = total_steps
        self.pct_start = pct_start
        self.div_factor = div_factor
        self.final_div_factor = final_div_factor

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        initial = self.max_lr / self.div_factor
        final = initial / self.final_div_factor
        rise_end = max(1.0, self.pct_start * self.total_steps - 1)
        fall_steps = max(1.0, self.total_steps - 1 - rise_end)

        def anneal(start, end, fraction):
            fraction = ops.clip(fraction, 0.0, 1.0)
            return end + (start - end) * 0.5 * (1.0 + ops.cos(math.pi * fraction))

        rising = anneal(initial, self.max_lr, step / rise_end)
        falling = anneal(self.max_lr, final, (step - rise_end) / fall_steps)
        return ops.where(step <= rise_end, rising, falling)

    def get_config(self):
        return {
            "max_lr": self.max_lr,
            "total_steps": self.total_steps,
            "pct_start": self.pct_start,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
        }


def build_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """The learning rate per optimizer step, as `cfg.schedule` names it."""
    schedules = keras.optimizers.schedules
    lr = cfg.learning_rate
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule in ("step", "multistep"):
        if cfg.schedule == "step":
            epochs = list(range(cfg.step_epochs, cfg.epochs, cfg.step_epochs))
        else:
            epochs = [m for m in cfg.milestones if m < cfg.epochs]
        if not epochs:
            return lr
        # Keras keeps values[i] while step <= boundaries[i]: the first step of epoch e
        # (step e * steps_per_epoch) must already have the new rate.
        return schedules.PiecewiseConstantDecay(
            boundaries=[e * steps_per_epoch - 1 for e in epochs],
            values=[lr * cfg.gamma**i for i in range(len(epochs) + 1)],
        )
    if cfg.schedule == "onecycle":
        return OneCycle(
            lr,
            total,
            pct_start=cfg.onecycle_pct_start,
            div_factor=cfg.onecycle_div_factor,
            final_div_factor=cfg.onecycle_final_div_factor,
        )
    warmup = cfg.warmup_epochs * steps_per_epoch if cfg.schedule == "warmup_cosine" else 0
    return schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else lr,
        decay_steps=max(1, total - warmup),
        warmup_target=lr if warmup else None,
        warmup_steps=warmup,
    )


def build_optimizer(
    cfg: TrainConfig, steps_per_epoch: int, *, lr_scaled: Collection[str] = (), lr_scale=1.0
):
    """The optimizer `cfg` describes, with its schedule, clipping and EMA.

    `lr_scaled`: paths of variables (the backbone when fine-tuning) whose
    learning rate is multiplied by `lr_scale`.
    """
    schedule = build_schedule(cfg, steps_per_epoch)
    common = {
        "weight_decay": cfg.weight_decay or None,
        "global_clipnorm": cfg.clip_norm or None,
        "use_ema": cfg.ema_momentum > 0,
        "ema_momentum": cfg.ema_momentum or 0.99,
    }
    optimizers = keras.optimizers
    if cfg.optimizer == "sgd":
        cls, kwargs = optimizers.SGD, {"momentum": cfg.momentum, "nesterov": cfg.nesterov}
    elif cfg.optimizer == "adam":
        cls, kwargs = optimizers.Adam, {}
    elif cfg.optimizer == "rmsprop":
        cls, kwargs = optimizers.RMSprop, {"momentum": cfg.momentum}
    else:
        cls, kwargs = optimizers.AdamW, {}
        common["weight_decay"] = cfg.weight_decay  # AdamW's own default would be 0.004
    if lr_scaled and lr_scale != 1.0:
        cls = _with_lr_scale(cls)
        kwargs |= {"lr_scaled": frozenset(lr_scaled), "lr_scale": lr_scale}
    optimizer = cls(schedule, **kwargs, **common)
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer


def _with_lr_scale(cls):
    """`cls` with its learning rate multiplied by `lr_scale` for the variables in `lr_scaled`.

    Keras optimizers call `update_step(gradient, variable, learning_rate)` per
    variable, on every backend (JAX's stateless apply included), so scaling the
    rate there gives differential learning rates without a second optimizer.
    Decoupled weight decay follows the scaled rate as well.
    """

    class LrScaled(cls):
        def __init__(self, *args, lr_scaled: frozenset[str], lr_scale: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.lr_scaled, self.lr_scale = lr_scaled, lr_scale

        def _scaled(self, variable) -> bool:
            # Backends hand over their own variable objects: look up the Keras one.
            index = self._get_variable_index(variable)
            return self._trainable_variables[index].path in self.lr_scaled

        def update_step(self, gradient, variable, learning_rate):
            if self._scaled(variable):
                learning_rate = learning_rate * self.lr_scale
            return super().update_step(gradient, variable, learning_rate)

        def _apply_weight_decay(self, variables):
            if self.weight_decay is None:
                return
            scaled = [v for v in variables if self._scaled(v)]
            others = [v for v in variables if not self._scaled(v)]
            super()._apply_weight_decay(others)
            decay = self.weight_decay
            self.weight_decay = decay * self.lr_scale
            try:
                super()._apply_weight_decay(scaled)
            finally:
                self.weight_decay = decay

    LrScaled.__name__ = LrScaled.__qualname__ = f"LrScaled{cls.__name__}"
    return LrScaled
