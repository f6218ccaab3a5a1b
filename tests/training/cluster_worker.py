"""One member of a test process group: joins it through pipeline.training.cluster (the
KERAS_DISTRIBUTION_* variables), then fits a tiny Dense model with Keras's DataParallel,
each process's PyDataset yielding its slice of every global batch, as the loader does.

usage: python cluster_worker.py OUT_DIR fit|slow|fail [INIT_TIMEOUT_S]
Every mode writes OUT_DIR/pid<id>, and OUT_DIR/training<id> after the first epoch.
fit: 3 epochs, losses to OUT_DIR/p<id>.json. slow: 200 epochs with a pause per batch
(to be killed). fail: process 1 fails in Python at
its second epoch, with one error line, as `python -m pipeline` would print it.
"""

import json
import os
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.training import cluster as cl

out, mode = Path(sys.argv[1]), sys.argv[2]
group = cl.from_env(None, backend="jax")
(out / f"pid{group.process_id}").write_text(str(os.getpid()))
cl.initialize(group, int(sys.argv[3]) if len(sys.argv) > 3 else None)

import keras  # noqa: E402
import numpy as np  # noqa: E402

keras.utils.set_random_seed(1)
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x.sum(1, keepdims=True) > 0).astype("float32")
GLOBAL_BATCH = 32
share = GLOBAL_BATCH // group.num_processes


class Slice(keras.utils.PyDataset):
    def __len__(self):
        return len(x) // GLOBAL_BATCH

    def __getitem__(self, i):
        start = i * GLOBAL_BATCH + group.process_id * share
        return x[start : start + share], y[start : start + share]


class Steer(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            print(f"training {group.process_id}", flush=True)
            (out / f"training{group.process_id}").touch()
        if mode == "fail" and epoch == 1 and group.process_id == 1:
            raise PipelineError("train: process 1 failed on purpose")

    def on_train_batch_end(self, batch, logs=None):
        if mode == "slow":
            time.sleep(0.2)


distribution = keras.distribution.DataParallel(
    devices=keras.distribution.list_devices(), auto_shard_dataset=False
)
with distribution.scope():
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.1), keras.losses.BinaryCrossentropy(from_logits=True))
    try:
        history = model.fit(
            Slice(), epochs=200 if mode == "slow" else 3, verbose=0, callbacks=[Steer()]
        )
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        cl.abandon(exc.exit_code)
        sys.exit(exc.exit_code)
(out / f"p{group.process_id}.json").write_text(
    json.dumps(
        {
            "loss": history.history["loss"],
            "devices": len(keras.distribution.list_devices()),
        }
    )
)
