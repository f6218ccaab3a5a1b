"""Trained-model ONNX parity on the CIFAR-10 test split (docs/export.md).

The same functions as `python -m pipeline export --format onnx` (float32 copy, logits
output, Keras's ONNX exporter, `export.agreement.measure`), over four zoo models trained
briefly, so that their logits are a trained network's, not random weights'.

    PREPARED=<project>/data/prepared OUT=<folder> python onnx_trained_parity.py train
    KERAS_BACKEND=tensorflow ... python onnx_trained_parity.py measure
    KERAS_BACKEND=jax ... python onnx_trained_parity.py measure

train (TensorFlow): 8,000 random train images, 2 epochs, Adam 1e-3, batch 64; saves
<OUT>/<arch>.keras. measure: loads each, exports ONNX on the running backend, compares
ONNX Runtime with Keras on every test image; writes <OUT>/parity-<backend>.json.
"""

import json
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np

import pipeline.models.layers  # noqa: F401 - registers the custom layers for loading
from pipeline.data.loader import load_split
from pipeline.export import agreement, convert, runtimes
from pipeline.models.architectures import build_model

ARCHS = ["simple_cnn", "resnet18", "mobilenet_v2", "efficientnet_b0"]
PREPARED = Path(os.environ.get("PREPARED", "data/prepared"))
OUT = Path(os.environ.get("OUT", "trained"))
N_TRAIN = 8000


def train():
    OUT.mkdir(exist_ok=True)
    x, y = load_split(PREPARED, "train")
    pick = np.sort(np.random.default_rng(0).choice(len(x), N_TRAIN, replace=False))
    x, y = np.asarray(x[pick]), np.asarray(y[pick])  # prepared splits are sorted by class
    for arch in ARCHS:
        keras.utils.set_random_seed(0)
        model = build_model(arch, (32, 32, 3), 10)
        model.compile(
            keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        t = time.time()
        h = model.fit(x, y, batch_size=64, epochs=2, verbose=0)
        print(arch, "train acc", h.history["accuracy"][-1], f"{time.time() - t:.0f}s", flush=True)
        model.save(OUT / f"{arch}.keras")


def measure():
    backend = keras.backend.backend()
    x, y = load_split(PREPARED, "test")
    x, y = np.asarray(x), np.asarray(y)
    results = {}
    for arch in ARCHS:
        t = time.time()
        model = keras.saving.load_model(OUT / f"{arch}.keras")
        model = convert.with_logits(convert.float32_copy(model))
        try:
            path = convert.export(model, "onnx", OUT / f"{arch}-{backend}.onnx")
            run = runtimes.runner("onnx", path)
            m = agreement.measure(model, run, x, y, batch_size=100)
        except Exception as error:  # noqa: BLE001 - the exporter's refusal is a result
            m = {"error": str(error).splitlines()[0][:300]}
        scale = 0.0
        for s in range(0, len(x), 500):
            scale = max(
                scale,
                float(
                    np.abs(
                        model.predict_on_batch(x[s : s + 100].astype(np.float32))["logits"]
                    ).max()
                ),
            )
        m["max_abs_logit"] = scale
        m["seconds"] = round(time.time() - t, 1)
        results[arch] = m
        print(backend, arch, m, flush=True)
    (OUT / f"parity-{backend}.json").write_text(json.dumps(results, indent=1))


{"train": train, "measure": measure}[sys.argv[1]]()
