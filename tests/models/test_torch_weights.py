"""PyTorch state dicts into the hand-written families (models.torch_weights).

Parity is the test a user trusts: a timm model with random weights (and random
batch-norm statistics) is saved to a file, imported, and the Keras logits on a
batch of 0..255 pixels equal timm's (eval mode) on the same batch normalized as
its transforms do, to 1e-4 of the logits' scale. timm has no GoogLeNet or
ShuffleNet v2 (and torchvision cannot be installed here), so those, AlexNet and
VGG-13 are tested by a round trip through a file (state_dict_of -> file -> load).
The parity tests need torch and timm and skip without them; the round trips
need only safetensors.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.models.architectures import build_model
from pipeline.models.blocks import IMAGENET_MEAN, IMAGENET_STD, LayerChoices
from pipeline.models.torch_weights import (
    TORCH_FAMILIES,
    check_importable,
    importable,
    load_state_dict,
    read_state_dict,
    state_dict_of,
)

TOLERANCE = 1e-4  # of max |PyTorch logit|, float32


@pytest.fixture(autouse=True)
def fresh_session():
    yield
    keras.backend.clear_session()
    gc.collect()


def needs_torch():
    return pytest.importorskip(
        "torch", reason="torch is not installed (pip install torch: the CPU wheel)"
    )


def needs_timm():
    needs_torch()
    from pipeline.tools.bench import torchvision_stand_in

    torchvision_stand_in.install()  # timm imports torchvision, which cannot be installed here
    return pytest.importorskip("timm", reason="timm is not installed (pip install --no-deps timm)")


def needs_safetensors():
    return pytest.importorskip(
        "safetensors.numpy", reason="safetensors is not installed (pip install safetensors)"
    )


def pixels(side: int, n: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3)).astype(np.float32)


def logits(model, x) -> np.ndarray:
    """The head_dense output: the logits before the softmax."""
    return keras.ops.convert_to_numpy(
        keras.Model(model.input, model.get_layer("head_dense").output)(x)
    )


def randomize_torch(module, seed: int = 0) -> None:
    """Non-trivial values where timm's init leaves constants: batch-norm weights and
    statistics (the last norm of each block starts at zero), LayerNorm, ViT's tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for name, p in module.named_parameters():
            if name in ("cls_token", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def randomize_keras(model, seed: int = 0) -> None:
    """Every weight random (variances positive), so that a round trip compares real values."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if variable.path.endswith("moving_variance"):
            value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            value = (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(0.1)
        variable.assign(value)


def save(state: dict, path: Path) -> Path:
    """A state dict file as PyTorch users write one: torch.save, or safetensors."""
    if path.suffix == ".safetensors":
        needs_safetensors().save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    else:
        import torch

        torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}, path)
    return path


# --- parity with timm ------------------------------------------------------------------

# (arch, timm name, side, input norm, timm kwargs, build kwargs, file suffix)
PARITY = [
    ("resnet18", "resnet18", 64, "imagenet", {}, {}, ".pth"),
    ("resnet50", "resnet50", 64, "imagenet", {}, {}, ".safetensors"),
    ("resnext50_32x4d", "resnext50_32x4d", 64, "imagenet", {}, {}, ".pth"),
    # the smallest side whose last map is 7x7: the classifier's 7x7 cells are all real
    ("vgg11", "vgg11_bn", 224, "imagenet", {}, {}, ".pth"),
    # timm's vit_tiny_patch16_224 weights (augreg) take [-1, 1] pixels
    (
        "vit_tiny",
        "vit_tiny_patch16_224",
        64,
        "symmetric",
        {"img_size": 64},
        {"class_token": True},
        ".safetensors",
    ),
    (
        "vit_tiny",
        "vit_tiny_patch16_224",
        64,
        "symmetric",
        {"img_size": 64, "class_token": False, "global_pool": "avg", "fc_norm": False},
        {},
        ".pth",
    ),
]


@pytest.mark.parametrize(
    ("arch", "timm_name", "side", "norm", "timm_kwargs", "build_kwargs", "suffix"),
    PARITY,
    ids=[f"{p[0]}-{p[1]}{'-gap' if 'global_pool' in p[4] else ''}" for p in PARITY],
)
def test_parity_with_timm(
    arch, timm_name, side, norm, timm_kwargs, build_kwargs, suffix, tmp_path, capsys
):
    timm = needs_timm()
    import torch

    classes = 7
    torch.manual_seed(0)  # timm's initialization: the same model on every run
    reference = timm.create_model(timm_name, pretrained=False, num_classes=classes, **timm_kwargs)
    reference.eval()
    randomize_torch(reference)
    x = pixels(side)
    if norm == "imagenet":
        mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
        normalized = (x / 255 - mean) / std
    else:
        normalized = x / 127.5 - 1
    with torch.no_grad():
        expected = reference(torch.from_numpy(normalized.transpose(0, 3, 1, 2).copy())).numpy()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        path = tmp_path / f"w{suffix}"
        save_file(reference.state_dict(), path)
    else:
        path = tmp_path / f"w{suffix}"
        torch.save(reference.state_dict(), path)
    del reference
    gc.collect()

    model = build_model(
        arch, (side, side, 3), classes, small_input=False, input_norm=norm, **build_kwargs
    )
    imported = load_state_dict(model, arch, read_state_dict(path))
    assert not imported.fresh_head
    assert "head_dense" in imported.copied
    got = logits(model, x)
    relative = float(np.abs(got - expected).max() / np.abs(expected).max())
    with capsys.disabled():
        print(f"\nparity {arch} <- timm {timm_name} ({side}x{side}): {relative:.1e} relative")
    assert relative <= TOLERANCE


# --- parity with torchvision, where it imports ----------------------------------------

# (arch, torchvision module, constructor, kwargs, side, build choices)
TORCHVISION = [
    ("googlenet", "googlenet", "GoogLeNet", {"aux_logits": True, "init_weights": True}, 64, {}),
    ("shufflenet_v2", "shufflenetv2", "shufflenet_v2_x1_0", {}, 64, {}),
    ("alexnet", "alexnet", "AlexNet", {}, 64, {"norm": "none"}),
    ("vgg13", "vgg", "vgg13_bn", {}, 64, {}),
    ("resnet34", "resnet", "resnet34", {}, 64, {}),
]


@pytest.mark.parametrize(
    ("arch", "module", "constructor", "kwargs", "side", "choices"),
    TORCHVISION,
    ids=[t[0] for t in TORCHVISION],
)
def test_parity_with_torchvision(arch, module, constructor, kwargs, side, choices, capsys):
    """Import from torchvision's own model, and export back into it (strict names).

    torchvision has no CPU wheel for this torch, so CI skips this; where it imports
    (a CUDA machine with a matching torchvision) it runs. GoogLeNet's state dict
    carries its auxiliary classifiers (skipped); transform_input stays off, as the
    importer maps the network itself (its weights want input_norm symmetric).
    """
    import importlib

    needs_torch()
    import torch

    from pipeline.tools.bench import torchvision_stand_in

    try:
        models = importlib.import_module(f"torchvision.models.{module}")
    except Exception as exc:  # noqa: BLE001 - any failure means no usable torchvision
        pytest.skip(f"torchvision does not import here ({type(exc).__name__})")
    if torchvision_stand_in.active():
        pytest.skip("torchvision is the bench's stand-in here (no real torchvision)")
    torch.manual_seed(0)
    reference = getattr(models, constructor)(num_classes=7, **kwargs).eval()
    randomize_torch(reference)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = build_model(
        arch,
        (side, side, 3),
        7,
        small_input=False,
        input_norm="imagenet",
        choices=LayerChoices(**choices),
    )
    imported = load_state_dict(model, arch, state)
    x = pixels(side)
    normalized = (x / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    batch = torch.from_numpy(normalized.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = reference(batch).numpy()
    got = logits(model, x)
    relative = float(np.abs(got - expected).max() / np.abs(expected).max())
    if arch == "googlenet":
        assert any(n.startswith("aux1.") for n in imported.skipped)
        reference.aux1 = reference.aux2 = None
        reference.aux_logits = False
    exported = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict_of(model, arch).items()}
    reference.load_state_dict(exported, strict=True)
    with torch.no_grad():
        back = reference(batch).numpy()
    with capsys.disabled():
        print(f"\nparity {arch} <- torchvision {constructor} ({side}x{side}): {relative:.1e}")
    assert relative <= TOLERANCE
    np.testing.assert_allclose(back, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# --- round trips where timm lacks the family -------------------------------------------

ROUND_TRIPS = [
    ("googlenet", 64, LayerChoices()),
    ("shufflenet_v2", 64, LayerChoices()),
    ("alexnet", 64, LayerChoices(norm="none")),  # torchvision's AlexNet has no batch norm
]


@pytest.mark.parametrize(
    ("arch", "side", "choices"), ROUND_TRIPS, ids=[f"{a}-{c.norm}" for a, _, c in ROUND_TRIPS]
)
def test_round_trip_through_a_state_dict_file(arch, side, choices, tmp_path):
    needs_safetensors()
    shape = (side, side, 3)
    first = build_model(arch, shape, 5, small_input=False, choices=choices)
    randomize_keras(first, seed=0)
    path = save(state_dict_of(first, arch), tmp_path / "w.safetensors")
    second = build_model(arch, shape, 5, small_input=False, choices=choices)
    randomize_keras(second, seed=1)
    imported = load_state_dict(second, arch, read_state_dict(path))
    assert not imported.fresh_head and imported.layout == "torchvision"
    assert all(
        np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for a, b in zip(first.weights, second.weights, strict=True)
    )
    x = pixels(side)
    np.testing.assert_allclose(logits(second, x), logits(first, x), rtol=1e-6, atol=1e-6)


def test_export_uses_torchvision_names_and_layouts():
    model = build_model("googlenet", (64, 64, 3), 5, small_input=False)
    state = state_dict_of(model, "googlenet")
    assert state["conv1.conv.weight"].shape == (64, 3, 7, 7)  # OIHW
    assert state["inception5b.branch4.1.conv.weight"].shape == (128, 832, 1, 1)
    assert state["fc.weight"].shape == (5, 1024)  # (out, in)
    assert int(state["conv1.bn.num_batches_tracked"]) == 0
    shuffle = state_dict_of(
        build_model("shufflenet_v2", (64, 64, 3), 5, small_input=False), "shufflenet_v2"
    )
    assert shuffle["stage2.0.branch1.0.weight"].shape == (24, 1, 3, 3)  # depthwise
    assert shuffle["conv5.0.weight"].shape == (1024, 464, 1, 1)


def test_vgg13_round_trip_timm_layout_and_folded_conv_bias(tmp_path):
    """VGG-13 (vgg13_bn) through a file; the same weights under timm's names (pre_logits
    fc1/fc2 as convs, head.fc) with a conv bias, which batch norm at inference subtracts
    again: bias b with running mean m + b equals no bias with m. One model pair for all,
    as each holds 129M parameters (the 7x7x512 -> 4096 classifier)."""
    needs_safetensors()
    first = build_model("vgg13", (32, 32, 3), 4, small_input=False)
    randomize_keras(first)
    state = state_dict_of(first, "vgg13")
    path = save(state, tmp_path / "w.safetensors")
    second = build_model("vgg13", (32, 32, 3), 4, small_input=False)
    assert load_state_dict(second, "vgg13", read_state_dict(path)).layout == "torchvision"
    assert all(
        np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for a, b in zip(first.weights, second.weights, strict=True)
    )
    x = pixels(32)
    expected = logits(first, x)
    np.testing.assert_allclose(logits(second, x), expected, rtol=1e-6, atol=1e-6)

    timm = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    timm["pre_logits.fc1.weight"] = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
    timm["pre_logits.fc1.bias"] = state["classifier.0.bias"]
    timm["pre_logits.fc2.weight"] = state["classifier.3.weight"][:, :, None, None]
    timm["pre_logits.fc2.bias"] = state["classifier.3.bias"]
    timm["head.fc.weight"] = state["classifier.6.weight"]
    timm["head.fc.bias"] = state["classifier.6.bias"]
    bias = np.random.default_rng(3).normal(0, 0.5, 64).astype(np.float32)
    timm["features.0.bias"] = bias
    timm["features.1.running_mean"] = state["features.1.running_mean"] + bias
    randomize_keras(second, seed=2)
    assert load_state_dict(second, "vgg13", timm).layout == "timm"
    np.testing.assert_allclose(logits(second, x), expected, rtol=1e-5, atol=1e-5)

    plain = {
        k: v for k, v in state.items() if k.startswith("classifier.") or k.endswith("0.weight")
    }
    with pytest.raises(ConfigError, match="the weights have no batch norm: set model.norm none"):
        load_state_dict(second, "vgg13", plain)


# --- refusals --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_state() -> dict:
    model = build_model("resnet18", (32, 32, 3), 3, small_input=False)
    randomize_keras(model)
    return state_dict_of(model, "resnet18")


def resnet(classes: int = 3, **options):
    return build_model("resnet18", (32, 32, 3), classes, small_input=False, **options)


def test_an_extra_tensor_is_refused_by_name(resnet_state):
    state = {**resnet_state, "layer5.0.conv1.weight": np.zeros((8, 8, 3, 3), np.float32)}
    with pytest.raises(ConfigError, match=r"tensor layer5\.0\.conv1\.weight \(8, 8, 3, 3\)"):
        load_state_dict(resnet(), "resnet18", state)


def test_a_missing_tensor_is_refused_by_name(resnet_state):
    state = {k: v for k, v in resnet_state.items() if k != "layer2.0.downsample.1.running_var"}
    with pytest.raises(ConfigError, match=r"no layer2\.0\.downsample\.1\.running_var"):
        load_state_dict(resnet(), "resnet18", state)


def test_a_mis_shaped_tensor_is_refused_and_nothing_is_copied(resnet_state):
    model = resnet()
    before = [keras.ops.convert_to_numpy(w) for w in model.weights]
    state = {**resnet_state, "layer3.1.conv2.weight": np.zeros((256, 256, 1, 1), np.float32)}
    with pytest.raises(
        ConfigError,
        match=r"layer3\.1\.conv2\.weight has shape \(256, 256, 1, 1\).*\(256, 256, 3, 3\)",
    ):
        load_state_dict(model, "resnet18", state)
    for a, b in zip(before, model.weights, strict=True):  # all or nothing
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))


def test_another_class_count_leaves_only_the_head_fresh(resnet_state):
    model = resnet(classes=10)
    head = [keras.ops.convert_to_numpy(w) for w in model.get_layer("head_dense").weights]
    imported = load_state_dict(model, "resnet18", resnet_state)
    assert imported.fresh_head
    assert "head_dense" not in imported.copied and "stem_conv" in imported.copied
    for a, b in zip(head, model.get_layer("head_dense").weights, strict=True):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))
    kernel = keras.ops.convert_to_numpy(model.get_layer("stage4_block2_2_conv").kernel)
    np.testing.assert_array_equal(
        kernel, resnet_state["layer4.1.conv2.weight"].transpose(2, 3, 1, 0)
    )
    headless = {k: v for k, v in resnet_state.items() if not k.startswith("fc.")}
    assert load_state_dict(resnet(), "resnet18", headless).fresh_head  # timm's num_classes=0
    # a head whose input features differ is a mismatch, not a fresh head
    state = {**resnet_state, "fc.weight": np.zeros((3, 256), np.float32)}
    with pytest.raises(ConfigError, match=r"fc\.weight has shape \(3, 256\)"):
        load_state_dict(resnet(), "resnet18", state)


def test_an_arch_without_a_map_is_refused_naming_those_with_one(resnet_state):
    model = build_model("simple_cnn", (32, 32, 3), 3)
    with pytest.raises(ConfigError, match="simple_cnn has no map from PyTorch weights") as info:
        load_state_dict(model, "simple_cnn", resnet_state)
    assert "resnet18" in str(info.value) and "vit_tiny" in str(info.value)
    assert not importable("simple_cnn") and importable("googlenet")
    assert set(TORCH_FAMILIES) >= {"resnet152", "vgg13", "alexnet", "shufflenet_v2", "vit_small"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"choices": LayerChoices(activation="gelu")}, "model.activation gelu"),
        ({"choices": LayerChoices(padding="reflect")}, "model.padding reflect"),
        ({"choices": LayerChoices(conv="separable")}, "model.conv separable"),
        ({"choices": LayerChoices(norm="group")}, "model.norm group"),
        ({"choices": LayerChoices(head="max_avg")}, "model.head max_avg"),
        ({"width_multiplier": 0.5}, "model.width_multiplier 0.5"),
    ],
)
def test_settings_the_weights_cannot_fit_are_refused(options, message, resnet_state):
    with pytest.raises(ConfigError, match=message):
        load_state_dict(resnet(**options), "resnet18", resnet_state)


def test_small_input_is_refused_where_the_stem_cannot_take_the_kernel(resnet_state):
    small = build_model("resnet18", (32, 32, 3), 3, small_input=True)
    with pytest.raises(ConfigError, match="model.small_input true: .*3x3 conv.*7x7 stem kernel"):
        load_state_dict(small, "resnet18", resnet_state)
    # VGG and ShuffleNet take torchvision's kernels with it (no last pool, stride-1 stem)
    check_importable("vgg11", small_input=True)
    check_importable("shufflenet_v2", small_input=True, width_multiplier=0.5)
    with pytest.raises(ConfigError, match="model.width_multiplier 0.75"):
        check_importable("shufflenet_v2", width_multiplier=0.75)


def test_alexnet_needs_norm_none():
    with pytest.raises(ConfigError, match="model.norm batch: torchvision's alexnet has no batch"):
        check_importable("alexnet", choices=LayerChoices())
    check_importable("alexnet", choices=LayerChoices(norm="none"))
    check_importable("vgg11", choices=LayerChoices(norm="none"))


def test_vit_class_token_mismatch_names_the_setting():
    with_token = build_model("vit_tiny", (32, 32, 3), 3, small_input=False, class_token=True)
    state = state_dict_of(with_token, "vit_tiny")
    assert state["cls_token"].shape == (1, 1, 192) and state["pos_embed"].shape == (1, 5, 192)
    assert state["blocks.0.attn.qkv.weight"].shape == (576, 192)
    without = build_model("vit_tiny", (32, 32, 3), 3, small_input=False)
    with pytest.raises(ConfigError, match="set model.class_token true"):
        load_state_dict(without, "vit_tiny", state)
    pooled = state_dict_of(without, "vit_tiny")
    after = {
        k.replace("norm.", "fc_norm.") if k.startswith("norm.") else k: v for k, v in pooled.items()
    }
    with pytest.raises(ConfigError, match=r"no norm\.weight .*timm's fc_norm"):
        load_state_dict(without, "vit_tiny", after)
    larger = build_model("vit_tiny", (64, 64, 3), 3, small_input=False)
    with pytest.raises(ConfigError, match=r"pos_embed has shape \(1, 4, 192\).*image size"):
        load_state_dict(larger, "vit_tiny", pooled)


# --- reading files ---------------------------------------------------------------------


def test_checkpoint_wrappers_and_ddp_prefixes_are_unwrapped(resnet_state, tmp_path):
    needs_torch()
    import torch

    wrapped = {"module." + k: torch.as_tensor(v) for k, v in resnet_state.items()}
    torch.save({"epoch": 3, "state_dict": wrapped}, tmp_path / "ckpt.pth")
    state = read_state_dict(tmp_path / "ckpt.pth")
    assert list(state) == list(resnet_state)
    torch.save(
        {"model": {k: torch.as_tensor(v) for k, v in resnet_state.items()}}, tmp_path / "m.pt"
    )
    load_state_dict(resnet(), "resnet18", read_state_dict(tmp_path / "m.pt"))


def test_a_file_that_is_not_a_state_dict_is_refused_naming_it(tmp_path):
    needs_torch()
    import torch

    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match=r"list\.pth is not a state dict .*holds a list"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"weights": torch.zeros(2), "step": 4}, tmp_path / "mixed.pth")
    with pytest.raises(
        ConfigError, match=r"mixed\.pth is not a state dict .*'step' is a int, not a tensor"
    ):
        read_state_dict(tmp_path / "mixed.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, no state dict
    with pytest.raises(ConfigError, match=r"module\.pth is not a readable PyTorch state dict"):
        read_state_dict(tmp_path / "module.pth")
    (tmp_path / "text.safetensors").write_text("not tensors")
    with pytest.raises(ConfigError, match=r"text\.safetensors is not a readable \.safetensors"):
        read_state_dict(tmp_path / "text.safetensors")
    with pytest.raises(ConfigError, match=r"w\.npz is neither a PyTorch checkpoint"):
        read_state_dict(tmp_path / "w.npz")


def test_without_torch_a_pth_is_one_line_and_safetensors_still_read(resnet_state, tmp_path):
    """A real interpreter in which `import torch` fails (sys.modules entry None)."""
    needs_safetensors()
    save(resnet_state, tmp_path / "w.safetensors")
    (tmp_path / "w.pth").write_bytes(b"")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pipeline.errors import ConfigError\n"
        "from pipeline.models.torch_weights import read_state_dict\n"
        f"print(len(read_state_dict({str(tmp_path / 'w.safetensors')!r})))\n"
        f"try:\n    read_state_dict({str(tmp_path / 'w.pth')!r})\n"
        "except ConfigError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    count, message = done.stdout.strip().splitlines()
    assert int(count) == len(resnet_state)
    assert message == (
        f"model.pretrained: {tmp_path / 'w.pth'} is a PyTorch checkpoint: install torch "
        "(pip install torch) or convert it to .safetensors"
    )
