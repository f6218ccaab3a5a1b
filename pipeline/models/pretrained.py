"""`model.pretrained`: start a zoo model from published weights instead of random ones.

Two kinds of weights, by family:

- keras.applications families (DenseNet, MobileNets, EfficientNets, ConvNeXt,
  Inception v3, VGG-16/19) take Keras's own: `imagenet` (downloaded once into
  the Keras cache) or a path to a file of the same format
  (`models.applications.load_application_weights`);
- the hand-written families whose layers mirror torchvision/timm (ResNet,
  ResNeXt, VGG-11/13, AlexNet, GoogLeNet, ShuffleNet v2, ViT) import a PyTorch
  state dict, `.pth`/`.pt` (torch) or `.safetensors` (`models.torch_weights`).

A path may also be an http(s) URL, downloaded once into the weights cache
(`PIPELINE_WEIGHTS_CACHE`, else `~/.cache/pipeline/weights`). Every backbone
weight must come from the file; only the classifier head starts fresh, when the
class count differs (reported, and logged by train). The weights decide how
the model scales its 0..255 input (`input_norm`), so training, evaluation and
the served model all see pixels as the weights were trained on.

`resolve` runs in the train stage before the MLflow run starts: a missing
file, an unreachable URL or uncached `imagenet` weights fail there in one line.
A segmentation model takes the pretrained weights into its encoder: the
encoder's classifier is built and loaded (`load_encoder`), and training copies
it into the model by layer name.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError

NONE = "none"
IMAGENET = "imagenet"
KERAS_SUFFIXES = (".h5", ".hdf5")
CACHE_ENV = "PIPELINE_WEIGHTS_CACHE"


@dataclass(frozen=True)
class Weights:
    """Resolved `model.pretrained`: a local file and what reads it."""

    source: str  # as params.yaml gives it
    kind: str  # "keras" (keras.applications weights) | "torch" (a state dict)
    path: Path  # the local file (Keras's cache for imagenet)
    sha256: str


@dataclass(frozen=True)
class Loaded:
    """What loading copied: layer names, and whether the head starts fresh."""

    copied: list[str]
    fresh_head: bool


def is_url(value: str) -> bool:
    return value.lower().startswith(("http://", "https://"))


def backbone_arch(cfg: ModelConfig) -> str:
    """The architecture the weights are for: the encoder of a segmentation model."""
    return cfg.encoder if cfg.segmentation else cfg.arch


def kind_of(cfg: ModelConfig) -> str:
    """ "keras" or "torch": the weights `cfg.arch`'s family takes. Refused: none exist."""
    from pipeline.models.architectures import get_spec
    from pipeline.models.segmentation import PLAIN

    arch = backbone_arch(cfg)
    if cfg.segmentation and arch == PLAIN:
        raise ConfigError(
            "model.pretrained: the plain U-Net has no pretrained weights; give model.encoder "
            "a zoo CNN (e.g. resnet50) to start its encoder from them"
        )
    if not get_spec(arch).hand_written and arch not in _torch_archs():
        return "keras"
    if arch in _torch_archs():
        return "torch"
    raise ConfigError(
        f"model.pretrained: {arch} has no published weights to import (families that have: "
        f"{', '.join(sorted(_torch_archs()))} from PyTorch; keras.applications ones from Keras)"
    )


def _torch_suffixes() -> tuple[str, ...]:
    from pipeline.models.torch_weights import SAFETENSORS_SUFFIX, TORCH_SUFFIXES

    return (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)


def _torch_archs() -> set[str]:
    from pipeline.models.torch_weights import TORCH_FAMILIES

    return set(TORCH_FAMILIES)


def check_pretrained(cfg: ModelConfig, choices) -> None:
    """Refuse, naming the key, weights `cfg` cannot take, or a setting of it (`choices`:
    its operator choices) they cannot fit. No file is read: `check` runs it."""
    if cfg.pretrained == NONE:
        return
    kind = kind_of(cfg)
    arch = backbone_arch(cfg)
    value = cfg.pretrained
    if value == IMAGENET and kind == "torch":
        raise ConfigError(
            f"model.pretrained imagenet: Keras has no ImageNet weights for {arch} "
            "(hand-written in torchvision's layout): give the path or URL of its "
            "torchvision or timm state dict (.pth or .safetensors)"
        )
    suffix = "" if value == IMAGENET else _suffix(value)
    if suffix == ".keras":
        raise ConfigError(
            f"model.pretrained: {value} is a whole Keras model; start from it with "
            "train.init_from (model.pretrained takes weights files)"
        )
    wanted = _torch_suffixes() if kind == "torch" else KERAS_SUFFIXES
    if value != IMAGENET and suffix not in wanted:
        what = "a PyTorch state dict" if kind == "torch" else "a Keras weights file"
        raise ConfigError(
            f"model.pretrained: {arch} takes {what} ({', '.join(wanted)}), got {value}"
        )
    _check_fits(cfg, kind, arch, choices)


def _check_fits(cfg: ModelConfig, kind: str, arch: str, choices) -> None:
    """Settings of the model the weights cannot fit (width, stem, operators), by loader."""
    from dataclasses import replace

    if kind == "keras":
        from pipeline.models.applications import check_pretrained_width

        check_pretrained_width(arch, cfg.pretrained, cfg.width_multiplier)
        return
    from pipeline.models.torch_weights import check_importable

    check_importable(
        arch,
        choices=replace(choices, head="default") if cfg.segmentation else choices,
        width_multiplier=cfg.width_multiplier,
        small_input=cfg.small_input and not cfg.segmentation,
    )


def _suffix(value: str) -> str:
    name = value.rsplit("/", 1)[-1].split("?", 1)[0].lower()
    if name.endswith(".weights.h5"):
        return ".h5"
    return Path(name).suffix


def input_norm(cfg: ModelConfig) -> str:
    """How the model scales its input: `model.input_norm`, or what the weights ask for."""
    if cfg.input_norm != "auto":
        return cfg.input_norm
    if cfg.pretrained == NONE:
        return "unit"
    from pipeline.models.architectures import get_spec

    kind_of(cfg)  # refuses an architecture without published weights
    # the family's: torchvision's ImageNet mean/std for most PyTorch weights, [-1, 1] for
    # timm's augreg ViTs and torchvision's GoogLeNet, each Keras family's preprocess_input
    return get_spec(backbone_arch(cfg)).pretrained_norm


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pipeline" / "weights")


def resolve(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> Weights | None:
    """The local weights file `cfg.pretrained` names (downloading it once), or None."""
    if cfg.pretrained == NONE:
        return None
    kind = kind_of(cfg)
    if cfg.pretrained == IMAGENET:
        from pipeline.models.applications import imagenet_weights_file

        path = imagenet_weights_file(
            backbone_arch(cfg), image_shape, width_multiplier=cfg.width_multiplier
        )
    elif is_url(cfg.pretrained):
        path = _download(cfg.pretrained)
    else:
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise ConfigError(f"model.pretrained: {path} not found")
    return Weights(cfg.pretrained, kind, path, file_sha256(path))


def _download(url: str) -> Path:
    """`url` in the weights cache, fetched the first time (atomically, as fetch does)."""
    from pipeline.data.archive import download
    from pipeline.errors import DataError

    name = url.rsplit("/", 1)[-1].split("?", 1)[0] or "weights"
    folder = cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = folder / name
    if dest.is_file():
        return dest
    try:
        folder.mkdir(parents=True, exist_ok=True)
        download(url, dest)
    except (DataError, OSError) as exc:
        raise ConfigError(f"model.pretrained: cannot download {url} ({exc})") from None
    return dest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load(model, cfg: ModelConfig, weights: Weights) -> Loaded:
    """Put `weights` into classifier `model` (built from `cfg` with `input_norm(cfg)`)."""
    return _load_classifier(model, cfg.arch, cfg, weights)


def load_encoder(classifier, cfg: ModelConfig, weights: Weights) -> Loaded:
    """Put `weights` into the classifier of segmentation model `cfg`'s encoder
    (`from_config.encoder_classifier`); training then copies its layers into the
    segmentation model by name (`transfer.copy_matching_weights`)."""
    from dataclasses import replace

    return _load_classifier(classifier, cfg.encoder, replace(cfg, small_input=False), weights)


def _load_classifier(model, arch: str, cfg: ModelConfig, weights: Weights) -> Loaded:
    if weights.kind == "torch":
        from pipeline.models.torch_weights import load_state_dict, read_state_dict

        imported = load_state_dict(model, arch, read_state_dict(weights.path))
        return Loaded(list(imported.copied), imported.fresh_head)
    from pipeline.models.applications import load_application_weights

    loaded = load_application_weights(
        model,
        arch,
        str(weights.path),
        width_multiplier=cfg.width_multiplier,
        small_input=cfg.small_input,
    )
    return Loaded(list(loaded.copied), loaded.fresh_head)
