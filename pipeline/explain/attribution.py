"""Which pixels a classifier's decision rests on: Grad-CAM, Grad-CAM++, saliency, SmoothGrad.

The class score differentiated is the pre-softmax logit when the model ends with a softmax
layer that can be peeled off (every zoo classifier: `head_dense` then `probs`), else the
model's output (a probability): a probability saturates near 1, and its gradient with it.
Every map comes back as float32 (N, H, W) at the input's resolution, scaled to [0, 1]
per image (all zeros where nothing is positive).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError
from pipeline.explain import gradients, graph

BATCH = 32
SMOOTHGRAD_SIGMA = 0.15  # SmoothGrad's noise, a fraction of the 0..255 pixel range
PIXEL_RANGE = 255.0


def score_model(model):
    """`model` without a final softmax layer (the logits), or `model` itself."""
    import keras

    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    peelable = (
        type(last).__name__ == "Activation"
        and getattr(activation, "__name__", "") == "softmax"
        and len(model.outputs) == 1
        and model.outputs[0] is last.output
    )
    if not peelable:
        return model
    return keras.Model(model.inputs, last.input, name=f"{model.name}_logits")


def check_classifier(model, key: str = "--method") -> None:
    """A ConfigError unless `model` outputs one score vector per image (a classifier)."""
    shape = tuple(model.outputs[0].shape) if len(model.outputs) == 1 else None
    if shape is None or len(shape) != 2:
        raise ConfigError(
            f"{key}: {model.name} outputs {shape or 'several tensors'}, not one class score "
            "vector per image: class attributions need a classifier (a segmentation model "
            "has a score per pixel)"
        )


def class_indices(model, images: np.ndarray, class_index=None) -> np.ndarray:
    """One class per image: the predicted one (None), `class_index`, or an array of them."""
    n = len(images)
    if class_index is None:
        probs = np.concatenate(
            [gradients.predict(model, images[i : i + BATCH]) for i in range(0, n, BATCH)]
        )
        return probs.argmax(axis=-1)
    index = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n,)).copy()
    classes = int(model.outputs[0].shape[-1])
    if index.min() < 0 or index.max() >= classes:
        raise ConfigError(f"--class: index {index.max()} outside 0..{classes - 1}")
    return index


def _class_score(indices: np.ndarray, classes: int):
    """The score function picking each image's class: a one-hot product, any backend."""
    import keras

    onehot = np.eye(classes, dtype=np.float32)[indices]

    def score(outputs):
        return keras.ops.sum(keras.ops.cast(outputs, "float32") * onehot, axis=-1)

    return score


def _batched_gradient(model, x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    classes = int(model.outputs[0].shape[-1])
    grads = []
    for start in range(0, len(x), BATCH):
        stop = start + BATCH
        score = _class_score(indices[start:stop], classes)
        grads.append(gradients.value_and_gradient(model, x[start:stop], score)[1])
    return np.concatenate(grads)


def gradcam(model, images, *, class_index=None, layer=None, plus=False) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) or, with `plus`, Grad-CAM++ (Chattopadhay et al.
    2018) of each image's class on `layer`'s map (a name; None: the last spatial map).

    Grad-CAM weighs each channel of the map by its spatially averaged gradient and keeps
    the positive part of the weighted sum; Grad-CAM++ weighs the positive gradients per
    position, which separates several instances of a class better. Bilinear upsampling
    to the input size. A layer that a skip connection passes by is refused (ConfigError).
    """
    import keras

    check_classifier(model)
    x = np.asarray(images, dtype=np.float32)
    indices = class_indices(model, x, class_index)
    target = graph.find_layer(model, layer) if isinstance(layer, str | None) else layer
    features, _ = graph.split_at(model, target)  # refuses a layer a skip passes by
    scores = score_model(model)
    _, head = graph.split_at(scores, scores.get_layer(target.name))
    maps = np.concatenate(
        [gradients.predict(features, x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    ).astype(np.float32)
    grads = _batched_gradient(head, maps, indices).astype(np.float64)
    maps64 = maps.astype(np.float64)
    if plus:
        g2, g3 = grads**2, grads**3
        denom = 2 * g2 + np.sum(maps64 * g3, axis=(1, 2), keepdims=True)
        alpha = np.where(denom != 0, g2 / np.where(denom != 0, denom, 1), 0)
        weights = np.sum(alpha * np.maximum(grads, 0), axis=(1, 2))
    else:
        weights = grads.mean(axis=(1, 2))
    cam = np.maximum(np.einsum("nhwk,nk->nhw", maps64, weights), 0).astype(np.float32)
    height, width = x.shape[1:3]
    if cam.shape[1:] != (height, width):
        resized = keras.ops.image.resize(cam[..., None], (height, width), interpolation="bilinear")
        cam = np.maximum(keras.ops.convert_to_numpy(resized)[..., 0], 0)
    return normalise(cam)


def input_gradient(model, images, *, class_index=None) -> np.ndarray:
    """d(class score)/d(input pixels), signed, like `images` (N, H, W, C), on the 0..255
    pixels the model takes."""
    check_classifier(model)
    x = np.asarray(images, dtype=np.float32)
    indices = class_indices(model, x, class_index)
    return _batched_gradient(score_model(model), x, indices)


def saliency(model, images, *, class_index=None, normalised=True) -> np.ndarray:
    """Vanilla gradient saliency (Simonyan et al. 2013): |gradient| at each pixel, the
    largest over colour channels. `normalised` False keeps the raw magnitudes."""
    grads = input_gradient(model, images, class_index=class_index)
    found = np.abs(grads).max(axis=-1).astype(np.float32)
    return normalise(found) if normalised else found


def smoothgrad(
    model,
    images,
    *,
    class_index=None,
    samples: int = 16,
    sigma: float = SMOOTHGRAD_SIGMA,
    seed: int = 0,
    normalised=True,
) -> np.ndarray:
    """SmoothGrad (Smilkov et al. 2017): the gradient averaged over `samples` noisy
    copies of each image (Gaussian noise, sigma a fraction of the 0..255 range), then
    |.| max over channels as `saliency`. The noise averages away the gradient's
    pixel-to-pixel jitter; the class stays the clean image's (predicted or given)."""
    check_classifier(model)
    x = np.asarray(images, dtype=np.float32)
    indices = class_indices(model, x, class_index)
    rng = np.random.default_rng(seed)
    scores = score_model(model)
    mean = np.empty_like(x, dtype=np.float64)
    group = max(1, BATCH // samples)  # images whose noisy copies share gradient batches
    for start in range(0, len(x), group):
        stop = min(start + group, len(x))
        chunk = x[None, start:stop]
        noise = rng.normal(0, sigma * PIXEL_RANGE, size=(samples, *chunk.shape[1:]))
        noisy = (chunk + noise.astype(np.float32)).reshape(-1, *x.shape[1:])
        grads = _batched_gradient(scores, noisy, np.tile(indices[start:stop], samples))
        mean[start:stop] = grads.reshape(samples, stop - start, *x.shape[1:]).mean(axis=0)
    found = np.abs(mean).max(axis=-1).astype(np.float32)
    return normalise(found) if normalised else found


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum (maps are >= 0): [0, 1]; an all-zero map stays."""
    maps = np.asarray(maps, dtype=np.float32)
    peak = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, *([1] * (maps.ndim - 1)))
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1), 0).astype(np.float32)


def peak(maps: np.ndarray) -> np.ndarray:
    """(row, column) of each map's maximum, (N, 2): where a pointing game points."""
    maps = np.asarray(maps)
    flat = maps.reshape(len(maps), -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, maps.shape[1:]), axis=1)
