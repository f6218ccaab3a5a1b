"""params.yaml -> typed, validated config objects.

Each stage loads only the sections it reads (DVC's params dependencies list
exactly those keys). Validation happens here, once: an unknown key, a wrong
type or an out-of-range value raises ConfigError naming the key and what is
allowed, before any stage writes anything. Whether a model setting fits the
chosen architecture is the architecture registry's knowledge:
`pipeline.models.from_config.check_model` (called by `check` and `train`).
This module imports no other part of the package but `errors`, so every stage
can depend on it without depending on the model zoo.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
# fetch.url of the built-in sources: the code that makes their images. dvc.yaml's fetch
# stage depends on `${fetch.url}`, so DVC reruns fetch when an archive changes in place.
BUILTIN_URL = "pipeline/data/sources.py"
# The top-level `task` param: what train and evaluate do with the prepared data.
TASKS = ("classification", "segmentation")
# `model.arch` of task: segmentation (pipeline.models.segmentation builds them)
SEGMENTATION_ARCHS = ("unet", "deeplabv3plus")
# Upper bounds shared by several keys (docs/params.md lists every range). Seeds reach
# numpy and scikit-learn, which take 0..2**32-1; the others are far past any real run.
SEED_MAX = 2**32 - 1
EPOCHS_MAX = 10_000
BATCH_MAX = 65_536


def _range(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> dict[str, float]:
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    return {"bounds": {k: v for k, v in bounds.items() if v is not None}}


def _num(default: Any, **bounds: float) -> Any:
    return field(default=default, metadata=_range(**bounds))


def check_path(key: str, value: str) -> None:
    """A local path the OS can take: no name over 255 bytes, at most 4095 in all (longer
    ones fail every file call with ENAMETOOLONG)."""
    longest = max(len(part.encode()) for part in value.split("/"))
    if longest > 255 or len(value.encode()) > 4095:
        raise ConfigError(
            f"{key} is not a path this system takes: a name of {longest} bytes "
            "(at most 255, and 4095 in all)"
        )


@dataclass(frozen=True)
class FetchConfig:
    """Where raw images come from."""

    source: Literal["digits", "digit_scenes", "archive"] = "digits"
    # archive: a local path or an http(s):// URL of a .tar.gz/.tgz/.tar/.zip; the built-in
    # sources: BUILTIN_URL. What dvc.yaml's fetch stage watches.
    url: str = BUILTIN_URL
    # Archives only: a hex sha256 the archive must match, the download timeout, and for
    # segmentation archives the mask value of void (unlabelled) pixels, e.g. 11 for CamVid
    sha256: str = ""
    timeout_s: float = _num(60.0, gt=0, le=86400)  # sockets overflow past ~1e9 s
    ignore_index: int = _num(255, ge=0, le=255)

    def __post_init__(self) -> None:
        if self.source == "archive":
            if self.url in ("", BUILTIN_URL):
                raise ConfigError(
                    "fetch.url is required when fetch.source is 'archive' "
                    "(a path or http(s) URL of a .tar.gz or .zip)"
                )
            if self.url.lower().startswith("file:"):
                raise ConfigError(
                    f"fetch.url {self.url!r}: give the archive's path, not a file: URL "
                    "(dvc.yaml depends on fetch.url; DVC reads paths and http(s) URLs)"
                )
            if not self.url.lower().startswith(("http://", "https://")):
                check_path("fetch.url", self.url)
        else:
            if self.url != BUILTIN_URL:
                raise ConfigError(
                    f"fetch.url applies to fetch.source: archive; for {self.source} leave it "
                    f"at {BUILTIN_URL} (the code dvc.yaml watches for built-in sources)"
                )
            defaults = FetchConfig.__dataclass_fields__
            for key in ("sha256", "timeout_s", "ignore_index"):
                if getattr(self, key) != defaults[key].default:
                    raise ConfigError(
                        f"fetch.{key} applies to fetch.source: archive; {self.source} is "
                        "built in: leave it at its default"
                    )
        digest = self.sha256.lower()
        if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise ConfigError(f"fetch.sha256 must be 64 hex digits, got {self.sha256!r}")


@dataclass(frozen=True)
class PrepareConfig:
    """Decode, resize and split the raw images."""

    # a side (square) or [height, width], e.g. [192, 256] for CamVid's 360x480 at 4:3
    image_size: int | tuple[int, ...] = _num(16, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    val_fraction: float = _num(0.15, ge=0, lt=1)
    test_fraction: float = _num(0.15, gt=0, lt=1)
    seed: int = _num(42, ge=0, le=SEED_MAX)
    # an image (or mask) that does not decode, truncated included: fail naming it, or skip
    # it (left out before the split; counted and named in the data card)
    on_corrupt: Literal["fail", "skip"] = "fail"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, tuple) and len(self.image_size) != 2:
            raise ConfigError(
                f"prepare.image_size must be a side or [height, width], got {list(self.image_size)}"
            )
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                "prepare.val_fraction + prepare.test_fraction must be < 1, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )

    @property
    def height_width(self) -> tuple[int, int]:
        """(height, width) of every prepared image."""
        size = self.image_size
        return (size[0], size[1]) if isinstance(size, tuple) else (size, size)


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture to build, and its generic options."""

    arch: str = "simple_cnn"
    dropout: float = _num(0.2, ge=0, lt=1)
    width_multiplier: float = _num(1.0, gt=0, le=8)
    # no early downsampling: for 32x32 and smaller inputs
    small_input: bool = True
    # Operator choices (pipeline.models.blocks.LayerChoices); which architectures take
    # which is pipeline.models.from_config's to say.
    conv: Literal["standard", "separable", "group", "dilated", "spatial_separable"] = "standard"
    groups: int = _num(4, ge=1, le=512)
    # layer: the seeds' (each sample's features); layer_channels: ConvNeXt's (each pixel's)
    norm: Literal["batch", "group", "layer", "layer_channels", "none"] = "batch"
    activation: Literal["relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh"] = "relu"
    # valid: no padding, each convolution shrinks the map by k - 1 (plain CNNs only)
    padding: Literal["zeros", "reflect", "replicate", "circular", "valid"] = "zeros"
    downsample: Literal["max", "avg", "strided", "max_avg"] = "max"
    head: Literal["default", "gap", "flatten", "max_avg"] = "default"
    # the kernel of every 3x3 convolution (odd: the map keeps its size)
    kernel_size: int = _num(3, ge=3, le=15)
    # the dilation of conv: dilated (stride-1 convolutions)
    dilation_rate: int = _num(2, ge=2, le=16)
    # stochastic depth rate of the deepest residual block, rising linearly from 0
    # (resnet*, resnext*, vit*; keras.applications constructors do not expose it)
    drop_path: float = _num(0.0, ge=0, lt=1)
    # Segmentation models (model.arch unet | deeplabv3plus): the zoo CNN under the
    # decoder, or plain (the U-Net paper's own encoder); decoder upsampling; ASPP rates.
    encoder: str = "plain"
    upsampling: Literal["bilinear", "transpose"] = "bilinear"
    aspp_rates: tuple[int, ...] = _num((6, 12, 18), ge=1, le=128)
    # Start from published weights (pipeline.models.pretrained): none | imagenet (Keras's
    # own, keras.applications families) | a path or http(s) URL of a Keras weights file
    # (.h5) or of a PyTorch state dict (.pth, .pt, .safetensors: torchvision/timm layouts)
    pretrained: str = "none"
    # How the model scales its 0..255 pixels: auto = as the weights ask (unit [0, 1]
    # without; ImageNet mean/std for PyTorch weights; each Keras family's own) | unit |
    # imagenet | symmetric ([-1, 1], e.g. timm's augreg ViTs)
    input_norm: Literal["auto", "unit", "imagenet", "symmetric"] = "auto"
    # vit_*: classify from a learned class token (timm's global_pool "token") instead of
    # the average of the patch tokens; what timm's and the original ViT weights need
    class_token: bool = False

    def __post_init__(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ConfigError(
                f"model.kernel_size must be odd (the map keeps its size), got {self.kernel_size}"
            )
        if not self.aspp_rates:
            raise ConfigError("model.aspp_rates must list at least one rate, got []")
        value = self.pretrained
        if not value.strip():
            raise ConfigError("model.pretrained must be none, imagenet, or a path or URL")
        if value not in ("none", "imagenet") and not value.lower().startswith(
            ("http://", "https://")
        ):
            if value.lower().startswith("file:"):
                raise ConfigError(f"model.pretrained {value!r}: give the file's path, not a URL")
            check_path("model.pretrained", value)

    @property
    def segmentation(self) -> bool:
        return self.arch in SEGMENTATION_ARCHS


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, regularization, transfer learning and length of training."""

    epochs: int = _num(30, ge=1, le=EPOCHS_MAX)
    batch_size: int = _num(64, ge=1, le=BATCH_MAX)
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    learning_rate: float = _num(0.003, gt=0, le=10)
    momentum: float = _num(0.9, ge=0, lt=1)  # sgd and rmsprop
    nesterov: bool = True  # sgd
    # decoupled (applied to the weights, not the gradient); not to norm layers and biases
    weight_decay: float = _num(0.0005, ge=0, le=1)
    # Learning rate per step (pipeline.training.optimizers): constant |
    # step (x gamma every step_epochs) |
    # multistep (x gamma at each milestone epoch) | cosine | warmup_cosine | onecycle
    schedule: Literal["constant", "step", "multistep", "cosine", "warmup_cosine", "onecycle"] = (
        "warmup_cosine"
    )
    warmup_epochs: int = _num(2, ge=0, le=EPOCHS_MAX)  # warmup_cosine
    step_epochs: int = _num(10, ge=1, le=EPOCHS_MAX)  # step
    milestones: tuple[int, ...] = _num((15, 25), ge=1, le=EPOCHS_MAX)  # multistep
    gamma: float = _num(0.1, gt=0, le=1)  # step, multistep
    onecycle_pct_start: float = _num(0.3, gt=0, lt=1)  # share of steps spent rising
    onecycle_div_factor: float = _num(25.0, ge=1, le=1e4)  # start at learning_rate / this
    onecycle_final_div_factor: float = _num(1e4, ge=1, le=1e8)  # end at start / this
    clip_norm: float = _num(0.0, ge=0, le=1e6)  # global gradient norm clip; 0 = off
    ema_momentum: float = _num(0.0, ge=0, lt=1)  # EMA of weights, e.g. 0.999; 0 = off
    label_smoothing: float = _num(0.0, ge=0, lt=1)
    # Segmentation loss (pipeline.training.losses); classification always uses cross-entropy.
    loss: Literal["ce", "dice", "focal", "ce_dice"] = "ce"
    class_weights: Literal["none", "median_frequency"] = "none"  # segmentation
    focal_gamma: float = _num(2.0, ge=0, le=10)
    l1: float = _num(0.0, ge=0, le=1)  # kernel penalties of every conv and dense layer
    l2: float = _num(0.0, ge=0, le=1)
    max_norm: float = _num(0.0, ge=0, le=1e3)  # max-norm constraint on kernels; 0 = off
    early_stopping_patience: int = _num(
        0, ge=0, le=EPOCHS_MAX
    )  # epochs without improvement; 0 = off
    # val_accuracy and val_top5: classification; val_miou: segmentation
    early_stopping_monitor: Literal["val_loss", "val_accuracy", "val_top5", "val_miou"] = "val_loss"
    early_stopping_restore_best: bool = True
    # A training-time budget: stop after the epoch that leaves too little time for another
    # (judged by that epoch's length) within this many minutes of fitting; 0 = off
    max_minutes: float = _num(0.0, ge=0, le=43200)  # 30 days
    # Transfer learning (pipeline.training.transfer): start from a registered model
    # (models:/NAME@ALIAS or models:/NAME/VERSION), an MLflow run (runs:/ID/model) or a
    # .keras file; layers are matched by name and shape, a head of another class count
    # is trained from scratch.
    init_from: str = ""
    # full: train everything | frozen: head only (feature extraction) |
    # progressive: head first, then one more group of backbone layers every unfreeze_every epochs
    finetune: Literal["full", "frozen", "progressive"] = "full"
    unfreeze_every: int = _num(1, ge=1, le=EPOCHS_MAX)
    unfreeze_groups: int = _num(4, ge=1, le=1000)
    backbone_lr_scale: float = _num(1.0, gt=0, le=1)  # backbone lr = head lr x this
    loader_workers: int = _num(1, ge=1, le=64)  # threads cutting and augmenting batches
    # none: one device | data_parallel: the model on every device (and every process when
    # launched multi-process, JAX only), each global batch split evenly (pipeline.training.devices)
    distribution: Literal["none", "data_parallel"] = "none"
    # auto: mixed_bfloat16 on GPUs of compute capability >= 8, float32 elsewhere
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    seed: int = _num(42, ge=0, le=SEED_MAX)

    def __post_init__(self) -> None:
        if self.schedule == "warmup_cosine" and self.warmup_epochs >= self.epochs:
            raise ConfigError(
                f"train.warmup_epochs ({self.warmup_epochs}) must be less than "
                f"train.epochs ({self.epochs})"
            )
        if self.schedule == "multistep" and (
            not self.milestones or list(self.milestones) != sorted(set(self.milestones))
        ):
            raise ConfigError(
                f"train.milestones must be increasing epochs, got {list(self.milestones)}"
            )
        if self.init_from and not self.init_from.startswith(("models:/", "runs:/")):
            check_path("train.init_from", self.init_from)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (pipeline.training.augment); everything off by default."""

    flip: bool = False  # random horizontal flip
    crop_padding: int = _num(0, ge=0, le=512)  # pad by this many pixels (reflect), random crop back
    translate: float = _num(0.0, ge=0, le=1)  # fraction of height/width
    rotate: float = _num(0.0, ge=0, le=180)  # degrees, either way
    zoom: float = _num(0.0, ge=0, lt=1)  # fraction in or out
    color_jitter: float = _num(0.0, ge=0, le=1)  # brightness/contrast/saturation strength (RGB)
    randaugment_ops: int = _num(0, ge=0, le=10)  # RandAugment ops per image (RGB); 0 = off
    randaugment_magnitude: float = _num(0.5, gt=0, le=1)
    erasing: float = _num(0.0, ge=0, le=1)  # probability of random erasing per image
    mixup_alpha: float = _num(0.0, ge=0, le=100)  # Beta(alpha, alpha) mixing weight; 0 = off
    # CutMix: the Beta parameter is drawn from U(0, cutmix_alpha) (Keras's CutMix factor)
    cutmix_alpha: float = _num(0.0, ge=0, le=1)
    mix_prob: float = _num(1.0, ge=0, le=1)  # share of batches mixed (MixUp or CutMix, 50/50)

    @property
    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class EvaluateConfig:
    """How the test split is scored, and what evaluate shows of the network."""

    batch_size: int = _num(256, ge=1, le=BATCH_MAX)
    # Dead ReLU units and the effective receptive field; classifiers also get Grad-CAM
    # grids of the most confident correct and wrong test images (docs/explain.md)
    explain: bool = True
    gradcam_images: int = _num(8, ge=1, le=64)  # per grid; classification only
    erf_images: int = _num(32, ge=1, le=1024)  # test images the receptive field averages
    # test-time augmentation (`scoring.tta`): none | flip | flip_translate (classifiers)
    tta: Literal["none", "flip", "flip_translate"] = "none"

    def __post_init__(self) -> None:
        if self.explain:
            return
        for key in ("gradcam_images", "erf_images"):
            value = getattr(self, key)
            if value != _default(EvaluateConfig, key):
                raise ConfigError(
                    f"evaluate.{key}: {value} does nothing with evaluate.explain: false; "
                    "remove it or set explain: true"
                )


def _default(cls: type, key: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == key)


def check_evaluate(task: str, cfg: EvaluateConfig) -> None:
    """Grad-CAM grids need one class score per image: a segmentation run refuses a
    gradcam_images other than the default (which it ignores), and translated views
    (a shifted mask has no label at its border)."""
    if task == "segmentation" and cfg.tta == "flip_translate":
        raise ConfigError(
            "evaluate.tta: flip_translate is for classifiers; a segmentation model takes "
            "flip or none"
        )
    if (
        task == "segmentation"
        and cfg.explain
        and cfg.gradcam_images != _default(EvaluateConfig, "gradcam_images")
    ):
        raise ConfigError(
            f"evaluate.gradcam_images: {cfg.gradcam_images} does nothing for task: "
            "segmentation (Grad-CAM grids are for classifiers); remove it"
        )


@dataclass(frozen=True)
class MlflowConfig:
    """Where runs are grouped. The store itself comes from MLFLOW_TRACKING_URI."""

    experiment: str = "cnn-pipeline"
    # a label for the runs of one comparison grid, set as the run tag `grid`
    grid: str = ""

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("mlflow.experiment must not be empty")
        # MLflow refuses longer experiment names and truncates longer tag values
        if len(self.experiment) > 500:
            raise ConfigError(
                f"mlflow.experiment is {len(self.experiment)} characters; MLflow takes 500"
            )
        if len(self.grid) > 8000:
            raise ConfigError(
                f"mlflow.grid is {len(self.grid)} characters; MLflow keeps 8000 of a tag"
            )


# register.model_name: MLflow's registered-model names (no '/' or ':', at most 256
# characters) that are also DVC artifact names (gto's rule: dvc.yaml's `artifacts:` uses
# ${register.model_name}): letters, digits, '-' and '_', starting and ending alphanumeric.
MODEL_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,254}[A-Za-z0-9])?")
# register.metric: the test metrics evaluate writes to metrics/eval.json, per task, that a
# promotion gate can compare (pipeline.scoring.metrics; test_config checks they match),
# and the direction each one improves in.
GATE_METRICS: dict[str, dict[str, bool]] = {
    "classification": {
        "test_top1": True,
        "test_top5": True,
        "test_macro_f1": True,
        "test_loss": False,
    },
    "segmentation": {
        "test_miou": True,
        "test_mean_dice": True,
        "test_pixel_accuracy": True,
        "test_mean_class_accuracy": True,
    },
}


@dataclass(frozen=True)
class RegisterConfig:
    """Registry name and the promotion gate."""

    model_name: str = "cnn-classifier"
    # the test metric promotion compares (a key of metrics/eval.json)
    metric: str = "test_top1"
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ConfigError("register.model_name must not be empty")
        if not MODEL_NAME.fullmatch(self.model_name):
            raise ConfigError(
                f"register.model_name {self.model_name!r} is not a name MLflow and DVC both "
                "take: letters, digits, '-' and '_', starting and ending with a letter or "
                "digit, at most 256 characters"
            )
        known = {name for metrics in GATE_METRICS.values() for name in metrics}
        if self.metric not in known:
            raise ConfigError(
                f"register.metric {self.metric!r} is not a metric evaluate writes; "
                f"allowed: {', '.join(sorted(known))}"
            )


def check_register(task: str, cfg: RegisterConfig) -> None:
    """register.metric must be one evaluate writes for `task`, gated in its own direction."""
    metrics = GATE_METRICS[task]
    if cfg.metric not in metrics:
        raise ConfigError(
            f"register.metric {cfg.metric!r} is not written for task: {task}; "
            f"use one of {', '.join(metrics)}"
        )
    if cfg.higher_is_better != metrics[cfg.metric]:
        better = "higher" if metrics[cfg.metric] else "lower"
        raise ConfigError(
            f"register.higher_is_better: {str(cfg.higher_is_better).lower()} would promote "
            f"worse models: {cfg.metric} is better {better}"
        )


SECTIONS: dict[str, type] = {
    "fetch": FetchConfig,
    "prepare": PrepareConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "augment": AugmentConfig,
    "evaluate": EvaluateConfig,
    "mlflow": MlflowConfig,
    "register": RegisterConfig,
}


# Sections whose absence means their documented defaults (docs/params.md); a stage that
# needs any other section refuses a file without it rather than run on code defaults.
OPTIONAL_SECTIONS = ("augment",)
_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"


class _Yaml12Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (libyaml's parser where PyYAML has it: 15x faster) resolving
    plain scalars as YAML 1.2 does, as DVC's reader (ruamel.yaml) does: `1e-3` is a
    float, `yes`/`on` are strings, `017` is 17."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if not tag.endswith((":bool", ":int", ":float"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _rx, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    (
        "int",
        r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+)$",
        "-+0123456789",
    ),
    (
        "float",
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)|[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
):
    _Yaml12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_rx), list(_first))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    """A YAML 1.2 integer: 0b, 0o and 0x prefixes; a leading 0 alone is decimal."""
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    base = {"0b": 2, "0o": 8, "0x": 16}.get(text[:2], 10)
    return sign * int(text[2:] if base != 10 else text, base)


_KINDS = {
    f"tag:yaml.org,2002:{t}": w
    for t, w in (("int", "an integer"), ("float", "a number"), ("timestamp", "a date"))
}


def _readable(construct):
    """A scalar constructor whose ValueError (`0x_`, a 5000-digit integer, 2026-13-01)
    becomes a YAML error at the scalar's line."""

    def wrapped(loader: yaml.SafeLoader, node: yaml.Node):
        try:
            return construct(loader, node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"cannot read {_short(node.value, 40)} as {_KINDS[node.tag]}",
                node.start_mark,
            ) from None

    return wrapped


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _readable(_construct_int))
for _tag in ("float", "timestamp"):
    _name = f"tag:yaml.org,2002:{_tag}"
    _Yaml12Loader.add_constructor(_name, _readable(yaml.SafeLoader.yaml_constructors[_name]))


def read_params(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read params.yaml strictly, the one reader of every stage and `check`.

    Refused, as one ConfigError naming the line: bytes that are not UTF-8, YAML that is
    not valid, an empty file, a duplicate key at any depth (DVC refuses those files; a
    plain YAML load keeps the last one), a key that is not a plain name, an unknown
    section, and a section that is not a mapping of keys or is empty.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found (run from the project root or pass --params)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    text = _decode(raw, path)
    loader = None
    try:
        loader = _Yaml12Loader(text)  # refuses control characters here
        node = loader.get_single_node()
        if node is not None:
            _check_keys(node, "", path, set())
            data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML{_where(exc, text)}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise ConfigError(f"{path}: is empty; it needs the sections of docs/params.md")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value if key.tag == _STR}
    allowed = ["task", *SECTIONS]
    for name, value in data.items():
        where = f"{path}: line {lines.get(name, '?')}"
        if name not in allowed:
            raise ConfigError(f"{where}: unknown section {name!r}; allowed: {', '.join(allowed)}")
        if name == "task":
            continue
        if not isinstance(value, dict):
            got = "nothing" if value is None else type(value).__name__
            raise ConfigError(f"{where}: section {name} must be a mapping of keys, got {got}")
        if not value:
            raise ConfigError(
                f"{where}: section {name} is empty; give its keys"
                + (
                    " or delete it (its absence means the defaults)"
                    if name in OPTIONAL_SECTIONS
                    else ""
                )
            )
    return data


def _decode(raw: bytes, path: Path) -> str:
    """The file's text: UTF-8, strictly (a UTF-8 BOM is allowed, as YAML allows it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x}"
            + ("; the file is UTF-16" if utf16 else "")
            + "); save it as UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ConfigError(f"{path}: line {line}: a NUL byte; save the file as UTF-8 text")
    return text


def _where(exc: yaml.YAMLError, text: str) -> str:
    """` at line N (what the parser found)` for a YAML error, in one line."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text[: exc.position].count("\n") + 1
        return f" at line {line} (character #x{exc.character:04x} is not allowed in YAML)"
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", "") or "").split())
    return (f" at line {mark.line + 1}" if mark else "") + (f" ({problem})" if problem else "")


def _check_keys(node: yaml.Node, prefix: str, path: Path, seen: set[int]) -> None:
    """Every mapping key at any depth a plain name, none twice in its mapping."""
    if id(node) in seen:  # an alias: checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(item, f"{prefix}[{i}]", path, seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[str, int] = {}
    for key, value in node.value:
        line = key.start_mark.line + 1
        if key.tag == _MERGE:
            continue
        if not isinstance(key, yaml.ScalarNode) or key.tag != _STR:
            shown = key.value if isinstance(key, yaml.ScalarNode) else "a " + key.id
            raise ConfigError(
                f"{path}: line {line}: key {_short(shown)!s} in {prefix or 'the top level'} "
                "is not a name (quote it if it is one)"
            )
        name = f"{prefix}.{key.value}" if prefix else key.value
        if key.value in first:
            raise ConfigError(
                f"{path}: line {line}: duplicate key {_short(name)} (first at line "
                f"{first[key.value]}); DVC refuses the file and YAML would keep the last"
            )
        first[key.value] = line
        _check_keys(value, name, path, seen)


def load(section: str, path: Path = DEFAULT_PARAMS, params: dict[str, Any] | None = None):
    """Parse one section of params.yaml into its config object; a section the file lacks
    is refused unless it is optional (OPTIONAL_SECTIONS: absent means its defaults)."""
    if params is None:
        params = read_params(path)
    if section not in params and section not in OPTIONAL_SECTIONS:
        raise ConfigError(f"{path}: section {section} is missing (docs/params.md lists its keys)")
    raw = params.get(section, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {section} must be a mapping, got {type(raw).__name__}")
    try:
        return parse(SECTIONS[section], raw, prefix=section)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_task(path: Path = DEFAULT_PARAMS, params: dict[str, Any] | None = None) -> str:
    """The top-level `task` param: classification when absent (documented as such)."""
    if params is None:
        params = read_params(path)
    task = params.get("task", TASKS[0])
    if task not in TASKS:
        raise ConfigError(
            f"{path}: task must be one of {', '.join(TASKS)}, got {_short(repr(task))}"
        )
    return task


def check_task(task: str, model: ModelConfig, train: TrainConfig) -> None:
    """Keys that only make sense for the other task, named in one line."""
    segmentation = task == "segmentation"
    if model.segmentation != segmentation:
        wanted = "unet or deeplabv3plus" if segmentation else "a classifier"
        raise ConfigError(f"model.arch {model.arch!r} does not fit task: {task}; use {wanted}")
    if not segmentation and (train.loss != "ce" or train.class_weights != "none"):
        raise ConfigError("train.loss and train.class_weights apply to task: segmentation")
    if segmentation and train.early_stopping_monitor in ("val_accuracy", "val_top5"):
        raise ConfigError(
            f"train.early_stopping_monitor: {train.early_stopping_monitor} is a classification "
            "metric; use val_loss or val_miou"
        )
    if not segmentation and train.early_stopping_monitor == "val_miou":
        raise ConfigError("train.early_stopping_monitor: val_miou needs task: segmentation")
    if segmentation and train.label_smoothing:
        raise ConfigError("train.label_smoothing applies to task: classification")


def check_transfer(model: ModelConfig, train: TrainConfig) -> None:
    """Fine-tuning settings need weights to start from: train.init_from or model.pretrained
    (one of them: both would load twice)."""
    pretrained = model.pretrained != "none"
    if train.init_from and pretrained:
        raise ConfigError(
            f"train.init_from and model.pretrained both give starting weights; keep one "
            f"(init_from {train.init_from}, pretrained {model.pretrained})"
        )
    if train.init_from or pretrained:
        return
    if train.finetune != "full":
        raise ConfigError(
            f"train.finetune: {train.finetune} needs weights to start from: "
            "model.pretrained or train.init_from"
        )
    if train.backbone_lr_scale != 1:
        raise ConfigError(
            f"train.backbone_lr_scale {train.backbone_lr_scale} needs model.pretrained or "
            "train.init_from (it scales a loaded backbone's learning rate; without one it "
            "does nothing): leave it at 1.0"
        )


def load_all(path: Path = DEFAULT_PARAMS, *, model_check=None) -> dict[str, Any]:
    """Every section and the task, validated together: for `pipeline check` and for tests.

    `model_check(model_config)` runs after the sections parse and before the task's
    cross-section checks (the architecture registry's, which this module cannot import).
    """
    params = read_params(path)
    configs: dict[str, Any] = {name: load(name, path, params) for name in SECTIONS}
    configs["task"] = load_task(path, params)
    try:
        if model_check:
            model_check(configs["model"])
        check_task(configs["task"], configs["model"], configs["train"])
        check_transfer(configs["model"], configs["train"])
        check_register(configs["task"], configs["register"])
        check_evaluate(configs["task"], configs["evaluate"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return configs


def parse(cls: type, raw: dict[str, Any], prefix: str):
    """Build dataclass `cls` from `raw`, checking keys, types and bounds."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown key {prefix}.{key}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}"
        values[name] = _coerce(value, hints[name], key)
        _check_bounds(values[name], fields[name].metadata.get("bounds", {}), key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed or type(value) is not type(allowed[0]):
            shown = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{key} must be one of {shown}, got {_shown(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {_shown(value)}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) > 1:  # e.g. int | tuple[int, ...]: the first that fits
            for choice in choices:
                try:
                    return _coerce(value, choice, key)
                except ConfigError:
                    pass
            raise ConfigError(f"{key} must be {_describe(choices)}, got {_shown(value)}")
        hint = choices[0]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {_shown(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {_shown(value)}")
        if isinstance(value, int) and abs(value) > 2**1023 or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {_shown(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_shown(value)}")
        bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
        if bad is not None:
            raise ConfigError(
                f"{key} must be one line of text, got {_shown(value)} "
                f"(control character U+{ord(bad):04X})"
            )
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug, not bad input


def _describe(hints: list[Any]) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return " or ".join(words.get(h, "a list") for h in hints)


_BOUND_TEXT = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_BOUND_TEST = {
    "gt": lambda v, b: v > b,
    "ge": lambda v, b: v >= b,
    "lt": lambda v, b: v < b,
    "le": lambda v, b: v <= b,
}


def _check_bounds(value: Any, bounds: dict[str, float], key: str) -> None:
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_bounds(item, bounds, f"{key}[{i}]")
        return
    for kind, bound in bounds.items():
        if not _BOUND_TEST[kind](value, bound):
            raise ConfigError(
                f"{key} must be {_BOUND_TEXT[kind]} {_bound_text(bound)}, got {_shown(value)}"
            )


def _bound_text(bound: float) -> str:
    """4294967295 as itself, not 4.29497e+09."""
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else f"{bound:g}"


def _shown(value: Any) -> str:
    """A value for an error line: its repr, cut short (a 5000-digit integer, a long text)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    return _short(repr(value))


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def flatten(config: Any, prefix: str) -> dict[str, Any]:
    """`{"train.epochs": 30, ...}` for logging a config object as MLflow params."""
    return {f"{prefix}.{k}": v for k, v in dataclasses.asdict(config).items()}
