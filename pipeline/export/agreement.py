"""Does an exported copy answer as the Keras model does? Both run over the same images
(the prepared test split); the figures are the largest logit and probability
differences, the share of images (pixels, for segmentation) whose top class agrees, and
each one's top-1 against the labels."""

from __future__ import annotations

import numpy as np


def measure(keras_model, run, images: np.ndarray, labels: np.ndarray, batch_size: int = 64):
    """Agreement of `run` (a `runtimes` runner) with `keras_model` (float32, `with_logits`)."""
    worst = {"logits": 0.0, "probabilities": 0.0}
    same = hits_keras = hits_export = total = 0
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32)
        truth = np.asarray(labels[start : start + batch_size])
        want = {k: np.asarray(v) for k, v in keras_model.predict_on_batch(batch).items()}
        got = run(batch)
        for name in worst:
            worst[name] = max(worst[name], float(np.abs(got[name] - want[name]).max()))
        top_keras, top_export = want["logits"].argmax(-1), got["logits"].argmax(-1)
        counted = truth != 255 if truth.ndim > 1 else np.ones(truth.shape, bool)  # void pixels
        same += int((top_keras == top_export)[counted].sum())
        hits_keras += int((top_keras == truth)[counted].sum())
        hits_export += int((top_export == truth)[counted].sum())
        total += int(counted.sum())
    return {
        "max_abs_logit_diff": worst["logits"],
        "max_abs_probability_diff": worst["probabilities"],
        "top1_agreement": same / total,
        "top1_disagreements": total - same,
        "keras_top1": hits_keras / total,
        "export_top1": hits_export / total,
        "images": int(len(images)),
    }
