"""Layers of a functional model, by name: which are spatial maps, where the stages end,
and cutting the network at one layer into (image -> map) and (map -> output).

A cut works where everything after the layer depends on it alone: a block's output, the
last spatial map, a plain CNN's any layer. Inside a residual block the skip path passes
it by, and the cut is refused naming the layers that do cut.
"""

from __future__ import annotations

from pipeline.errors import ConfigError

# The model scales its own 0..255 input: maps of these layers are the image itself.
INPUT_LAYERS = ("InputLayer", "Rescaling", "Normalization")


def spatial_layers(model) -> list:
    """Layers whose output is one (batch, height, width, channels) map, in graph order,
    after the input and its scaling."""
    found = []
    for layer in model.layers:
        if type(layer).__name__ in INPUT_LAYERS:
            continue
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is not None and len(shape) == 4:
            found.append(layer)
    return found


def last_spatial_layer(model):
    """The last spatial map (Grad-CAM's default layer); a ConfigError when there is none."""
    layers = spatial_layers(model)
    if not layers:
        raise ConfigError(
            f"--layer: {model.name} has no spatial map (a class-token ViT: use attention)"
        )
    return layers[-1]


def find_layer(model, name: str | None, *, key: str = "--layer", spatial: bool = True):
    """Layer `name` of `model` (default: the last spatial map); a ConfigError naming `key`
    when there is no such layer or, with `spatial`, its output is not a spatial map."""
    if name is None:
        return last_spatial_layer(model)
    try:
        layer = model.get_layer(name)
    except ValueError:
        maps = spatial_layers(model)
        hint = f"spatial layers: {maps[0].name} … {maps[-1].name}" if maps else "no spatial map"
        raise ConfigError(f"{key} {name!r}: {model.name} has no such layer ({hint})") from None
    if spatial and layer not in spatial_layers(model):
        shape = tuple(getattr(layer.output, "shape", ()))
        raise ConfigError(
            f"{key} {name!r}: its output {shape} is not a spatial map (batch, height, width, "
            "channels); pick a convolution, block or pooling layer"
        )
    return layer


def split_at(model, layer):
    """(features: image -> layer's map, head: layer's map -> model output)."""
    import keras

    image = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    features = keras.Model(image, layer.output, name=f"{model.name}_to_{layer.name}")
    try:
        head = keras.Model(layer.output, model.output, name=f"{model.name}_from_{layer.name}")
    except ValueError:
        cuts = [c.name for c in cut_layers(model)[-4:]]
        raise ConfigError(
            f"--layer {layer.name!r}: the output does not depend on it alone (a skip "
            f"connection passes it by); layers that cut the network: {', '.join(cuts)}"
        ) from None
    return features, head


def cut_layers(model) -> list:
    """Spatial layers the network can be cut at (`split_at`), in graph order: those no
    other edge of the graph passes by (no earlier layer feeds a later one)."""
    ops = model.operations  # layers and the keras.ops calls between them
    order = {id(op): i for i, op in enumerate(ops)}
    # reads[i]: the last position that reads the output of the operation at i
    reads = [0] * len(ops)
    for j, layer in enumerate(ops):
        for node in layer._inbound_nodes:
            for parent in node.parent_nodes:
                i = order.get(id(parent.operation))
                if i is not None and i != j:
                    reads[i] = max(reads[i], j)
    spatial = {id(layer) for layer in spatial_layers(model)}
    found, reach = [], 0
    for i, layer in enumerate(ops):
        # reach > i: an edge from before i to after i passes layer i by
        if id(layer) in spatial and reach <= i:
            found.append(layer)
        reach = max(reach, reads[i])
    return found


def stage_ends(model) -> list:
    """The last cuttable layer at each spatial resolution, in order: the ends of the
    network's stages (what a linear probe pools)."""
    ends: dict[tuple, object] = {}
    for layer in cut_layers(model):
        if "Pad" not in type(layer).__name__:  # a strided block's padding starts the next stage
            ends[tuple(layer.output.shape[1:3])] = layer
    return list(ends.values())
