"""Run an exported copy as its users would: ONNX Runtime for `.onnx`, TensorFlow's LiteRT
interpreter for `.tflite`, `tf.saved_model.load` for a SavedModel. Each runner maps a
float32 (N, H, W, C) batch to {"logits", "probabilities"} as numpy arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.export.convert import INPUT_NAME, OUTPUT_NAMES


class OnnxRunner:
    """ONNX Runtime on the CPU, with as many threads as this process may use."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch.astype(np.float32)})
        return dict(zip(OUTPUT_NAMES, outputs, strict=True))


class LiteRTRunner:
    """TensorFlow's LiteRT (TFLite) interpreter, through the model's serving signature
    (which names the outputs and resizes the input to each batch)."""

    def __init__(self, path: Path, threads: int | None = None):
        import tensorflow as tf

        self.interpreter = tf.lite.Interpreter(
            model_path=str(path), num_threads=threads or len(os.sched_getaffinity(0))
        )
        self.serve = self.interpreter.get_signature_runner()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        out = self.serve(**{INPUT_NAME: batch.astype(np.float32)})
        return {name: np.asarray(out[name]) for name in OUTPUT_NAMES}


class SavedModelRunner:
    """A TensorFlow SavedModel's `serving_default` signature."""

    def __init__(self, path: Path, threads: int | None = None):
        import tensorflow as tf

        self.tf = tf
        self.serve = tf.saved_model.load(str(path)).signatures["serving_default"]

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        out = self.serve(**{INPUT_NAME: self.tf.constant(batch, self.tf.float32)})
        return {name: np.asarray(out[name]) for name in OUTPUT_NAMES}


RUNNERS = {"onnx": OnnxRunner, "litert": LiteRTRunner, "saved_model": SavedModelRunner}


def runner(fmt: str, path: Path, threads: int | None = None):
    return RUNNERS[fmt](path, threads)


def probabilities(run, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """`run`'s probabilities of uint8 `images`, batch by batch."""
    return np.concatenate(
        [
            run(images[i : i + batch_size].astype(np.float32))["probabilities"]
            for i in range(0, len(images), batch_size)
        ]
    )
