"""Transfer learning: initialize from another model, freeze, unfreeze on a schedule.

The configured architecture is built fresh for this data, then takes every
weight of the source model whose layer name and shapes match: the zoo names
its layers, so a ResNet-18 trained on one data set initializes a ResNet-18 on
another, and a head of another class count (`head_dense`) starts from scratch.
The head is every layer named `head_*` (and `probs`), and for segmentation
models the whole decoder; the backbone is the rest (the encoder). So a
segmentation model starts from a classifier of its encoder's architecture, and
`frozen` trains its decoder alone.

Progressive unfreezing (ULMFiT's gradual unfreezing): the backbone's weight
layers, in graph order, are cut into `unfreeze_groups` groups; training starts
with the head alone and unfreezes one more group, from the top, every
`unfreeze_every` epochs. Each change of trainable layers is a new phase: Keras
compiles a train step for a fixed set of trainable variables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.models.saved import set_layer_weights
from pipeline.models.segmentation import DECODER_PREFIXES

HEAD_PREFIXES = ("head_", *DECODER_PREFIXES)
OUTPUT_LAYER = "probs"


def is_mlflow_uri(init_from: str) -> bool:
    return init_from.startswith(("models:/", "runs:/"))


def check_init_from(init_from: str) -> None:
    """Refuse a local `train.init_from` that does not exist (cheap: before any run starts)."""
    if init_from and not is_mlflow_uri(init_from) and not Path(init_from).is_file():
        raise ConfigError(f"train.init_from: {init_from} not found (a .keras file or models:/ URI)")


def load_source(init_from: str):
    """The Keras model `train.init_from` names: an MLflow model URI or a .keras file."""
    if is_mlflow_uri(init_from):
        from pipeline.tracking import logged_models

        return logged_models.load_keras_model(init_from)
    from pipeline.errors import DataError
    from pipeline.models.saved import load_keras_file

    check_init_from(init_from)
    path = Path(init_from)
    try:
        return load_keras_file(path)
    except DataError as exc:
        raise ConfigError(f"train.init_from: {exc}") from None
    except Exception as exc:  # Keras raises many types for a bad file
        raise ConfigError(f"train.init_from: {path} is not a Keras model ({exc})") from None


def is_head(layer) -> bool:
    return layer.name.startswith(HEAD_PREFIXES) or layer.name == OUTPUT_LAYER


def backbone_layers(model) -> list:
    """Layers with weights that are not the head, in graph order."""
    return [layer for layer in model.layers if layer.weights and not is_head(layer)]


@dataclass(frozen=True)
class Transferred:
    copied: list[str]
    skipped: list[str]  # in the target, but absent from the source or of other shapes


def copy_matching_weights(source, target) -> Transferred:
    """Copy every layer's weights from `source` to the same-named layer of `target`
    when all their shapes match."""
    by_name = {layer.name: layer for layer in source.layers if layer.weights}
    copied, skipped = [], []
    for layer in target.layers:
        if not layer.weights:
            continue
        match = by_name.get(layer.name)
        if match is None or [w.shape for w in match.weights] != [w.shape for w in layer.weights]:
            skipped.append(layer.name)
            continue
        set_layer_weights(layer, match.get_weights())
        copied.append(layer.name)
    if not any(name in copied for name in (la.name for la in backbone_layers(target))):
        raise ConfigError(
            "train.init_from: no backbone layer of the source model matches model.arch "
            "(same architecture and input channels needed)"
        )
    return Transferred(copied, skipped)


@dataclass(frozen=True)
class Phase:
    """Epochs [start, end) trained with the top `unfrozen` backbone groups trainable."""

    start: int
    end: int
    unfrozen: int


def phases(cfg: TrainConfig) -> list[Phase]:
    """The training phases `cfg.finetune` asks for (one phase unless progressive)."""
    if cfg.finetune == "full":
        return [Phase(0, cfg.epochs, cfg.unfreeze_groups)]
    if cfg.finetune == "frozen":
        return [Phase(0, cfg.epochs, 0)]
    result, start = [], 0
    for unfrozen in range(cfg.unfreeze_groups + 1):
        end = cfg.epochs if unfrozen == cfg.unfreeze_groups else start + cfg.unfreeze_every
        end = min(end, cfg.epochs)
        if end > start:
            result.append(Phase(start, end, unfrozen))
        start = end
    return result


def set_trainable(model, unfrozen: int, groups: int) -> list[str]:
    """Freeze the backbone except its top `unfrozen` of `groups` groups; return frozen names.

    Frozen BatchNorm layers also run in inference mode (Keras's rule for
    `trainable = False`), as fine-tuning recipes want.
    """
    backbone = backbone_layers(model)
    size = -(-len(backbone) // groups) if backbone else 0
    frozen_count = max(0, len(backbone) - unfrozen * size)
    for i, layer in enumerate(backbone):
        layer.trainable = i >= frozen_count
    for layer in model.layers:
        if is_head(layer):
            layer.trainable = True
    return [layer.name for layer in backbone[:frozen_count]]


def backbone_variable_paths(model) -> set[str]:
    """Paths of the backbone's variables: the ones a backbone learning-rate scale applies to."""
    return {v.path for layer in backbone_layers(model) for v in layer.trainable_weights}
