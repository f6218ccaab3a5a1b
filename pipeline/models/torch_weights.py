"""PyTorch state dicts (torchvision, timm) in and out of the hand-written families.

The families whose layers mirror torchvision's (ResNet-18...152, ResNeXt-50,
VGG-11/13, AlexNet, GoogLeNet, ShuffleNet v2) and timm's ViTs map each Keras
layer to one PyTorch module by name, converting layouts on the way: conv
kernels OIHW -> HWIO (grouped and depthwise too), linear (out, in) -> (in, out),
BatchNorm weight/bias/running_mean/running_var -> gamma/beta/moving_mean/
moving_variance, ViT's fused qkv projection -> Keras MultiHeadAttention's
query/key/value/output kernels. `load_state_dict` is all or nothing: every
tensor of the file must land on a layer and every weight of the model must get
one, else a one-line ConfigError names the tensor; only the classifier head
(`head_dense`) may start fresh, when the class count differs (reported).

`.pth`/`.pt`/`.bin` files need torch (`torch.load(weights_only=True)`, which
runs no pickled code); `.safetensors` files need only the safetensors package.
torch is imported when a file is read, never at import time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

# arch -> the family whose name map it uses
TORCH_FAMILIES: dict[str, str] = {
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet",
    "resnet101": "resnet",
    "resnet152": "resnet",
    "resnext50_32x4d": "resnet",
    "vgg11": "vgg",
    "vgg13": "vgg",
    "alexnet": "alexnet",
    "googlenet": "googlenet",
    "shufflenet_v2": "shufflenet",
    "vit_tiny": "vit",
    "vit_small": "vit",
}
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Checkpoint dicts that hold the state dict under a key (timm's train.py, most scripts).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Name prefixes every key carries when saved from a wrapper: DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Families whose small-input stem has another kernel than the weights' (ViT: 4x4 patches).
STEM_KERNEL = {"resnet": "7x7", "alexnet": "11x11", "googlenet": "7x7", "vit": "16x16"}
# Batch norm settings each family's published weights exist for.
NORMS = {"vgg": ("batch", "none"), "alexnet": ("none",)}
HEAD = "head_dense"


@dataclass(frozen=True)
class Imported:
    """What `load_state_dict` did."""

    copied: tuple[str, ...]  # Keras layers that took the file's weights
    fresh_head: bool  # head_dense kept its initialization (other class count, or none in the file)
    skipped: tuple[str, ...]  # tensors with no use here: num_batches_tracked, GoogLeNet's aux*
    layout: str  # "torchvision" or "timm" (their VGG names differ; ViTs are timm's)


@dataclass(frozen=True)
class Rule:
    """Some PyTorch tensors <-> some Keras variables ("layer/variable"), both conversions."""

    torch: tuple[str, ...]
    keras: tuple[str, ...]
    to_keras: Callable[[list[np.ndarray]], list[np.ndarray]]
    to_torch: Callable[[list[np.ndarray]], list[np.ndarray]]


def importable(arch: str) -> bool:
    """Whether `arch` has a map from torchvision/timm names."""
    return arch in TORCH_FAMILIES


def family_of(arch: str) -> str:
    if arch not in TORCH_FAMILIES:
        raise ConfigError(
            f"model.pretrained: {arch} has no map from PyTorch weights (those that have: "
            f"{', '.join(sorted(TORCH_FAMILIES))})"
        )
    return TORCH_FAMILIES[arch]


# --- reading files ---------------------------------------------------------------------


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of a `.pth`/`.pt`/`.bin` (torch) or `.safetensors` file, as float32 numpy
    (integers as they are), unwrapped from checkpoint dicts and DDP's "module." prefix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        state = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    else:
        raise ConfigError(
            f"model.pretrained: {path} is neither a PyTorch checkpoint "
            f"({', '.join(TORCH_SUFFIXES)}) nor {SAFETENSORS_SUFFIX}"
        )
    return _strip_prefixes(_as_arrays(_unwrap(state), path))


def _read_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise ConfigError(
            f"model.pretrained: {path} is a PyTorch checkpoint: install torch "
            "(pip install torch) or convert it to .safetensors"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and weights_only refusals alike
        raise ConfigError(
            f"model.pretrained: {path} is not a readable PyTorch state dict ({_first_line(exc)})"
        ) from None


def _read_safetensors(path: Path):
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConfigError(
            f"model.pretrained: reading {path} needs safetensors (pip install safetensors)"
        ) from None
    try:
        return load_file(path)
    except Exception as exc:
        raise ConfigError(
            f"model.pretrained: {path} is not a readable .safetensors file ({_first_line(exc)})"
        ) from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _unwrap(obj):
    """The state dict inside {"state_dict": ...}, {"model": ...} (nested at most thrice)."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            return obj
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _as_arrays(obj, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty mapping" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ConfigError(
            f"model.pretrained: {path} is not a state dict (names to tensors): it holds {what}"
        )
    state = {}
    for name, value in obj.items():
        array = _to_numpy(value)
        if not isinstance(name, str) or array is None:
            raise ConfigError(
                f"model.pretrained: {path} is not a state dict (names to tensors): "
                f"{name!r} is a {type(value).__name__}, not a tensor"
            )
        state[name] = array
    return state


def _to_numpy(value) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False) if value.dtype.kind == "f" else value
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        tensor = value.detach().cpu()
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    return None


def _strip_prefixes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in WRAPPER_PREFIXES:
        if all(name.startswith(prefix) for name in state):
            state = {name[len(prefix) :]: value for name, value in state.items()}
    return state


# --- what the weights fit --------------------------------------------------------------


def check_importable(arch: str, *, choices=None, width_multiplier=1.0, small_input=False):
    """Refuse (ConfigError naming the key) settings torchvision/timm weights cannot fit.

    The operator choices must be the defaults (they are what torchvision builds), except
    batch norm for VGG (vgg11_bn or vgg11) and AlexNet (none: torchvision's has none). The
    width must be 1 (ShuffleNet: one of torchvision's 0.5, 1, 1.5, 2). `small_input` is
    refused where the small stem cannot take the weights' stem kernel (ResNet, AlexNet,
    GoogLeNet, ViT); VGG (no last pool) and ShuffleNet (a stride-1 stem) take them as they
    are and run them at a finer resolution.
    """
    from pipeline.models.blocks import DEFAULT_CHOICES
    from pipeline.models.shufflenet import CHANNEL_TABLE

    family = family_of(arch)
    choices = choices or DEFAULT_CHOICES
    norms = NORMS.get(family, ("batch",))
    if choices.norm not in norms:
        why = {
            "alexnet": "torchvision's alexnet has no batch norm",
            "vgg": "torchvision has vgg*_bn (batch) and vgg* (none)",
        }.get(family, f"torchvision's {arch} uses batch norm")
        raise ConfigError(
            f"model.norm {choices.norm}: {why}; its weights need model.norm {' or '.join(norms)}"
        )
    for key in ("conv", "activation", "padding", "downsample", "head", "kernel_size"):
        value, default = getattr(choices, key), getattr(DEFAULT_CHOICES, key)
        if value != default:
            raise ConfigError(
                f"model.{key} {value}: PyTorch weights for {arch} are for its own operators: "
                f"leave model.{key} at {default}"
            )
    widths = sorted(CHANNEL_TABLE) if family == "shufflenet" else [1.0]
    if float(width_multiplier) not in widths:
        listed = " / ".join(f"{w:g}" for w in widths)
        raise ConfigError(
            f"model.width_multiplier {width_multiplier:g}: PyTorch weights for {arch} exist "
            f"at width {listed} (torchvision's channels): set it to {listed}"
        )
    if small_input and family in STEM_KERNEL:
        small = "4x4 patches" if family == "vit" else "a 3x3 conv"
        raise ConfigError(
            f"model.small_input true: {arch}'s small-input stem is {small}, which cannot take "
            f"the weights' {STEM_KERNEL[family]} stem kernel: set model.small_input false"
        )


def settings_of(model, arch: str):
    """(choices, width_multiplier, small_input) as far as a built `model` shows them:
    what `load_state_dict` checks before it maps a name."""
    import keras

    from pipeline.models.blocks import DEFAULT_CHOICES, LayerChoices
    from pipeline.models.layers import Pad2D

    family = family_of(arch)
    layers = model.layers
    names = {layer.name for layer in layers}
    pools = {layer.name for layer in layers if isinstance(layer, keras.layers.MaxPooling2D)}
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    conv = "standard"
    if any(isinstance(layer, keras.layers.SeparableConv2D) for layer in layers):
        conv = "separable"
    elif any(name.endswith("_conv_kx1") for name in names):
        conv = "spatial_separable"
    elif any(tuple(layer.dilation_rate) != (1, 1) for layer in convs):
        conv = "dilated"
    elif arch != "resnext50_32x4d" and any(layer.groups > 1 for layer in convs):
        conv = "group"
    norm = "batch"
    if family != "vit":
        if any(isinstance(layer, keras.layers.GroupNormalization) for layer in layers):
            norm = "group"
        elif lns := [
            layer for layer in layers if isinstance(layer, keras.layers.LayerNormalization)
        ]:
            per_sample = any(np.size(ln.axis) == 3 for ln in lns)  # over H, W and C
            norm = "layer" if per_sample else "layer_channels"
        elif not any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers):
            norm = "none"
    activation = "relu"
    for layer in layers:
        if isinstance(layer, keras.layers.LeakyReLU):
            activation = "leaky_relu"
        elif isinstance(layer, keras.layers.Activation) and family != "vit":
            kind = getattr(layer.activation, "__name__", "")
            if kind in ("elu", "gelu"):
                activation = kind
    padding = next(
        (
            layer.mode
            for layer in layers
            if isinstance(layer, Pad2D)
            and layer.mode != "zeros"
            and layer.name.removesuffix("_pad") not in pools
        ),
        "zeros",
    )
    downsample = "max"
    if any(re.search(r"_down\d*_conv$", name) for name in names):
        downsample = "strided"
    elif any(type(layer) is keras.layers.AveragePooling2D for layer in layers):
        downsample = "avg"
    head = "default"
    if "head_max_avg" in names:
        head = "max_avg"
    elif family in ("vgg", "alexnet") and "head_fc1" not in names:
        head = "flatten" if "head_flatten" in names else "gap"
    elif family not in ("vgg", "alexnet", "vit") and "head_flatten" in names:
        head = "flatten"
    choices = LayerChoices(
        conv=conv,
        norm=norm,
        activation=activation,
        padding=padding,
        downsample=downsample,
        head=head,
        groups=DEFAULT_CHOICES.groups,
    )
    return choices, _width_of(model, arch, family), _small_input_of(model, family)


def _width_of(model, arch: str, family: str) -> float:
    """The width multiplier of `model` from one layer's channels (ratio to width 1)."""
    from pipeline.models.shufflenet import CHANNEL_TABLE

    if family == "shufflenet":
        stage1 = 2 * model.get_layer("stage1_unit1_branch2_1x1b_conv").filters
        widths = [w for w, table in CHANNEL_TABLE.items() if table[1] == stage1]
        return widths[0] if widths else stage1 / CHANNEL_TABLE[1.0][1]
    layer, channels = {
        "vit": ("stem_patch_conv", {"vit_tiny": 192, "vit_small": 384}.get(arch)),
        "googlenet": ("stem_1_conv", 64),
        "vgg": ("stage1_1_conv", 64),
    }.get(family, ("stem_conv", 64))
    return model.get_layer(layer).filters / channels


def _small_input_of(model, family: str) -> bool:
    if family == "vit":
        return model.get_layer("stem_patch_conv").kernel_size[0] != 16
    if family == "vgg":
        return "stage5_down_maxpool" not in {layer.name for layer in model.layers}
    if family == "shufflenet":
        return model.get_layer("stem_conv").strides[0] == 1
    stem = "stem_1_conv" if family == "googlenet" else "stem_conv"
    return model.get_layer(stem).kernel_size[0] == 3


# --- name maps -------------------------------------------------------------------------


def _same(arrays):
    return list(arrays)


def _conv_to_keras(arrays):  # OIHW -> HWIO (grouped: O, I/groups, H, W -> H, W, I/groups, O)
    return [arrays[0].transpose(2, 3, 1, 0)]


def _conv_to_torch(arrays):
    return [arrays[0].transpose(3, 2, 0, 1)]


def _depthwise(arrays):  # (C, 1, H, W) <-> (H, W, C, 1): the same permutation both ways
    return [arrays[0].transpose(2, 3, 0, 1)]


def _linear(arrays):  # (out, in) <-> (in, out)
    return [arrays[0].T]


def _one(torch_name: str, keras_key: str, to_keras=_same, to_torch=_same) -> Rule:
    return Rule((torch_name,), (keras_key,), to_keras, to_torch)


def _layer_rules(layer, prefix: str) -> list[Rule] | None:
    """The rules of one Keras layer whose PyTorch module is `prefix` (None: unknown type)."""
    import keras

    from pipeline.models.layers import ClassToken, PositionEmbedding

    name = layer.name
    bias = [_one(f"{prefix}.bias", f"{name}/bias")] if getattr(layer, "use_bias", False) else []
    if type(layer) is keras.layers.Conv2D:
        weight = _one(f"{prefix}.weight", f"{name}/kernel", _conv_to_keras, _conv_to_torch)
        return [weight, *bias]
    if type(layer) is keras.layers.DepthwiseConv2D:
        return [_one(f"{prefix}.weight", f"{name}/kernel", _depthwise, _depthwise), *bias]
    if type(layer) is keras.layers.Dense:
        return [_one(f"{prefix}.weight", f"{name}/kernel", _linear, _linear), *bias]
    if type(layer) is keras.layers.BatchNormalization:
        return [
            _one(f"{prefix}.{t}", f"{name}/{k}")
            for t, k in (
                ("weight", "gamma"),
                ("bias", "beta"),
                ("running_mean", "moving_mean"),
                ("running_var", "moving_variance"),
            )
        ]
    if type(layer) is keras.layers.LayerNormalization:
        return [_one(f"{prefix}.weight", f"{name}/gamma"), _one(f"{prefix}.bias", f"{name}/beta")]
    if type(layer) is keras.layers.MultiHeadAttention:
        return _attention_rules(layer, prefix)
    if isinstance(layer, PositionEmbedding):
        return [_one(prefix, f"{name}/embedding")]
    if isinstance(layer, ClassToken):
        return [_one(prefix, f"{name}/token")]
    return None


def _attention_rules(layer, prefix: str) -> list[Rule]:
    """timm's fused qkv (3 * heads * head_dim, dim) and proj <-> MultiHeadAttention's
    query/key/value kernels (dim, heads, head_dim), biases (heads, head_dim), output."""
    name = layer.name
    heads, head_dim = layer.num_heads, layer.key_dim

    def qkv_to_keras(arrays):
        weight, bias = arrays
        dim = weight.shape[1]
        kernels = weight.reshape(3, heads, head_dim, dim).transpose(0, 3, 1, 2)
        biases = bias.reshape(3, heads, head_dim)
        return [a for i in range(3) for a in (kernels[i], biases[i])]

    def qkv_to_torch(arrays):
        kernels, biases = arrays[0::2], arrays[1::2]
        dim = kernels[0].shape[0]
        weight = np.concatenate([k.reshape(dim, heads * head_dim).T for k in kernels])
        return [weight, np.concatenate([b.reshape(-1) for b in biases])]

    keys = tuple(f"{name}/{p}/{v}" for p in ("query", "key", "value") for v in ("kernel", "bias"))
    qkv = Rule((f"{prefix}.qkv.weight", f"{prefix}.qkv.bias"), keys, qkv_to_keras, qkv_to_torch)
    proj = Rule(
        (f"{prefix}.proj.weight", f"{prefix}.proj.bias"),
        (f"{name}/attention_output/kernel", f"{name}/attention_output/bias"),
        lambda a: [a[0].T.reshape(heads, head_dim, -1), a[1]],
        lambda a: [a[0].reshape(heads * head_dim, -1).T, a[1]],
    )
    return [qkv, proj]


def _resnet_name(layer: str) -> str | None:
    match = re.fullmatch(r"stage(\d+)_block(\d+)_(\d|proj)_(conv|bn)", layer)
    if match:
        stage, block, part, kind = match.groups()
        base = f"layer{stage}.{int(block) - 1}"
        if part == "proj":
            return f"{base}.downsample.{0 if kind == 'conv' else 1}"
        return f"{base}.{kind}{part}"
    return {"stem_conv": "conv1", "stem_bn": "bn1", HEAD: "fc"}.get(layer)


GOOGLENET_BRANCHES = {
    "1x1": "branch1",
    "3x3_reduce": "branch2.0",
    "3x3": "branch2.1",
    "branch3_reduce": "branch3.0",
    "branch3": "branch3.1",
    "pool_proj": "branch4.1",
}


def _googlenet_name(layer: str) -> str | None:
    match = re.fullmatch(r"stage(\d)_([a-e])_(\w+?)_(conv|bn)", layer)
    if match and match.group(3) in GOOGLENET_BRANCHES:
        stage, letter, branch, kind = match.groups()
        return f"inception{stage}{letter}.{GOOGLENET_BRANCHES[branch]}.{kind}"
    match = re.fullmatch(r"stem_(\d)_(conv|bn)", layer)
    if match:
        return f"conv{match.group(1)}.{match.group(2)}"
    return "fc" if layer == HEAD else None


SHUFFLENET_PARTS = {
    ("branch1_dw", "dwconv"): "branch1.0",
    ("branch1_dw", "bn"): "branch1.1",
    ("branch1_1x1", "conv"): "branch1.2",
    ("branch1_1x1", "bn"): "branch1.3",
    ("branch2_1x1a", "conv"): "branch2.0",
    ("branch2_1x1a", "bn"): "branch2.1",
    ("branch2_dw", "dwconv"): "branch2.3",
    ("branch2_dw", "bn"): "branch2.4",
    ("branch2_1x1b", "conv"): "branch2.5",
    ("branch2_1x1b", "bn"): "branch2.6",
}


def _shufflenet_name(layer: str) -> str | None:
    match = re.fullmatch(r"stage(\d)_unit(\d+)_(branch[12]_\w+?)_(dwconv|conv|bn)", layer)
    if match:
        stage, unit, part, kind = match.groups()
        # torchvision numbers its stages 2..4 (conv1 is the first)
        return f"stage{int(stage) + 1}.{int(unit) - 1}.{SHUFFLENET_PARTS[part, kind]}"
    return {
        "stem_conv": "conv1.0",
        "stem_bn": "conv1.1",
        "head_conv5_conv": "conv5.0",
        "head_conv5_bn": "conv5.1",
        HEAD: "fc",
    }.get(layer)


def _vit_name(layer: str) -> str | None:
    match = re.fullmatch(r"block(\d+)_(norm1|norm2|attn|mlp_fc1|mlp_fc2)", layer)
    if match:
        return f"blocks.{int(match.group(1)) - 1}.{match.group(2).replace('mlp_', 'mlp.')}"
    return {
        "stem_patch_conv": "patch_embed.proj",
        "stem_class_token": "cls_token",
        "stem_position": "pos_embed",
        "head_norm": "norm",
        HEAD: "head",
    }.get(layer)


ALEXNET_NAMES = {
    "stem_conv": "features.0",
    "stage1_conv": "features.3",
    "stage2_1_conv": "features.6",
    "stage2_2_conv": "features.8",
    "stage2_3_conv": "features.10",
    "head_fc1": "classifier.1",
    "head_fc2": "classifier.4",
    HEAD: "classifier.6",
}


def _vgg_names(arch: str, batch_norm: bool, layout: str) -> dict[str, str]:
    """torchvision's `features` indices (conv, [bn], relu per conv; a pool per stage) and
    the classifier's names (torchvision classifier.0/3/6, timm pre_logits.fc1/fc2, head.fc)."""
    from pipeline.models.classic import VGG_CONFIGS

    names, index = {}, 0
    for stage, widths in enumerate(VGG_CONFIGS[arch], start=1):
        for conv in range(1, len(widths) + 1):
            names[f"stage{stage}_{conv}_conv"] = f"features.{index}"
            if batch_norm:
                names[f"stage{stage}_{conv}_bn"] = f"features.{index + 1}"
            index += 3 if batch_norm else 2
        index += 1
    if layout == "timm":
        names.update({"head_fc1": "pre_logits.fc1", "head_fc2": "pre_logits.fc2", HEAD: "head.fc"})
    else:
        names.update({"head_fc1": "classifier.0", "head_fc2": "classifier.3", HEAD: "classifier.6"})
    return names


def _flattened_dense(layer, prefix: str, grid_shape, *, as_conv: bool) -> list[Rule]:
    """The first dense layer after a flatten: PyTorch flattens (C, H, W), Keras (H, W, C).
    `as_conv`: timm's VGG holds it as a conv whose kernel covers the whole map."""
    height, width, channels = grid_shape

    def to_keras(arrays):
        weight = arrays[0].reshape(-1, channels, height, width)
        return [weight.transpose(2, 3, 1, 0).reshape(height * width * channels, -1)]

    def to_torch(arrays):
        weight = arrays[0].reshape(height, width, channels, -1).transpose(3, 2, 0, 1)
        return [weight if as_conv else weight.reshape(weight.shape[0], -1)]

    name = layer.name
    return [
        Rule((f"{prefix}.weight",), (f"{name}/kernel",), to_keras, to_torch),
        _one(f"{prefix}.bias", f"{name}/bias"),
    ]


def _folded_conv_bias(conv_prefix: str, bn_layer: str, bn_prefix: str) -> Rule:
    """torchvision's VGG-BN convs have a bias, which batch norm at inference subtracts
    again with its running mean: the bias folds into moving_mean (exported as zero)."""
    return Rule(
        (f"{conv_prefix}.bias", f"{bn_prefix}.running_mean"),
        (f"{bn_layer}/moving_mean",),
        lambda a: [a[1] - a[0]],
        lambda a: [np.zeros_like(a[0]), a[0]],
    )


def layout_of(arch: str, names=None) -> str:
    """ "timm" or "torchvision": whose names a state dict with `names` uses (None: export)."""
    family = family_of(arch)
    if family == "vit":
        return "timm"
    if family == "vgg" and names and any(n.startswith(("pre_logits.", "head.fc.")) for n in names):
        return "timm"
    return "torchvision"


def rules_of(model, arch: str, names=None) -> list[Rule]:
    """Every Keras weight of `model` against its PyTorch tensors, in the model's layer order.

    `names`: the state dict's tensor names, which pick timm's or torchvision's VGG names
    and whether VGG-BN convs carry a bias to fold (None: torchvision's, for export).
    """
    import keras

    family = family_of(arch)
    layout = layout_of(arch, names)
    if family == "vgg":
        batch_norm = any(isinstance(x, keras.layers.BatchNormalization) for x in model.layers)
        table = _vgg_names(arch, batch_norm, layout)
        rename = table.get
    elif family == "alexnet":
        rename = ALEXNET_NAMES.get
    else:
        rename = {
            "resnet": _resnet_name,
            "googlenet": _googlenet_name,
            "shufflenet": _shufflenet_name,
            "vit": _vit_name,
        }[family]
    rules: list[Rule] = []
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = rename(layer.name)
        if family in ("vgg", "alexnet") and layer.name == "head_fc1":
            grid = tuple(model.get_layer("head_pool").output.shape[1:])
            rules += _flattened_dense(layer, prefix, grid, as_conv=layout == "timm")
            continue
        if family == "vgg" and layout == "timm" and layer.name == "head_fc2":
            rules += [
                Rule(
                    (f"{prefix}.weight",),
                    (f"{layer.name}/kernel",),
                    lambda a: [a[0].reshape(a[0].shape[:2]).T],
                    lambda a: [a[0].T[:, :, None, None]],
                ),
                _one(f"{prefix}.bias", f"{layer.name}/bias"),
            ]
            continue
        found = _layer_rules(layer, prefix) if prefix else None
        if found is None:
            raise ConfigError(
                f"model.pretrained: {arch}'s layer {layer.name} ({type(layer).__name__}) has "
                "no counterpart in the PyTorch weights"
            )
        if family == "vgg" and type(layer) is keras.layers.BatchNormalization:
            conv = layer.name.removesuffix("_bn") + "_conv"
            conv_bias = f"{rename(conv)}.bias"
            if names is None or conv_bias in names:
                folded = _folded_conv_bias(rename(conv), layer.name, prefix)
                found = [r for r in found if r.keras != folded.keras] + [folded]
        rules += found
    return rules


def _skipped(name: str, family: str) -> bool:
    """Tensors with no use at inference: batch-norm step counters, GoogLeNet's auxiliary
    classifiers (torchvision's googlenet weights carry them; training-only)."""
    if name.endswith("num_batches_tracked"):
        return True
    return family == "googlenet" and name.startswith(("aux1.", "aux2."))


# --- loading and exporting --------------------------------------------------------------


def _variables(model) -> dict[str, object]:
    """Every weight of `model` by "layer/variable" (MultiHeadAttention: "layer/query/kernel")."""
    found = {}
    for layer in model.layers:
        for variable in layer.weights:
            path = variable.path
            marker = f"{layer.name}/"
            key = marker + (path.split(marker, 1)[1] if marker in path else variable.name)
            found[key] = variable
    return found


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def load_state_dict(model, arch: str, state: Mapping[str, np.ndarray]) -> Imported:
    """Copy PyTorch `state` (`read_state_dict`) into `model`, built as `arch`.

    All or nothing: nothing is assigned unless every tensor has a place and every weight
    a tensor of the right shape. The head (`head_dense`) starts fresh when the file's
    class count differs or the file has no head.
    """

    family = family_of(arch)
    choices, width, small_input = settings_of(model, arch)
    check_importable(arch, choices=choices, width_multiplier=width, small_input=small_input)
    rules = rules_of(model, arch, set(state))
    variables = _variables(model)
    missing = [key for key in variables if key not in {k for r in rules for k in r.keras}]
    if missing:  # a layer type _layer_rules covers only in part
        raise ConfigError(f"model.pretrained: {arch}'s weight {missing[0]} has no PyTorch tensor")
    head_rules = [r for r in rules if _is_head(r)]
    fresh_head = _fresh_head(head_rules, state, variables, arch)
    assigned: dict[str, np.ndarray] = {}
    used: set[str] = set()
    state = dict(state)
    for rule in rules:
        if fresh_head and _is_head(rule):
            used.update(n for n in rule.torch if n in state)
            continue
        for name, want in zip(rule.torch, _torch_shapes(rule, variables), strict=True):
            if name not in state:
                raise ConfigError(
                    f"model.pretrained: the state dict has no {name} (for {arch}'s layer "
                    f"{rule.keras[0].split('/')[0]}){_hint(name, state, model, family)}"
                )
            state[name] = grayscale_stem(state[name], want)
            if tuple(state[name].shape) != want:
                raise ConfigError(
                    f"model.pretrained: {name} has shape {_shape(state[name].shape)} in the "
                    f"state dict, {arch}'s layer {rule.keras[0].split('/')[0]} needs "
                    f"{_shape(want)}{_hint(name, state, model, family)}"
                )
        values = rule.to_keras([state[n] for n in rule.torch])
        assigned.update(zip(rule.keras, values, strict=True))
        used.update(rule.torch)
    skipped = tuple(n for n in state if n not in used and _skipped(n, family))
    extra = [n for n in state if n not in used and n not in skipped]
    if extra:
        raise ConfigError(
            f"model.pretrained: tensor {extra[0]} {_shape(state[extra[0]].shape)} has no place "
            f"in {arch} ({len(extra)} unmatched){_hint(extra[0], state, model, family)}"
        )
    for key, value in assigned.items():
        variables[key].assign(np.asarray(value, dtype=variables[key].dtype))
    copied = tuple(dict.fromkeys(key.split("/")[0] for key in assigned))
    return Imported(copied, fresh_head, skipped, layout_of(arch, set(state)))


def grayscale_stem(tensor: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
    """An RGB stem kernel (O, 3, kH, kW) summed over its colours for a one-channel model
    (timm's `adapt_input_conv`): a grey image normalized with the mean of the RGB
    statistics (`blocks.input_scaling`) then meets the weights as its RGB copy would."""
    shape = tuple(tensor.shape)
    colours_only = (shape[0], *shape[2:]) == (want[0], *want[2:])
    if len(shape) == len(want) == 4 and shape[1] == 3 and want[1] == 1 and colours_only:
        return tensor.sum(axis=1, keepdims=True)
    return tensor


def _torch_shapes(rule: Rule, variables) -> list[tuple[int, ...]]:
    """The shapes PyTorch gives `rule`'s tensors, from views of zeros (no copy of a weight)."""
    zeros = [np.broadcast_to(np.float32(0), tuple(variables[k].shape)) for k in rule.keras]
    return [tuple(int(d) for d in a.shape) for a in rule.to_torch(zeros)]


def _is_head(rule: Rule) -> bool:
    return rule.keras[0].startswith(f"{HEAD}/")


def _fresh_head(head_rules: list[Rule], state, variables, arch: str) -> bool:
    """Whether the head starts fresh: the file has none, or it has another class count
    (the first axis of PyTorch's (classes, features) weight and (classes,) bias)."""

    names = [n for r in head_rules for n in r.torch]
    if not any(n in state for n in names):
        return True
    for rule in head_rules:
        for name, want in zip(rule.torch, _torch_shapes(rule, variables), strict=True):
            have = state.get(name)
            if have is None or have.shape == want:
                continue
            if have.shape[1:] != want[1:]:
                raise ConfigError(
                    f"model.pretrained: {name} has shape {_shape(have.shape)} in the state "
                    f"dict, {arch}'s {HEAD} needs {_shape(want)} (its input features "
                    "differ, not only the class count)"
                )
            return True
    return False


def _hint(name: str, state, model, family: str) -> str:
    """A clause saying which setting would fit the file, where its names tell."""
    import keras

    names = {layer.name for layer in model.layers}
    file_bn = any(n.endswith("running_mean") for n in state)
    model_bn = any(isinstance(x, keras.layers.BatchNormalization) for x in model.layers)
    if family == "vgg" and file_bn and not model_bn:
        return " (the weights have batch norm, vgg*_bn's: set model.norm batch)"
    if family == "vgg" and model_bn and not file_bn:
        return " (the weights have no batch norm: set model.norm none)"
    if "cls_token" in state and "stem_class_token" not in names:
        return " (the weights classify from a class token: set model.class_token true)"
    if "stem_class_token" in names and "cls_token" not in state:
        return " (the weights average their tokens: set model.class_token false)"
    if any(n.startswith("fc_norm.") for n in state):
        return (
            " (the weights normalize after pooling, timm's fc_norm; this zoo's average-pool "
            "ViT normalizes before it: only timm's fc_norm=False layout fits)"
        )
    if name == "pos_embed":
        return " (the weights are for another image size: prepare.image_size must match theirs)"
    return ""


def state_dict_of(model, arch: str) -> dict[str, np.ndarray]:
    """`model`'s weights under torchvision's names (timm's for ViTs), as PyTorch lays them
    out: what `torch.nn.Module.load_state_dict` of the same torchvision model takes
    (batch norms carry num_batches_tracked; VGG-BN convs a zero bias)."""
    import keras

    choices, width, small_input = settings_of(model, arch)
    check_importable(arch, choices=choices, width_multiplier=width, small_input=small_input)
    variables = _variables(model)
    state: dict[str, np.ndarray] = {}
    for rule in rules_of(model, arch):
        current = [keras.ops.convert_to_numpy(variables[k]) for k in rule.keras]
        for name, value in zip(rule.torch, rule.to_torch(current), strict=True):
            state[name] = np.ascontiguousarray(value, dtype=np.float32)
            if name.endswith(".running_var"):
                state[name.removesuffix("running_var") + "num_batches_tracked"] = np.array(0)
    return state
