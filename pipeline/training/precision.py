"""The dtype policy of a training: float32, or mixed precision where the GPU gains from it."""

from __future__ import annotations

import keras

from pipeline.training.devices import gpu_compute_capability


def resolve_precision(precision: str) -> str:
    """`auto` -> mixed_bfloat16 on GPUs of compute capability >= 8, else float32.

    float32 is the CPU choice because mixed_float16 runs ~6x slower on CPUs and
    bfloat16 gains depend on the CPU; users can still ask for either explicitly.
    """
    if precision != "auto":
        return precision
    capability = gpu_compute_capability()
    return "mixed_bfloat16" if capability and capability[0] >= 8 else "float32"


def set_precision(precision: str) -> str:
    """Set Keras's global dtype policy; return the resolved policy name.

    Loss scaling for mixed_float16 comes from `Model.compile(auto_scale_loss=True)`,
    which wraps the optimizer in a LossScaleOptimizer under that policy.
    """
    policy = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(policy)
    return policy
