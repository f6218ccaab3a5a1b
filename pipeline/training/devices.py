"""Which devices train, and how: the only module that asks which Keras backend runs.

`train.distribution: data_parallel` replicates the model on every device and
splits each global batch (`train.batch_size`) evenly between them, through the
engine each backend ships: `keras.distribution.DataParallel` on JAX (every
device of every process, so several hosts when launched multi-process) and
`tf.distribute.MirroredStrategy` on TensorFlow (the devices of one host).
Gradients are averaged over the global batch, so the same global batch and
seed train the same model on 1 or N devices, up to float reassociation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import keras

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """Where one training runs: its replicas (devices), and this process among its peers."""

    distribution: str  # none | data_parallel
    devices: tuple[str, ...]  # every device of the job, all processes
    processes: int = 1
    process_id: int = 0

    @property
    def replicas(self) -> int:
        return len(self.devices) if self.distribution != "none" else 1

    @property
    def chief(self) -> bool:
        """Process 0: the only one that writes outputs, checkpoints and MLflow."""
        return self.process_id == 0

    def params(self, batch_size: int) -> dict[str, object]:
        """What the MLflow run records about the placement."""
        return {
            "train.replicas": self.replicas,
            "train.per_replica_batch": batch_size // self.replicas,
            "train.processes": self.processes,
            "train.devices": ",".join(sorted(set(self.device_kinds()))),
        }

    def device_kinds(self) -> list[str]:
        return [d.rsplit(":", 1)[0] for d in self.devices]


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


def training_devices() -> tuple[str, ...]:
    """The devices a data-parallel training would use: the accelerators if any, else the
    CPUs (several only when split for testing: JAX's fake host devices, TensorFlow's
    logical CPUs)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return tuple(f"{d.platform}:{d.id}" for d in jax.devices())
    if backend == "tensorflow":
        import tensorflow as tf

        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tuple(d.name for d in devices)
    return ("cpu:0",)


def plan(distribution: str, batch_size: int) -> Placement:
    """The placement of `train.distribution` on this machine, refused in one line where it
    would do nothing (one device) or cannot split the global batch evenly."""
    processes, process_id = _process_group()
    if distribution == "none":
        if processes > 1:
            raise ConfigError(
                f"train.distribution: none, but this is process {process_id} of {processes}; "
                "set train.distribution: data_parallel to train on every process"
            )
        return Placement("none", training_devices()[:1])
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        raise ConfigError(
            f"train.distribution: {distribution} needs the jax or tensorflow backend, not {backend}"
        )
    devices = training_devices()
    if len(devices) < 2:
        raise ConfigError(
            f"train.distribution: {distribution}, but the {backend} backend sees one device "
            f"({devices[0]}); it would do nothing: use a machine with several GPUs, launch "
            "several processes, or set train.distribution: none"
        )
    if batch_size % len(devices):
        low = batch_size - batch_size % len(devices)
        raise ConfigError(
            f"train.batch_size ({batch_size}) must be a multiple of the {len(devices)} "
            f"replicas to split evenly (the global batch; e.g. {low or len(devices)} or "
            f"{low + len(devices)})"
        )
    return Placement(distribution, devices, processes, process_id)


def _process_group() -> tuple[int, int]:
    """(process count, this process's index): JAX's, when it was started multi-process."""
    if keras.backend.backend() != "jax":
        return 1, 0
    import jax

    return jax.process_count(), jax.process_index()


@contextlib.contextmanager
def scope(placement: Placement):
    """Build, compile and fit inside this: the backend's data-parallel engine, or nothing."""
    if placement.distribution == "none":
        yield
        return
    if keras.backend.backend() == "jax":
        # Each process's loader yields its own slice of every global batch (keras#21430):
        # Keras must not shard it again.
        distribution = keras.distribution.DataParallel(
            devices=keras.distribution.list_devices()[: placement.replicas],
            auto_shard_dataset=False,
        )
        with distribution.scope():
            yield
        return
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(list(placement.devices))
    with strategy.scope():
        yield


def synchronize_batch_norm(model, placement: Placement) -> None:
    """Batch statistics over the global batch, as one device computes them.

    JAX's data parallelism is one program over global arrays, so its batch norm
    already sees the whole batch; TensorFlow's replicas each see their own slice
    unless the layer is `synchronized`.
    """
    if placement.distribution == "none" or keras.backend.backend() != "tensorflow":
        return
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def barrier(placement: Placement, name: str) -> None:
    """Every process waits here for the others (a no-op for one process)."""
    if placement.processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(placement: Placement, value: int, what: str) -> None:
    """Refuse, on every process at once, to go on unless all hold the same `value` of `what`."""
    if placement.processes == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    values = [int(v) for v in multihost_utils.process_allgather(np.int64(value))]
    if len(set(values)) > 1:
        from pipeline.errors import PipelineError

        found = ", ".join(f"process {i}: {v}" for i, v in enumerate(values))
        raise PipelineError(
            f"train: the processes disagree on {what} ({found}); every process must see the "
            "same data/ and checkpoint folder (a shared filesystem, or the same files on each "
            "host)"
        )


@contextlib.contextmanager
def local_variables():
    """New variables on this process alone, for the chief's saves inside `fit`: saving
    weights builds throwaway variables, and under JAX's DataParallel each new variable is
    placed by a collective that the other processes, not saving, would never enter."""
    if keras.backend.backend() != "jax" or keras.distribution.distribution() is None:
        yield
        return
    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)
