"""The Keras callbacks of every training run: reproducible epochs, standard log names,
a stop on divergence and a time budget. (Per-epoch files: `training.checkpoints`.)"""

from __future__ import annotations

import time


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
