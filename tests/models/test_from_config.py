"""Every accepted model setting changes the model, or check_model refuses it naming the key.

For every architecture of the registry (and unet, deeplabv3plus) and every non-default
value of every `model.*` key, the model built with it must differ from the model built
without it in its layers' types or configs (names and weights aside), or the setting
must be refused with one line naming `model.<key>`. Models build at 32x32x3 with
width_multiplier 0.25. Depth and scale siblings (resnet34 of resnet18, ...) are not
built: their verdicts must equal their representative's, as they share its code.
keras.applications models refuse every operator choice; of their other settings
(dropout, width_multiplier, small_input) mobilenet_v2 is built here, and
tests/models/test_models.py checks width and small_input for every architecture.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import SAME_CODE_AS_SIBLING

from pipeline.config import ModelConfig, TrainConfig, check_transfer
from pipeline.errors import ConfigError
from pipeline.models.architectures import get_spec, list_models
from pipeline.models.from_config import build, check_model

SHAPE = (32, 32, 3)
CLASSES = 3
# Fixed-operator families (keras.applications, ViT) built here; the other applications
# are checked without a build.
BUILT_FIXED = {"mobilenet_v2", "vit_tiny"}
# What a fixed-operator family may accept (every operator choice is refused).
FIXED_SETTINGS = {"dropout", "width_multiplier", "small_input", "drop_path"}

# (id, overrides, the config it is compared with: the base unless given)
CHANGES = [
    ("dropout=0", {"dropout": 0.0}, None),
    ("dropout=0.5", {"dropout": 0.5}, None),
    ("width_multiplier=0.5", {"width_multiplier": 0.5}, None),
    ("small_input=false", {"small_input": False}, None),
    *((f"conv={c}", {"conv": c}, None) for c in ("separable", "group", "dilated")),
    ("conv=spatial_separable", {"conv": "spatial_separable"}, None),
    ("groups=2", {"groups": 2}, None),
    ("conv=group,groups=2", {"conv": "group", "groups": 2}, {"conv": "group"}),
    ("conv=group,groups=8", {"conv": "group", "groups": 8}, {"conv": "group"}),
    *((f"norm={n}", {"norm": n}, None) for n in ("group", "layer", "layer_channels", "none")),
    ("norm=layer_channels vs layer", {"norm": "layer_channels"}, {"norm": "layer"}),
    *(
        (f"activation={a}", {"activation": a}, None)
        for a in ("leaky_relu", "elu", "gelu", "sigmoid", "tanh")
    ),
    *(
        (f"padding={p}", {"padding": p}, None)
        for p in ("reflect", "replicate", "circular", "valid")
    ),
    ("padding=reflect,small_input=false", {"padding": "reflect", "small_input": False}, None),
    *((f"downsample={d}", {"downsample": d}, None) for d in ("avg", "strided", "max_avg")),
    ("kernel_size=5", {"kernel_size": 5}, None),
    (
        "kernel_size=7,conv=separable",
        {"kernel_size": 7, "conv": "separable"},
        {"conv": "separable"},
    ),
    ("dilation_rate=3", {"dilation_rate": 3}, None),
    ("conv=dilated,dilation_rate=3", {"conv": "dilated", "dilation_rate": 3}, {"conv": "dilated"}),
    *((f"head={h}", {"head": h}, None) for h in ("gap", "flatten", "max_avg")),
    ("drop_path=0.1", {"drop_path": 0.1}, None),
    ("encoder=simple_cnn", {"encoder": "simple_cnn"}, None),
    ("upsampling=transpose", {"upsampling": "transpose"}, None),
    ("aspp_rates=[2,4]", {"aspp_rates": (2, 4)}, None),
]
SEGMENTATION_BASES = {
    "unet": ModelConfig(arch="unet", width_multiplier=0.25),
    "deeplabv3plus": ModelConfig(arch="deeplabv3plus", encoder="resnet18", width_multiplier=0.25),
}
ARCHS = [*list_models(), *SEGMENTATION_BASES]


def shape(arch: str) -> tuple[int, int, int]:
    """SHAPE, or the architecture's minimum side if larger (inception_v3's 75)."""
    if arch in SEGMENTATION_BASES:
        return SHAPE
    side = max(SHAPE[0], get_spec(arch).min_size)
    return (side, side, SHAPE[2])


def base_config(arch: str) -> ModelConfig:
    return SEGMENTATION_BASES.get(arch) or ModelConfig(arch=arch, width_multiplier=0.25)


def signature(model) -> list[str]:
    """The model's layers as sorted (class, config without name) strings: what it computes."""
    rows = []
    for layer in model.layers:
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        rows.append(f"{type(layer).__name__} {json.dumps(config, sort_keys=True, default=str)}")
    return sorted(rows)


_SIGNATURES: dict[ModelConfig, list[str]] = {}


def built_signature(cfg: ModelConfig) -> list[str]:
    if cfg not in _SIGNATURES:
        # No clear_session per build: it costs more than the build (names are explicit).
        _SIGNATURES[cfg] = signature(build(cfg, shape(cfg.arch), CLASSES))
    return _SIGNATURES[cfg]


def verdict(cfg: ModelConfig, keys) -> str | None:
    """check_model's refusal (the message less the arch's name), None if accepted."""
    try:
        check_model(cfg, shape(cfg.arch))
    except ConfigError as refused:
        message = str(refused)
        assert "\n" not in message, message
        assert any(f"model.{key}" in message for key in keys), message
        return message.replace(cfg.arch, "ARCH")
    return None


def fixed_operators(arch: str) -> bool:
    return arch not in SEGMENTATION_BASES and not get_spec(arch).hand_written


@pytest.mark.parametrize("arch", ARCHS)
def test_the_default_settings_are_accepted(arch):
    check_model(base_config(arch), shape(arch))


@pytest.mark.parametrize(
    ("overrides", "reference"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES]
)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_setting_changes_the_model_or_is_refused(arch, overrides, reference):
    cfg = replace(base_config(arch), **overrides)
    refusal = verdict(cfg, overrides)
    if arch in SAME_CODE_AS_SIBLING:
        sibling = replace(cfg, arch=SAME_CODE_AS_SIBLING[arch])
        assert refusal == verdict(sibling, overrides), "a sibling decides as its representative"
        return
    if refusal is not None:
        return
    if fixed_operators(arch):
        assert set(overrides) <= FIXED_SETTINGS, f"{arch} accepted {overrides}"
        if arch not in BUILT_FIXED:
            return
    changed, original = (
        built_or_refused(c, overrides)
        for c in (cfg, replace(base_config(arch), **(reference or {})))
    )
    if changed is not None:
        assert changed != original, f"{overrides} changes nothing in {arch}"


def built_or_refused(cfg: ModelConfig, keys) -> list[str] | None:
    """The built model's signature, or None if the build refuses `keys` (model.groups
    against one layer's channels, small_input false against the input size)."""
    keys = {*keys, *(["groups"] if cfg.conv == "group" else [])}
    try:
        return built_signature(cfg)
    except ConfigError as refused:
        message = str(refused)
        assert "\n" not in message and any(f"model.{k}" in message for k in keys), message
        return None


def test_group_counts_that_do_not_divide_a_layer_are_refused_with_its_channels():
    cfg = ModelConfig(arch="lenet5", conv="group", width_multiplier=1.0)  # 6 -> 16 channels
    check_model(cfg, SHAPE)
    with pytest.raises(ConfigError, match=r"model.groups 4 does not divide the 6 input .* 2\)"):
        build(cfg, SHAPE, CLASSES)


def test_resnext_keeps_its_own_32_groups_whatever_model_groups():
    model = build(ModelConfig(arch="resnext50_32x4d", width_multiplier=0.25), SHAPE, CLASSES)
    assert model.get_layer("stage1_block1_2_conv").groups == 32


def test_segmentation_choices_reach_encoder_and_decoder():
    cfg = replace(SEGMENTATION_BASES["deeplabv3plus"], norm="group", activation="gelu")
    model = build(cfg, SHAPE, CLASSES)
    norms = {type(la).__name__ for la in model.layers if "Normalization" in type(la).__name__}
    assert norms == {"GroupNormalization"}
    for name in ("stem_gn", "aspp_rate6_gn", "decoder_conv2_gn", "aspp_project_gelu"):
        model.get_layer(name)  # encoder, ASPP and decoder alike


def test_backbone_lr_scale_needs_starting_weights():
    with pytest.raises(ConfigError, match="train.backbone_lr_scale 0.1 needs model.pretrained"):
        check_transfer(ModelConfig(), TrainConfig(backbone_lr_scale=0.1))
    check_transfer(ModelConfig(), TrainConfig(backbone_lr_scale=0.1, init_from="m.keras"))
    check_transfer(ModelConfig(pretrained="imagenet"), TrainConfig(backbone_lr_scale=0.1))
