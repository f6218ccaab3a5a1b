"""Input gradients on any Keras backend: the one module here that knows the backends.

Every method of `pipeline.explain` reduces to "the gradient of a per-image score with
respect to a model's input": Grad-CAM cuts the network at a layer (`graph.split_at`) and
asks for the gradient at the head's input. TensorFlow records a `GradientTape`; JAX
differentiates `stateless_call` with `jax.value_and_grad`; torch uses autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Score = Callable[[object], object]  # model outputs -> per-image scores (batch,), keras.ops


def value_and_gradient(model, x: np.ndarray, score: Score) -> tuple[np.ndarray, np.ndarray]:
    """(score per image, d score / d x per image) for a batch `x` of `model`'s input.

    The model runs in inference mode (batch norm statistics, no dropout); images do not
    interact, so the gradient of the batch's summed score is each image's own gradient.
    """
    import keras

    x = np.asarray(x, dtype="float32")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow(model, x, score)
    if backend == "jax":
        return _jax(model, x, score)
    if backend == "torch":
        return _torch(model, x, score)
    raise NotImplementedError(f"explain: no gradients on the {backend} backend")


def predict(model, x: np.ndarray):
    """The model's outputs for `x` (inference mode), as numpy (a list for several)."""
    import keras

    out = model(np.asarray(x, dtype="float32"), training=False)
    if isinstance(out, list | tuple):
        return [keras.ops.convert_to_numpy(o) for o in out]
    return keras.ops.convert_to_numpy(out)


def _tensorflow(model, x, score):
    import tensorflow as tf

    tensor = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        values = score(model(tensor, training=False))
        total = tf.reduce_sum(values)
    grads = tape.gradient(total, tensor)
    return values.numpy(), grads.numpy()


def _jax(model, x, score):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def total(inputs):
        outputs, _ = model.stateless_call(trainable, frozen, inputs, training=False)
        values = score(outputs)
        return jnp.sum(values), values

    (_, values), grads = jax.value_and_grad(total, has_aux=True)(jnp.asarray(x))
    return np.asarray(values), np.asarray(grads)


def _torch(model, x, score):
    import torch

    tensor = torch.tensor(x, requires_grad=True)
    values = score(model(tensor, training=False))
    values.sum().backward()
    return values.detach().cpu().numpy(), tensor.grad.detach().cpu().numpy()
