"""Architecture name -> builder function; the only place names are mapped.

Builders register themselves with `@register_model` (timm's pattern) and share
one signature, so train, bench and the model card can build any of them:

    builder(input_shape, num_classes, *, dropout, width_multiplier, small_input) -> keras.Model
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_BUILDERS: dict[str, Callable] = {}
# Modules whose import registers builders; imported on first lookup so that
# `import pipeline` stays free of keras/tensorflow.
_FAMILY_MODULES = ("pipeline.models.simple", "pipeline.models.resnet")


def register_model(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` buildable as `name`."""

    def decorate(fn: Callable) -> Callable:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} registered twice")
        _BUILDERS[name] = fn
        return fn

    return decorate


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    """Every registered architecture name, sorted."""
    _load_families()
    return sorted(_BUILDERS)


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    dropout: float = 0.0,
    width_multiplier: float = 1.0,
    small_input: bool = True,
):
    """Build architecture `name` for images of `input_shape` (H, W, C) and raw 0..255 pixels."""
    _load_families()
    if name not in _BUILDERS:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](
        input_shape,
        num_classes,
        dropout=dropout,
        width_multiplier=width_multiplier,
        small_input=small_input,
    )
