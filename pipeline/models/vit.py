"""Vision Transformers (Dosovitskiy et al., 2020) at DeiT sizes (Touvron et al., 2021).

Patch embedding by a Conv2D with kernel = stride = patch (16 at ImageNet, 4
with `small_input`: 64 tokens at 32x32), learnable position embeddings, `depth`
pre-norm transformer blocks (LayerNorm, multi-head self-attention, residual;
LayerNorm, GELU MLP, residual), a final LayerNorm, then the tokens are laid
back on their grid and average-pooled (no class token: the GAP variant of
Beyer et al., 2022, "Better plain ViT baselines"; `head_pool` sees the token
grid like every CNN's final map), dropout (our `dropout`) and the dense layer.

`class_token=True` builds the original ViT/DeiT head instead (timm's
global_pool="token", what its published weights use): a learned token
(`layers.ClassToken`) is prepended before the position embedding (positions
over tokens + 1), and the head reads that token after the final LayerNorm
(`head_pool` crops it out of the sequence).

At 224x224 and 1000 classes vit_tiny has DeiT-Tiny's 5,717,416 parameters with
the class token; without it, less the token and its position embedding
(2 x 192): 5,717,032.

`width_multiplier` scales the per-head dimension (64, rounded to a multiple of
8) with the head count fixed, so the width stays divisible by the heads. The
seeds' operator choices (LayerChoices) do not apply: the registry refuses them
(hand_written=False). Image sides must be multiples of the patch size.

keras is imported inside functions so that the registry imports without
TensorFlow; the custom `PositionEmbedding` layer lives in pipeline.models.layers.
"""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.models.blocks import (
    DEFAULT_CHOICES,
    drop_branch,
    probabilities,
    scaled_width,
    stochastic_depth_rates,
)
from pipeline.models.registration import register_model

HEAD_DIM = 64
MLP_RATIO = 4
LN_EPSILON = 1e-6  # ViT's and timm's LayerNorm epsilon
# timm's default vit_*_patch16_224 weights (augreg) take [-1, 1] pixels (mean = std = 0.5)
TIMM_NORM = "symmetric"


def patch_embedding(x, dim: int, patch: int, *, class_token: bool = False):
    """Non-overlapping patch x patch patches -> (batch, tokens, dim) with positions
    (the class token first, when there is one)."""
    from keras import layers

    from pipeline.models.layers import ClassToken, PositionEmbedding

    x = layers.Conv2D(dim, patch, strides=patch, name="stem_patch_conv")(x)
    x = layers.Reshape((x.shape[1] * x.shape[2], dim), name="stem_tokens")(x)
    if class_token:
        x = ClassToken(name="stem_class_token")(x)
    return PositionEmbedding(name="stem_position")(x)


def transformer_block(x, *, heads: int, mlp_dim: int, name: str, drop_rate: float = 0.0):
    """Pre-norm block: x + MHSA(LN(x)), then x + MLP(LN(x)) with a GELU MLP.

    `drop_rate`: stochastic depth of both residual branches.
    """
    from keras import layers

    dim = x.shape[-1]
    y = layers.LayerNormalization(epsilon=LN_EPSILON, name=f"{name}_norm1")(x)
    y = layers.MultiHeadAttention(heads, key_dim=dim // heads, name=f"{name}_attn")(y, y)
    x = layers.Add(name=f"{name}_add1")([x, drop_branch(y, drop_rate, f"{name}_drop_path1")])
    y = layers.LayerNormalization(epsilon=LN_EPSILON, name=f"{name}_norm2")(x)
    y = layers.Dense(mlp_dim, name=f"{name}_mlp_fc1")(y)
    y = layers.Activation("gelu", name=f"{name}_mlp_gelu")(y)
    y = layers.Dense(dim, name=f"{name}_mlp_fc2")(y)
    return layers.Add(name=f"{name}_add2")([x, drop_branch(y, drop_rate, f"{name}_drop_path2")])


def token_head(
    x, grid: tuple[int, int], num_classes: int, *, dropout: float, class_token: bool = False
):
    """Final LayerNorm, then the class token or the tokens' average over their grid,
    dropout, dense."""
    from keras import layers

    x = layers.LayerNormalization(epsilon=LN_EPSILON, name="head_norm")(x)
    if class_token:
        x = layers.Cropping1D((0, grid[0] * grid[1]), name="head_pool")(x)
        x = layers.Flatten(name="head_token")(x)
    else:
        x = layers.Reshape((*grid, x.shape[-1]), name="head_grid")(x)
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return probabilities(x, num_classes)


def vision_transformer(
    input_shape,
    num_classes,
    *,
    heads: int,
    depth: int,
    dropout: float,
    width_multiplier: float,
    small_input: bool,
    name: str,
    drop_path: float = 0.0,
    input_norm: str = "unit",
    class_token: bool = False,
):
    import keras

    from pipeline.models.blocks import image_input

    patch = 4 if small_input else 16
    height, width = input_shape[:2]
    if height % patch or width % patch:
        raise ConfigError(
            f"model.arch {name} cuts images into {patch}x{patch} patches "
            f"(model.small_input={str(small_input).lower()}): {height}x{width} is not a "
            f"multiple of {patch} (change prepare.image_size)"
        )
    dim = heads * scaled_width(HEAD_DIM, width_multiplier)
    inputs, x = image_input(input_shape, input_norm)
    x = patch_embedding(x, dim, patch, class_token=class_token)
    for block, rate in enumerate(stochastic_depth_rates(drop_path, depth), start=1):
        x = transformer_block(
            x, heads=heads, mlp_dim=MLP_RATIO * dim, name=f"block{block}", drop_rate=rate
        )
    grid = (height // patch, width // patch)
    outputs = token_head(x, grid, num_classes, dropout=dropout, class_token=class_token)
    return keras.Model(inputs, outputs, name=name)


@register_model(
    "vit_tiny",
    family="vit",
    min_size=4,
    hand_written=False,
    drop_path=True,
    class_token=True,
    pretrained_norm=TIMM_NORM,
)
def vit_tiny(input_shape, num_classes, choices=DEFAULT_CHOICES, **options):
    """DeiT-Tiny: width 192 (3 heads of 64), depth 12, MLP 768."""
    return vision_transformer(
        input_shape, num_classes, heads=3, depth=12, name="vit_tiny", **options
    )


@register_model(
    "vit_small",
    family="vit",
    min_size=4,
    hand_written=False,
    drop_path=True,
    class_token=True,
    pretrained_norm=TIMM_NORM,
)
def vit_small(input_shape, num_classes, choices=DEFAULT_CHOICES, **options):
    """DeiT-Small: width 384 (6 heads of 64), depth 12, MLP 1536."""
    return vision_transformer(
        input_shape, num_classes, heads=6, depth=12, name="vit_small", **options
    )
