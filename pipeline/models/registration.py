"""`@register_model`: how a family module adds its builders to the architecture registry
(timm's pattern). Only the table lives here; lookups are `pipeline.models.architectures`,
which imports every family module, so a family never imports the lookups back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about an architecture before building it."""

    name: str
    builder: Callable
    family: str
    # smallest input side the architecture accepts
    min_size: int = 8
    # the seeds' operator choices (LayerChoices) apply: hand-written families only
    hand_written: bool = True
    # the input side of its published (ImageNet) configuration, for the model card
    imagenet_size: int = 224
    # residual blocks that take stochastic depth (the builder has a `drop_path` argument)
    drop_path: bool = False
    # What a hand-written builder leaves out of the operator choices, so that the registry
    # refuses the settings it would ignore (`architectures.unused_setting`):
    # (LayerChoices field, why the builder ignores it)
    fixed_choices: tuple[tuple[str, str], ...] = ()
    # what model.head "default" builds: "gap" (global average pool) or "classic" (dense stack)
    default_head: str = "gap"
    # the conv type reaches "all" k>1 convolutions or only the "stem" (ResNeXt, ShuffleNet)
    conv_reach: str = "all"
    # model.small_input changes the layout (Inception v3 keeps its stem either way)
    small_input: bool = True
    # without small_input every conv is unpadded ('valid', LeNet): model.padding reaches
    # only a dilated conv's or a strided downsampling's padding
    valid_convs: bool = False
    # model.padding valid (every convolution unpadded, maps shrinking by k - 1) builds: no
    # residual add or concatenation needs two maps of one size
    valid_padding: bool = False
    # the builder takes `class_token` (a ViT classifying from a class token)
    class_token: bool = False
    # how the family's published weights want pixels scaled (`blocks.input_scaling`):
    # model.input_norm auto with model.pretrained picks it
    pretrained_norm: str = "imagenet"


SPECS: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    family: str,
    min_size: int = 8,
    hand_written: bool = True,
    imagenet_size: int = 224,
    drop_path: bool = False,
    **facts,
) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` buildable as `name`; `facts`: ModelSpec's other fields."""

    def decorate(fn: Callable) -> Callable:
        if name in SPECS:
            raise ValueError(f"model {name!r} registered twice")
        SPECS[name] = ModelSpec(
            name, fn, family, min_size, hand_written, imagenet_size, drop_path, **facts
        )
        return fn

    return decorate
