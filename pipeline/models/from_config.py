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
    )


def check_model(cfg: ModelConfig, image_shape: tuple[int, int, int] | None = None) -> None:
    """Refuse, as one ConfigError naming the key, an unknown architecture or encoder, or a
    setting `cfg.arch` cannot take; with `image_shape`, also an input it cannot be built for."""
    from pipeline.config import SEGMENTATION_ARCHS
    from pipeline.models.architectures import check_buildable, list_models
    from pipeline.models.segmentation import PLAIN, check_segmentation_buildable

    names = list_models()
    if cfg.segmentation:
        if cfg.encoder != PLAIN and cfg.encoder not in names:
            raise ConfigError(
                f"model.encoder {cfg.encoder!r} is unknown; allowed: {PLAIN}, " + ", ".join(names)
            )
        if cfg.arch == "deeplabv3plus" and cfg.encoder == PLAIN:
            raise ConfigError("model.encoder: deeplabv3plus needs a zoo encoder, e.g. resnet18")
        if image_shape is not None:
            check_segmentation_buildable(cfg.arch, cfg.encoder, image_shape)
        return
    if cfg.arch not in names:
        raise ConfigError(
            f"model.arch {cfg.arch!r} is unknown; allowed: "
            + ", ".join([*names, *SEGMENTATION_ARCHS])
        )
    check_buildable(cfg.arch, image_shape or ANY_SIZE, layer_choices(cfg), cfg.drop_path)


def build(cfg: ModelConfig, image_shape: tuple[int, int, int], num_classes: int):
    """The classifier or segmentation model `cfg` names, for this data."""
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
        )
    from pipeline.models.architectures import build_model

    return build_model(
        cfg.arch,
        image_shape,
        num_classes,
        dropout=cfg.dropout,
        width_multiplier=cfg.width_multiplier,
        small_input=cfg.small_input,
        choices=layer_choices(cfg),
        drop_path=cfg.drop_path,
    )
