"""`model.pretrained` as a user meets it: what is refused (one line naming the key), which
input scaling the weights bring, where a file comes from (path, URL, cache) and that a
bad one stops train before any MLflow run. The loaders' parity with PyTorch and Keras is
tested in test_torch_weights.py and test_pretrained_applications.py."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.models import pretrained
from pipeline.models.from_config import build, check_model


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"arch": "resnet18", "pretrained": "imagenet"},
            "Keras has no ImageNet weights for resnet18",
        ),
        ({"arch": "resnet18", "pretrained": "w.h5"}, "resnet18 takes a PyTorch state dict"),
        ({"arch": "densenet121", "pretrained": "w.pth"}, "densenet121 takes a Keras weights file"),
        ({"arch": "resnet18", "pretrained": "model.keras"}, "with train.init_from"),
        ({"arch": "simple_cnn", "pretrained": "w.pth"}, "simple_cnn has no published weights"),
        ({"arch": "unet", "pretrained": "w.pth"}, "the plain U-Net has no pretrained weights"),
        ({"arch": "resnet18", "class_token": True}, "model.class_token applies to vision"),
        ({"arch": "resnet18", "pretrained": "w.pth"}, "model.small_input true: resnet18's"),
        (
            {"arch": "resnet18", "pretrained": "w.pth", "small_input": False, "norm": "group"},
            "model.norm group",
        ),
        (
            {
                "arch": "resnet50",
                "pretrained": "w.pth",
                "small_input": False,
                "width_multiplier": 2,
            },
            "model.width_multiplier 2",
        ),
        (
            {"arch": "mobilenet_v2", "pretrained": "imagenet", "width_multiplier": 0.6},
            "model.width_multiplier 0.6: Keras has ImageNet weights for mobilenet_v2 at",
        ),
    ],
)
def test_weights_a_model_cannot_take_are_refused_naming_the_key(settings, message):
    with pytest.raises(ConfigError, match=message) as caught:
        check_model(ModelConfig(**settings))
    assert str(caught.value).startswith("model.")
    assert "\n" not in str(caught.value)


def test_pretrained_must_be_a_path_not_a_file_url_or_blank():
    with pytest.raises(ConfigError, match="model.pretrained"):
        ModelConfig(pretrained="file:///tmp/w.pth")
    with pytest.raises(ConfigError, match="model.pretrained must be none, imagenet"):
        ModelConfig(pretrained=" ")


@pytest.mark.parametrize(
    ("settings", "norm"),
    [
        ({"arch": "resnet18"}, "unit"),
        ({"arch": "resnet18", "pretrained": "w.pth"}, "imagenet"),
        ({"arch": "resnet18", "pretrained": "w.pth", "input_norm": "symmetric"}, "symmetric"),
        ({"arch": "unet", "encoder": "resnet18", "pretrained": "w.safetensors"}, "imagenet"),
        ({"arch": "vit_tiny", "pretrained": "w.safetensors"}, "symmetric"),  # timm's augreg
        ({"arch": "densenet121", "pretrained": "imagenet"}, "imagenet"),
        ({"arch": "mobilenet_v2", "pretrained": "imagenet"}, "symmetric"),
        ({"arch": "vgg16", "pretrained": "imagenet"}, "caffe"),
    ],
)
def test_the_weights_choose_the_input_scaling(settings, norm):
    assert pretrained.input_norm(ModelConfig(**settings)) == norm


def test_the_built_model_scales_pixels_inside_itself():
    """ImageNet scaling is a layer of the model: 0..255 in, (x/255 - mean)/std at the first conv."""
    import keras

    model = build(ModelConfig(arch="resnet18", pretrained="w.pth"), (32, 32, 3), 10)
    scaled = keras.Model(model.input, model.get_layer("rescale").output)
    pixels = np.broadcast_to(np.array([0, 128, 255], dtype="float32"), (1, 32, 32, 3))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = (np.array([0, 128, 255]) / 255 - mean) / std
    np.testing.assert_allclose(scaled.predict(pixels, verbose=0)[0, 0, 0], expected, rtol=1e-5)


def test_a_missing_file_is_refused_naming_it(tmp_path):
    cfg = ModelConfig(arch="resnet18", small_input=False, pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match=r"model.pretrained: .*nope.pth not found"):
        pretrained.resolve(cfg, (32, 32, 3))


def test_a_url_is_downloaded_once_into_the_cache_with_its_digest(server, tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    body = b"not really weights, but bytes to fetch"
    (server.root / "w.safetensors").write_bytes(body)
    cfg = ModelConfig(arch="resnet18", small_input=False, pretrained=f"{server.url}/w.safetensors")
    first = pretrained.resolve(cfg, (32, 32, 3))
    assert first.path.read_bytes() == body and first.kind == "torch"
    assert first.sha256 == hashlib.sha256(body).hexdigest()
    assert first.path.is_relative_to(tmp_path / "cache")
    (server.root / "w.safetensors").unlink()  # the second run reads the cache
    assert pretrained.resolve(cfg, (32, 32, 3)) == first


def test_an_unreachable_url_is_one_line(server, tmp_path, monkeypatch):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    cfg = ModelConfig(arch="resnet18", small_input=False, pretrained=f"{server.url}/gone.pth")
    with pytest.raises(ConfigError, match="model.pretrained: cannot download .*gone.pth"):
        pretrained.resolve(cfg, (32, 32, 3))
    assert not list((tmp_path / "cache").rglob("gone.pth"))  # nothing half-written kept


def test_train_refuses_a_bad_weights_file_before_any_run(digits_prepared, tmp_path):
    import shutil

    import yaml
    from conftest import ROOT, run_cli

    shutil.copytree(digits_prepared, tmp_path / "data" / "prepared")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(arch="resnet18", small_input=False, pretrained="missing.pth")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = run_cli(["train"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("model.pretrained: missing.pth not found")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no run was started
    assert not (tmp_path / "data" / "model").exists()


def test_train_offline_without_cached_imagenet_weights_says_where_to_put_them(tmp_path):
    """Offline and nothing in the Keras cache: one line naming the cache file and its URL,
    exit 2, before any MLflow run (this machine has no internet)."""
    from conftest import archive_project, run_cli

    project, _ = archive_project(
        tmp_path,
        ("cat", "dog"),
        {
            "prepare.image_size": 32,
            "prepare.channels": 3,
            "model.arch": "densenet121",
            "model.pretrained": "imagenet",
            "train.batch_size": 4,
        },
    )
    keras_home = tmp_path / "keras-home"
    for stage in ("fetch", "prepare"):
        assert run_cli([stage], project).returncode == 0
    done = run_cli(["train"], project, KERAS_HOME=str(keras_home))
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "model.pretrained imagenet" in last
    assert (
        str(keras_home / "models" / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5")
        in last
    )
    assert "https://" in last
    assert "Traceback" not in done.stderr
    assert not (project / "mlflow.db").exists() and not (project / "data" / "model").exists()


def resnet18_file(tmp_path, seed: int = 0):
    """(model, file): a random RGB ResNet-18 at the ImageNet layout and its state dict as
    .safetensors, in torchvision's names (what a torchvision checkpoint holds)."""
    import keras
    from safetensors.numpy import save_file

    from pipeline.models.architectures import build_model
    from pipeline.models.torch_weights import state_dict_of

    keras.utils.set_random_seed(seed)
    model = build_model("resnet18", (32, 32, 3), 1000, small_input=False, input_norm="imagenet")
    path = tmp_path / "resnet18.safetensors"
    save_file(
        {k: np.ascontiguousarray(v) for k, v in state_dict_of(model, "resnet18").items()}, path
    )
    return model, path


def test_rgb_weights_start_a_grayscale_model_with_their_stem_summed(tmp_path):
    """Digits are grey: the RGB stem kernel is summed over its colours (timm's rule)."""
    from pipeline.models.architectures import build_model
    from pipeline.models.torch_weights import load_state_dict, read_state_dict

    rgb, path = resnet18_file(tmp_path)
    grey = build_model("resnet18", (32, 32, 1), 10, small_input=False, input_norm="imagenet")
    imported = load_state_dict(grey, "resnet18", read_state_dict(path))
    assert imported.fresh_head
    stem = rgb.get_layer("stem_conv").get_weights()[0]
    np.testing.assert_allclose(
        grey.get_layer("stem_conv").get_weights()[0], stem.sum(axis=2, keepdims=True), rtol=1e-6
    )
    block = "stage2_block1_1_conv"
    np.testing.assert_array_equal(
        grey.get_layer(block).get_weights()[0], rgb.get_layer(block).get_weights()[0]
    )


def test_a_segmentation_encoder_starts_from_the_weights_and_frozen_keeps_them(tmp_path):
    """U-Net on a ResNet-18 encoder from a state dict, `finetune: frozen` for an epoch: the
    encoder holds the file's weights and BatchNorm statistics (frozen = inference mode)."""
    from pipeline.config import FetchConfig, PrepareConfig, TrainConfig
    from pipeline.data.data_card import read_card
    from pipeline.stages import fetch, prepare
    from pipeline.training.fit import fit_model

    source, path = resnet18_file(tmp_path)
    fetch.run(FetchConfig(source="digit_scenes"), tmp_path / "raw")
    prepare.run(PrepareConfig(image_size=32, channels=3), tmp_path / "raw", tmp_path / "prepared")
    model_cfg = ModelConfig(arch="unet", encoder="resnet18", dropout=0.0, pretrained=str(path))
    cfg = TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, finetune="frozen", loss="ce")
    card = read_card(tmp_path / "prepared")
    result = fit_model(model_cfg, cfg, tmp_path / "prepared", card, checkpoint_dir=tmp_path / "c")
    assert result.transferred_layers == 40  # every conv and norm of the encoder
    for name in ("stem_conv", "stem_bn", "stage4_block2_2_conv", "stage4_block2_2_bn"):
        for got, want in zip(
            result.model.get_layer(name).get_weights(),
            source.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
