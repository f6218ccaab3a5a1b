"""params.yaml's `model` section -> a built model.

The one place that knows which settings apply to which architecture: a setting
that would do nothing for the chosen model is refused here, naming the key, so
two runs of a grid never differ only in name. `check_model` runs in `check` and
before training starts; `build` is what training builds.
"""

from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError

# an input no architecture is too small for: checks that do not depend on the data
ANY_SIZE = (1 << 30, 1 << 30, 3)
DEFAULTS = ModelConfig()


def layer_choices(cfg: ModelConfig):
    """The operator choices as the model builders take them."""
    from pipeline.models.blocks import LayerChoices

    return LayerChoices(
        conv=cfg.conv,
        groups=cfg.groups,
        norm=cfg.norm,
        activation=cfg.activation,
        padding=cfg.padding,
        downsample=cfg.downsample,
        head=cfg.head,
        kernel_size=cfg.kernel_size,
        dilation_rate=cfg.dilation_rate,
    )


def check_model(cfg: ModelConfig, image_shape: tuple[int, int, int] | None = None) -> None:
    """Refuse, as one ConfigError naming the key, an unknown architecture or encoder, or a
    setting `cfg.arch` cannot take or would ignore; with `image_shape`, also an input it
    cannot be built for. A setting at its default is never refused. Only model.groups
    against one layer's channels needs the built graph (`blocks.group_count` refuses it)."""
    from pipeline.config import SEGMENTATION_ARCHS
    from pipeline.models.architectures import check_buildable, get_spec, list_models
    from pipeline.models.pretrained import check_pretrained

    names = list_models()
    if cfg.segmentation:
        _check_segmentation(cfg, image_shape, names)
        check_pretrained(cfg, layer_choices(cfg))
        return
    if cfg.arch not in names:
        raise ConfigError(
            f"model.arch {cfg.arch!r} is unknown; allowed: "
            + ", ".join([*names, *SEGMENTATION_ARCHS])
        )
    for key in ("encoder", "upsampling", "aspp_rates"):
        if _changed(cfg, key):
            raise ConfigError(
                f"model.{key} applies to segmentation models ({', '.join(SEGMENTATION_ARCHS)}); "
                f"{cfg.arch} is a classifier: leave it at {_default_text(key)}"
            )
    if _changed(cfg, "small_input") and not get_spec(cfg.arch).small_input:
        raise ConfigError(
            f"model.small_input does not apply to {cfg.arch} (it keeps its ImageNet stem "
            f"either way): leave it at {_default_text('small_input')}"
        )
    if cfg.class_token and not get_spec(cfg.arch).class_token:
        with_it = ", ".join(n for n in names if get_spec(n).class_token)
        raise ConfigError(
            f"model.class_token applies to vision transformers ({with_it}); {cfg.arch} "
            "pools convolutional maps: leave it at false"
        )
    check_buildable(
        cfg.arch,
        image_shape or ANY_SIZE,
        layer_choices(cfg),
        cfg.drop_path,
        small_input=cfg.small_input,
    )
    if cfg.padding == "valid" and image_shape is not None:
        _check_valid_padding_fits(cfg, image_shape)
    check_pretrained(cfg, layer_choices(cfg))


def _check_valid_padding_fits(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> None:
    """model.padding valid shrinks every map by k - 1 a convolution: build the model at the
    narrowest width (map sizes do not depend on it) to refuse, before training writes
    anything, an image it would run out of (`architectures.build_model` says so)."""
    from pipeline.models.architectures import build_model

    build_model(
        cfg.arch,
        image_shape,
        2,
        width_multiplier=1 / 64,
        small_input=cfg.small_input,
        choices=layer_choices(cfg),
    )


def _check_segmentation(cfg: ModelConfig, image_shape, names: list[str]) -> None:
    """check_model for unet | deeplabv3plus: the encoder's settings, then the decoder's."""
    from dataclasses import replace

    from pipeline.models.architectures import check_buildable, unused_choice
    from pipeline.models.registration import SPECS, ModelSpec
    from pipeline.models.segmentation import PLAIN, check_segmentation_buildable

    if cfg.encoder != PLAIN and cfg.encoder not in names:
        raise ConfigError(
            f"model.encoder {cfg.encoder!r} is unknown; allowed: {PLAIN}, " + ", ".join(names)
        )
    if cfg.arch == "deeplabv3plus" and cfg.encoder == PLAIN:
        raise ConfigError("model.encoder: deeplabv3plus needs a zoo encoder, e.g. resnet18")
    # key -> where it applies instead (what this model does)
    refusals = {
        "class_token": "vision transformer classifiers; a segmentation encoder must be a CNN",
        "small_input": "classifiers; a segmentation encoder keeps its ImageNet strides "
        "(down to 1/32) for the decoder's skips",
        "head": f"classifiers; {cfg.arch} ends in its own per-pixel head",
    }
    if cfg.arch == "deeplabv3plus":
        refusals["upsampling"] = "unet; deeplabv3plus upsamples bilinearly"
    else:
        refusals["aspp_rates"] = "deeplabv3plus; unet has no ASPP"
    for key, reason in refusals.items():
        if _changed(cfg, key):
            raise ConfigError(f"model.{key} applies to {reason}: leave it at {_default_text(key)}")
    if cfg.padding == "valid":
        raise ConfigError(
            "model.padding valid applies to plain classifiers; a segmentation model's skips "
            "and per-pixel head need maps of the image's size: leave it at zeros"
        )
    choices = layer_choices(cfg)
    if cfg.encoder == PLAIN:
        # The paper's encoder takes every operator choice, as a hand-written family does.
        message = unused_choice(ModelSpec("unet", None, "unet", default_head=""), choices, False)
        if message:
            raise ConfigError(message)
        if cfg.drop_path:
            with_it = ", ".join(n for n in sorted(SPECS) if SPECS[n].drop_path)
            raise ConfigError(
                f"model.drop_path applies to encoders with residual blocks ({with_it}); "
                f"the plain U-Net has none: set it to 0"
            )
    else:
        check_buildable(
            cfg.encoder,
            image_shape or ANY_SIZE,
            replace(choices, head="default"),
            cfg.drop_path,
            small_input=False,
        )
    if image_shape is not None:
        check_segmentation_buildable(cfg.arch, cfg.encoder, image_shape)


def _changed(cfg: ModelConfig, key: str) -> bool:
    value, default = getattr(cfg, key), getattr(DEFAULTS, key)
    if isinstance(default, tuple):
        value = tuple(value)
    return value != default


def _default_text(key: str) -> str:
    """A default as params.yaml spells it."""
    default = getattr(DEFAULTS, key)
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return str(list(default))
    return str(default)


def build(cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int):
    """The classifier or segmentation model `cfg` names, for this data, scaling its input
    as its pretrained weights ask (`pretrained.input_norm`); the weights are not loaded."""
    from pipeline.models.pretrained import input_norm

    norm = input_norm(cfg)
    if cfg.segmentation:
        from pipeline.models.segmentation import build_segmentation_model

        return build_segmentation_model(
            cfg.arch,
            image_shape,
            num_classes,
            encoder=cfg.encoder,
            upsampling=cfg.upsampling,
            aspp_rates=cfg.aspp_rates,
            width_multiplier=cfg.width_multiplier,
            dropout=cfg.dropout,
            choices=layer_choices(cfg),
            drop_path=cfg.drop_path,
            input_norm=norm,
        )
    from pipeline.models.architectures import build_model

    extra = {"class_token": True} if cfg.class_token else {}

    return build_model(
        cfg.arch,
        image_shape,
        num_classes,
        dropout=cfg.dropout,
        width_multiplier=cfg.width_multiplier,
        small_input=cfg.small_input,
        choices=layer_choices(cfg),
        drop_path=cfg.drop_path,
        input_norm=norm,
        **extra,
    )


def encoder_classifier(cfg: ModelConfig, image_shape: tuple[int, int, int]):
    """The classifier of segmentation model `cfg`'s encoder, laid out as the encoder is
    (ImageNet strides, the input scaling of its weights): what pretrained weights load into."""
    from pipeline.models import segmentation
    from pipeline.models.pretrained import input_norm

    return segmentation.encoder_classifier(
        cfg.encoder,
        image_shape,
        cfg.width_multiplier,
        layer_choices(cfg),
        cfg.drop_path,
        input_norm(cfg),
    )
