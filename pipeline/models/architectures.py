"""The architecture registry: name -> builder and facts; the only place names are mapped.

Builders register themselves with `@register_model` (`models.registration`) and share
one signature, so train, bench and the model card can build any of them:

    builder(input_shape, num_classes, *, dropout, width_multiplier, small_input, choices,
            input_norm) -> keras.Model taking raw 0..255 pixels, scaling them as
            `input_norm` says (`blocks.input_scaling`), returning float32 probabilities

Builders registered with `drop_path=True` also take `drop_path` (stochastic depth),
those with `class_token=True` (the ViTs) `class_token`.
"""

from __future__ import annotations

import importlib

from pipeline.errors import ConfigError
from pipeline.models.blocks import DEFAULT_CHOICES, LayerChoices
from pipeline.models.registration import SPECS, ModelSpec

# Modules whose import registers builders; imported on first lookup so that
# `import pipeline` stays free of keras/tensorflow.
_FAMILY_MODULES = (
    "pipeline.models.simple",
    "pipeline.models.classic",
    "pipeline.models.googlenet",
    "pipeline.models.resnet",
    "pipeline.models.shufflenet",
    "pipeline.models.applications",
    "pipeline.models.vit",
)


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    """Every registered architecture name, sorted."""
    _load_families()
    return sorted(SPECS)


def get_spec(name: str) -> ModelSpec:
    _load_families()
    if name not in SPECS:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def check_buildable(
    name: str,
    input_shape: tuple[int, int, int],
    choices: LayerChoices = DEFAULT_CHOICES,
    drop_path: float = 0.0,
    *,
    small_input: bool = True,
) -> None:
    """Raise ConfigError (one line, naming the key) if `name` cannot be built as asked, or
    if an operator choice or drop_path would not change it (refused, not ignored)."""
    spec = get_spec(name)
    side = min(input_shape[0], input_shape[1])
    if side < spec.min_size:
        raise ConfigError(
            f"model.arch {name} needs images of at least {spec.min_size}x{spec.min_size}, "
            f"got {input_shape[0]}x{input_shape[1]} (raise prepare.image_size)"
        )
    message = unused_choice(spec, choices, small_input)
    if message:
        raise ConfigError(message)
    if drop_path and not spec.drop_path:
        with_it = ", ".join(n for n in sorted(SPECS) if SPECS[n].drop_path)
        raise ConfigError(
            f"model.drop_path applies to architectures with residual blocks ({with_it}); "
            f"{name} has none: set it to 0"
        )


def unused_choice(spec: ModelSpec, choices: LayerChoices, small_input: bool) -> str | None:
    """Why a non-default operator choice would build the same `spec.name` (None: it applies).

    Only `groups` against a layer's channel count needs the built graph: `blocks.conv`
    refuses that one when it builds the layer.
    """
    name = spec.name
    changed = [k for k, v in vars(choices).items() if getattr(DEFAULT_CHOICES, k) != v]
    if not changed:
        return None
    if not spec.hand_written:
        return (
            f"model.{changed[0]} applies to hand-written CNN families only; {name} has fixed "
            "operators (keras.applications or ViT): leave it at its default"
        )
    fixed = dict(spec.fixed_choices)
    for key in changed:
        if key in fixed:
            default = getattr(DEFAULT_CHOICES, key)
            return f"model.{key} does not apply to {name} ({fixed[key]}): leave it at {default}"
    if "groups" in changed and choices.conv != "group":
        return (
            f"model.groups applies to model.conv: group only (conv is {choices.conv}): "
            f"leave it at {DEFAULT_CHOICES.groups}"
        )
    if "dilation_rate" in changed and choices.conv != "dilated":
        return (
            f"model.dilation_rate applies to model.conv: dilated only (conv is {choices.conv}): "
            f"leave it at {DEFAULT_CHOICES.dilation_rate}"
        )
    if choices.head == spec.default_head:
        return f"model.head {choices.head} is {name}'s own head: leave it at default"
    if spec.conv_reach == "stem" and choices.conv == "group":
        return (
            f"model.conv group does nothing in {name}: the conv type reaches only its stem, "
            "which reads the image and stays ungrouped: leave it at standard"
        )
    if spec.conv_reach == "stem" and choices.conv == "dilated" and not small_input:
        return (
            f"model.conv dilated does nothing in {name} with model.small_input false: the conv "
            "type reaches only its stem, which is strided (dilation needs stride 1): "
            "leave it at standard or set small_input true"
        )
    if choices.padding == "valid" and not spec.valid_padding:
        with_it = ", ".join(n for n in sorted(SPECS) if SPECS[n].valid_padding)
        return (
            f"model.padding valid cannot build {name}: its residual adds or concatenations "
            f"need maps of one size (valid padding builds {with_it}): leave it at zeros"
        )
    if (
        spec.valid_convs
        and not small_input
        and choices.padding != "zeros"
        and choices.conv != "dilated"
        and choices.downsample != "strided"
    ):
        return (
            f"model.padding {choices.padding} does nothing in {name} with model.small_input "
            "false: its convolutions are unpadded ('valid'): leave it at zeros"
        )
    return None


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    dropout: float = 0.0,
    width_multiplier: float = 1.0,
    small_input: bool = True,
    choices: LayerChoices = DEFAULT_CHOICES,
    drop_path: float = 0.0,
    input_norm: str = "unit",
    class_token: bool = False,
):
    """Build architecture `name` for images of `input_shape` (H, W, C) and raw 0..255 pixels.

    `drop_path`: stochastic depth rate of the deepest residual block (timm's
    drop_path_rate), rising linearly from 0 at the first; families with
    residual blocks only. `input_norm`: how the model scales its 0..255 input
    (`blocks.input_scaling`), as pretrained weights ask. `class_token`: a ViT
    classifies from a learned class token (timm's global_pool="token") instead
    of the average of its tokens.
    """
    check_buildable(name, input_shape, choices, drop_path, small_input=small_input)
    spec = get_spec(name)
    if class_token and not spec.class_token:
        with_it = ", ".join(n for n in sorted(SPECS) if SPECS[n].class_token)
        raise ConfigError(
            f"model.class_token applies to vision transformers ({with_it}); {name} has no "
            "tokens: set it to false"
        )
    extra = {"drop_path": drop_path} if spec.drop_path else {}
    if spec.class_token:
        extra["class_token"] = class_token
    try:
        return spec.builder(
            tuple(input_shape),
            num_classes,
            dropout=dropout,
            width_multiplier=width_multiplier,
            small_input=small_input,
            choices=choices,
            input_norm=input_norm,
            **extra,
        )
    except ValueError as error:  # Keras: a map below a kernel's size
        if choices.padding != "valid" or "negative" not in str(error).lower():
            raise
        raise ConfigError(
            f"model.padding valid: {name}'s unpadded convolutions (each takes k - 1 pixels) "
            f"shrink a {input_shape[0]}x{input_shape[1]} image to nothing: raise "
            "prepare.image_size or leave model.padding at zeros"
        ) from None
