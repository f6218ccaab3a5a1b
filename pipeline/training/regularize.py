"""Kernel penalties (L1/L2) and the max-norm constraint, added to any built model.

The zoo's builders know nothing of these knobs: Keras keeps a regularizer and
a constraint on each variable (`variable.regularizer`, `variable.constraint`),
so they are set after building, on every kernel of every conv and dense layer
(depthwise and pointwise kernels included), nested models too. Keras adds the
penalties to the training loss and applies constraints after each update.
"""

from __future__ import annotations

KERNEL_SUFFIXES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def kernels(model) -> list:
    """Every trainable kernel variable of `model` (conv, dense, separable)."""
    return [v for v in model.trainable_weights if v.path.rsplit("/", 1)[-1] in KERNEL_SUFFIXES]


def add_kernel_regularization(model, *, l1: float = 0.0, l2: float = 0.0, max_norm: float = 0.0):
    """Set L1/L2 penalties and a max-norm constraint on `model`'s kernels; returns how many."""
    import keras

    targets = kernels(model)
    penalty = keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 or l2) else None
    for variable in targets:
        if penalty is not None:
            variable.regularizer = penalty
        if max_norm:
            # Norm of each output unit's incoming weights: all axes but the last.
            axes = list(range(len(variable.shape) - 1))
            variable.constraint = keras.constraints.MaxNorm(max_norm, axis=axes)
    return len(targets)
