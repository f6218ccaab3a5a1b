"""The only module that asks which Keras backend runs (TensorFlow, JAX or torch)."""

from __future__ import annotations

import keras


def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first GPU the active backend sees, or None without a GPU."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        return tuple(capability) if capability else None
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus:
            return None
        text = str(getattr(gpus[0], "compute_capability", "0.0"))
        major, _, minor = text.partition(".")
        return int(major), int(minor or 0)
    if backend == "torch":
        import torch

        return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    return None


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
