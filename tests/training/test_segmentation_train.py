"""Segmentation training on real (small) data: digit scenes, joint augmentation, the stages."""

from __future__ import annotations

from dataclasses import replace

import keras
import numpy as np
import pytest

from pipeline.config import AugmentConfig, FetchConfig, ModelConfig, PrepareConfig, TrainConfig
from pipeline.data.data_card import read_card
from pipeline.data.decode import VOID
from pipeline.errors import ConfigError
from pipeline.stages import fetch, prepare
from pipeline.training.augment import MaskAugmenter
from pipeline.training.fit import fit_model

UNET = ModelConfig(arch="unet", width_multiplier=0.25, dropout=0.0)
SHORT = TrainConfig(epochs=3, batch_size=32, warmup_epochs=1, learning_rate=0.01, loss="ce_dice")


@pytest.fixture(scope="module")
def scenes_prepared(tmp_path_factory):
    """Digit scenes fetched and prepared at 32x32x1."""
    base = tmp_path_factory.mktemp("scenes")
    fetch.run(FetchConfig(source="digit_scenes"), base / "raw")
    prepare.run(PrepareConfig(image_size=32, channels=1), base / "raw", base / "prepared")
    return base / "prepared"


def test_unet_learns_digit_scenes_and_logs_miou(scenes_prepared, tmp_path):
    card = read_card(scenes_prepared)
    result = fit_model(UNET, SHORT, scenes_prepared, card, checkpoint_dir=tmp_path / "ckpt")
    history = result.history
    assert {"train_miou", "val_miou", "train_loss", "val_loss"} <= set(history)
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["val_miou"][-1] > history["val_miou"][0]
    assert result.model.output.shape[1:] == (32, 32, card["num_classes"])


def test_joint_augmentation_keeps_image_and_mask_aligned(scenes_prepared):
    from pipeline.data.loader import load_split

    images, masks = load_split(scenes_prepared, "train")
    images, masks = np.asarray(images[:16], np.float32), np.asarray(masks[:16])
    augment = MaskAugmenter(AugmentConfig(flip=True, zoom=0.3, crop_padding=2), VOID, seed=1)
    out_images, out_masks = augment(images, masks, epoch=0, index=0)
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert not np.array_equal(out_masks, masks)
    # Nearest neighbour only: no value that was not a class or void appears.
    assert set(np.unique(out_masks)) <= set(np.unique(masks)) | {VOID}

    # Digit ink stays under its label: labelled digit pixels are as often bright in the
    # image as before (a mask moved without its image would drop this to chance).
    def bright_under_ink(images, masks):
        ink = (masks > 0) & (masks != VOID)
        return np.mean(images[..., 0][ink] > 100)

    before = bright_under_ink(images, masks)
    assert bright_under_ink(out_images, out_masks) > before - 0.03
    assert bright_under_ink(out_images, out_masks[:, :, ::-1]) < before - 0.3
    again_images, again_masks = augment(images, masks, epoch=0, index=0)
    np.testing.assert_array_equal(again_masks, out_masks)  # a function of (seed, epoch, batch)


def test_classification_only_knobs_are_refused_for_segmentation(scenes_prepared, tmp_path):
    from pipeline.config import MlflowConfig
    from pipeline.stages.train import run

    bad = [
        (UNET, replace(SHORT, label_smoothing=0.1), AugmentConfig(), "label_smoothing"),
        (UNET, SHORT, AugmentConfig(mixup_alpha=0.2), "mixup_alpha"),
        (UNET, SHORT, AugmentConfig(rotate=10), "augment.rotate"),
        (ModelConfig(), SHORT, AugmentConfig(), "does not fit task: segmentation"),
    ]
    for model_cfg, train_cfg, augment_cfg, message in bad:
        with pytest.raises(ConfigError, match=message):
            run(
                model_cfg,
                train_cfg,
                MlflowConfig(),
                augment_cfg=augment_cfg,
                prepared_dir=scenes_prepared,
                out_dir=tmp_path / "model",
                task="segmentation",
            )
    with pytest.raises(ConfigError, match="holds segmentation data"):
        run(UNET, SHORT, MlflowConfig(), prepared_dir=scenes_prepared, task="classification")
    assert not (tmp_path / "model").exists()
    keras.backend.clear_session()


def test_frozen_finetune_trains_the_decoder_on_a_classifiers_encoder(scenes_prepared, tmp_path):
    """init_from a ResNet-18 classifier: its weights seed the U-Net's encoder, which
    `finetune: frozen` keeps as they were while the decoder learns."""
    from pipeline.models.architectures import build_model
    from pipeline.training import transfer

    classifier = build_model("resnet18", (32, 32, 1), 5, width_multiplier=0.25, small_input=False)
    classifier.save(tmp_path / "classifier.keras")
    source = {la.name: la.get_weights() for la in classifier.layers if la.weights}
    cfg = replace(SHORT, epochs=2, init_from=str(tmp_path / "classifier.keras"), finetune="frozen")
    model_cfg = ModelConfig(arch="unet", encoder="resnet18", width_multiplier=0.25)
    card = read_card(scenes_prepared)
    result = fit_model(model_cfg, cfg, scenes_prepared, card, checkpoint_dir=tmp_path / "ckpt")

    encoder = transfer.backbone_layers(result.model)
    assert encoder and all(layer.name in source for layer in encoder)
    assert result.transferred_layers == len(encoder)
    for layer in encoder:  # BatchNorm statistics included
        for got, want in zip(layer.get_weights(), source[layer.name], strict=True):
            np.testing.assert_array_equal(got, want)
    decoder = [la for la in result.model.layers if la.weights and transfer.is_head(la)]
    assert {la.name for la in decoder} >= {"dec0_conv1_conv", "seg_head_conv"}
    # the encoder did not move, so the decoder is what learned
    assert result.history["train_loss"][1] < result.history["train_loss"][0]
    keras.backend.clear_session()
