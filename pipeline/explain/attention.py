"""Where a vision transformer looks: attention rollout (Abnar & Zuidema, 2020).

Each block's attention (its heads averaged) is mixed half and half with the identity,
for the residual path around it, rows renormalised, and the blocks' matrices multiplied
in order: how much each output token draws on each input patch. A class-token ViT
(`model.class_token`) classifies from the token, so its row is the map; the default ViT
averages its tokens, so the map is the rows' average. Class-agnostic, unlike Grad-CAM.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError
from pipeline.explain import gradients

BATCH = 32


def attention_layers(model) -> list:
    """The ViT blocks' self-attention layers (pipeline/models/vit.py: `*_attn`), in order;
    a ConfigError for a model without them."""
    found = [
        layer
        for layer in model.layers
        if type(layer).__name__ == "MultiHeadAttention" and layer.name.endswith("_attn")
    ]
    if not found:
        raise ConfigError(
            f"--method attention: {model.name} has no self-attention layers (a vision "
            "transformer's *_attn, model.arch vit_*): use gradcam for a CNN"
        )
    return found


def has_class_token(model) -> bool:
    return any(type(layer).__name__ == "ClassToken" for layer in model.layers)


def token_grid(model) -> tuple[int, int]:
    """The patch grid (rows, columns): the patch embedding's output map."""
    from pipeline.explain.graph import spatial_layers

    maps = spatial_layers(model)
    if not maps:
        raise ConfigError(f"--method attention: {model.name} has no patch grid")
    return tuple(int(d) for d in maps[0].output.shape[1:3])


def attention_weights(model, images) -> list[np.ndarray]:
    """Per block, the heads' attention (N, heads, tokens, tokens) for `images`."""
    import keras

    layers = attention_layers(model)
    queries = [layer.input[0] if isinstance(layer.input, list) else layer.input for layer in layers]
    inputs = keras.Model(model.inputs[0], queries, name=f"{model.name}_attention_inputs")
    x = np.asarray(images, np.float32)
    found = [[] for _ in layers]
    for start in range(0, len(x), BATCH):
        tokens = gradients.predict(inputs, x[start : start + BATCH])
        tokens = tokens if isinstance(tokens, list) else [tokens]
        for block, (layer, query) in enumerate(zip(layers, tokens, strict=True)):
            _, scores = layer(query, query, return_attention_scores=True, training=False)
            found[block].append(keras.ops.convert_to_numpy(scores))
    return [np.concatenate(chunks) for chunks in found]


def token_relevance(model, images, *, residual: float = 0.5) -> np.ndarray:
    """Attention rollout over the patch grid (N, rows, columns): how much the pooled
    output draws on each patch through the blocks' attention and residual paths."""
    weights = attention_weights(model, images)
    tokens = weights[0].shape[-1]
    joint = np.broadcast_to(np.eye(tokens), (len(weights[0]), tokens, tokens))
    for block in weights:
        mixed = residual * np.eye(tokens) + (1 - residual) * block.mean(axis=1)
        mixed = mixed / mixed.sum(axis=-1, keepdims=True)
        joint = mixed @ joint
    rows, cols = token_grid(model)
    # a class token's row, over the patches; else the average row (the tokens' pooling)
    relevance = joint[:, 0, 1:] if has_class_token(model) else joint.mean(axis=1)
    return relevance.reshape(len(relevance), rows, cols).astype(np.float32)


def rollout(model, images, *, residual: float = 0.5) -> np.ndarray:
    """Attention rollout maps (N, H, W) at the input's resolution (bilinear), each scaled
    from its minimum (0) to its maximum (1)."""
    import keras

    grid = token_relevance(model, images, residual=residual)
    height, width = (int(d) for d in model.inputs[0].shape[1:3])
    resized = keras.ops.image.resize(grid[..., None], (height, width), interpolation="bilinear")
    maps = keras.ops.convert_to_numpy(resized)[..., 0]
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    # min to max: every patch draws on some attention, a map over the floor shows nothing
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0).astype(np.float32)
