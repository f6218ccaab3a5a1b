"""Dead ReLU units and the effective receptive field, and their figures (evaluate's).

A ReLU channel that never fires (> 0) on any position of any test image passes no
gradient either: it is dead weight (the dying-ReLU symptom). The effective receptive
field is where the input actually moves the centre unit of the last spatial map (the
gradient, averaged over images): usually far smaller than the theoretical field of the
model card, which counts every pixel any path could reach.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.explain import graph
from pipeline.explain.gradients import value_and_gradient

# The effective receptive field's size: the side of the smallest square, centred on the
# gradient's centre of mass, holding this fraction of the |gradient| mass.
ERF_MASS = 0.95


def relu_layers(model) -> list:
    """Layers whose output is a ReLU's (Activation("relu"), ReLU, relu6, or a layer with a
    relu activation), in graph order; LeakyReLU, ELU, GELU never output exactly zero
    everywhere and are not counted."""
    import keras

    relus = {keras.activations.relu, keras.activations.relu6}
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.ReLU):
            if not layer.negative_slope and not layer.threshold:
                found.append(layer)
        elif getattr(layer, "activation", None) in relus:
            found.append(layer)
    return found


def dead_units(model, images: np.ndarray, batch_size: int) -> list[dict]:
    """One row per ReLU layer: {layer, channels, dead, fraction}, where `dead` counts the
    channels that output 0 at every position of every image; one forward pass, batch by
    batch, through one model returning every ReLU output."""
    import keras

    layers = relu_layers(model)
    if not layers:
        return []
    image = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    probe = keras.Model(image, [layer.output for layer in layers], name="relu_outputs")
    fired = [np.zeros(layer.output.shape[-1], dtype=bool) for layer in layers]
    size = min(batch_size, len(images))
    for start in range(0, len(images), size):
        batch = np.asarray(images[start : start + size], dtype="float32")
        n = len(batch)
        # compiled (predict_on_batch): eager JAX compiles op by op, 5x slower; the last
        # batch padded with its own images, so one shape compiles once
        outputs = probe.predict_on_batch(np.resize(batch, (size, *batch.shape[1:])))
        if len(layers) == 1:
            outputs = [outputs]
        for seen, out in zip(fired, outputs, strict=True):
            seen |= (np.asarray(out[:n]) > 0).reshape(-1, out.shape[-1]).any(axis=0)
    return [
        {
            "layer": layer.name,
            "channels": len(seen),
            "dead": int((~seen).sum()),
            "fraction": float((~seen).mean()),
        }
        for layer, seen in zip(layers, fired, strict=True)
    ]


def dead_fraction(rows: list[dict]) -> float:
    """Dead channels over all ReLU channels of the network."""
    return sum(r["dead"] for r in rows) / max(1, sum(r["channels"] for r in rows))


def erf_layer(model):
    """The last spatial map that is not a softmax over channels (a segmentation model's
    output: its channels sum to 1, so their summed gradient is 0); None if there is none."""
    for layer in reversed(graph.spatial_layers(model)):
        if getattr(getattr(layer, "activation", None), "__name__", "") != "softmax":
            return layer
    return None


def effective_receptive_field(model, images: np.ndarray, layer=None) -> dict:
    """|d (centre unit of `layer`'s map, summed over channels) / d input|, averaged over
    images and input channels: {"map": (H, W) float32 scaled to max 1, "layer", "erf_px"
    (side of the centred square holding ERF_MASS of the mass), "support_px" (side of the
    bounding box of the nonzero gradient)}. `layer`: a name or None = `erf_layer`.
    """
    import keras

    target = graph.find_layer(model, layer, key="layer") if layer else erf_layer(model)
    if target is None:
        target = graph.last_spatial_layer(model)  # raises, naming what the model lacks
    # any layer: the input gradient needs no cut, so a layer inside a residual block works
    image = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    features = keras.Model(image, target.output, name=f"{model.name}_to_{target.name}")
    height, width = target.output.shape[1:3]
    cy, cx = height // 2, width // 2  # the lower-right of the four centre units when even

    def centre(maps):
        return keras.ops.sum(maps[:, cy, cx, :], axis=-1)

    _, grads = value_and_gradient(features, np.asarray(images, dtype="float32"), centre)
    erf = np.abs(grads).mean(axis=(0, 3))
    total = erf.sum()
    rows, cols = np.nonzero(erf > 0)
    if total == 0 or not len(rows):
        return {"map": erf.astype("float32"), "layer": target.name, "erf_px": 0, "support_px": 0}
    support = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    yy, xx = np.indices(erf.shape)
    my, mx = round(float((erf * yy).sum() / total)), round(float((erf * xx).sum() / total))
    side = 0
    for half in range(max(erf.shape)):
        box = erf[max(0, my - half) : my + half + 1, max(0, mx - half) : mx + half + 1]
        side = 2 * half + 1
        if box.sum() >= ERF_MASS * total:
            break
    return {
        "map": (erf / erf.max()).astype("float32"),
        "layer": target.name,
        "erf_px": int(min(side, max(erf.shape))),
        "support_px": int(support),
    }


def dead_units_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    """The dead-unit table: layer, channels, dead, fraction."""
    from pipeline.atomic import write_text

    lines = ["layer,channels,dead,fraction\n"]
    lines += [f"{r['layer']},{r['channels']},{r['dead']},{r['fraction']:.6f}\n" for r in rows]
    path = Path(path)
    write_text(path, "".join(lines))
    return path


def dead_units_png(rows: list[dict], path: str | os.PathLike) -> Path:
    """Bar chart of the dead fraction per ReLU layer, in graph order."""
    from pipeline.scoring.plots import new_figure, save_figure

    fig = new_figure(min(max(4.0, 0.35 * len(rows) + 2.0), 16.0), 3.5)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(rows)), [r["fraction"] for r in rows], color="tab:red")
    ax.bar_label(bars, [f"{r['dead']}/{r['channels']}" for r in rows], fontsize=6)
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=75, fontsize=6)
    ax.set_ylim(0, min(1.0, max(0.1, 1.2 * max(r["fraction"] for r in rows))))
    ax.set_ylabel("dead fraction of channels")
    ax.set_title(f"ReLU channels that never fire on the test split: {dead_fraction(rows):.1%}")
    fig.tight_layout()
    return save_figure(fig, path)


def erf_png(erf: dict, theoretical: int | None, path: str | os.PathLike) -> Path:
    """The effective receptive field as a heatmap, its sizes and the theoretical one."""
    from pipeline.scoring.plots import new_figure, save_figure

    fig = new_figure(4.0, 4.2)
    ax = fig.add_subplot()
    shown = ax.imshow(erf["map"], cmap="inferno", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046)
    ax.set_title(
        f"ERF of {erf['layer']}'s centre unit\n{ERF_MASS:.0%} mass {erf['erf_px']} px, "
        f"support {erf['support_px']} px, theoretical {theoretical} px",
        fontsize=8,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)
