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


SPECS: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    family: str,
    min_size: int = 8,
    hand_written: bool = True,
    imagenet_size: int = 224,
    drop_path: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` buildable as `name`."""

    def decorate(fn: Callable) -> Callable:
        if name in SPECS:
            raise ValueError(f"model {name!r} registered twice")
        SPECS[name] = ModelSpec(name, fn, family, min_size, hand_written, imagenet_size, drop_path)
        return fn

    return decorate
