"""One training in its own process, for the data-parallel tests: the device count is
fixed when the backend starts (JAX's fake CPU devices, TensorFlow's logical CPUs), so
each placement needs a fresh process.

usage: python fit_worker.py PREPARED OUT.npz DISTRIBUTION [TF_CPUS]
"""

import json
import os
import sys
from pathlib import Path

prepared, out, distribution = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
tf_cpus = int(sys.argv[4]) if len(sys.argv) > 4 else 1

import keras  # noqa: E402
import numpy as np  # noqa: E402

if keras.backend.backend() == "tensorflow" and tf_cpus > 1:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(tf_cpus)]
    )

from pipeline.config import ModelConfig, TrainConfig  # noqa: E402
from pipeline.data.data_card import read_card  # noqa: E402
from pipeline.training.fit import fit_model  # noqa: E402

cfg = TrainConfig(
    epochs=2,
    batch_size=64,
    warmup_epochs=1,
    learning_rate=float(os.environ.get("FIT_LR", "0.02")),
    optimizer=os.environ.get("FIT_OPTIMIZER", "sgd"),
    distribution=distribution,
)
result = fit_model(
    ModelConfig(arch="simple_cnn", width_multiplier=0.25, dropout=0.0, norm="none"),
    cfg,
    prepared,
    read_card(prepared),
    checkpoint_dir=out.with_suffix(".ckpt"),
)
weights = [keras.ops.convert_to_numpy(w) for w in result.model.weights]
np.savez(out, *weights)
kernel = result.model.trainable_weights[0].value
if keras.backend.backend() == "jax":  # the devices holding a copy of the first kernel
    copies = len(kernel.sharding.device_set)
else:
    copies = len(getattr(kernel, "values", [kernel]))  # a MirroredVariable's per-replica copies
out.with_suffix(".json").write_text(json.dumps({"history": result.history, "copies": copies}))
