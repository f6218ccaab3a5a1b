"""Regularization, stochastic depth, early stopping and transfer learning, in real training."""

from __future__ import annotations

from dataclasses import replace

import keras
import numpy as np
import pytest
from conftest import SHORT_TRAIN, TINY_MODEL

from pipeline.config import AugmentConfig, ModelConfig, TrainConfig, check_transfer
from pipeline.data.data_card import read_card
from pipeline.errors import ConfigError
from pipeline.models.architectures import build_model
from pipeline.models.from_config import check_model
from pipeline.models.layers import StochasticDepth
from pipeline.training import transfer
from pipeline.training.fit import compile_for_phase, fit_model
from pipeline.training.regularize import add_kernel_regularization, kernels

SMALL = TINY_MODEL
SHORT = replace(SHORT_TRAIN, epochs=2, warmup_epochs=0, schedule="constant")


def fit(prepared, tmp_path, model_cfg=SMALL, cfg=SHORT, **kwargs):
    return fit_model(
        model_cfg, cfg, prepared, read_card(prepared), checkpoint_dir=tmp_path / "ckpt", **kwargs
    )


# --------------------------------------------------------------------------- penalties


def test_l1_l2_penalties_are_added_to_the_loss_for_every_kernel():
    model = build_model("resnet18", (16, 16, 3), 5, width_multiplier=0.25)
    count = add_kernel_regularization(model, l1=1e-3, l2=1e-2)
    convs_and_dense = [
        la for la in model.layers if isinstance(la, keras.layers.Conv2D | keras.layers.Dense)
    ]
    assert count == len(kernels(model)) == len(convs_and_dense)
    weights = [keras.ops.convert_to_numpy(k) for k in kernels(model)]
    expected = sum(1e-3 * np.abs(w).sum() + 1e-2 * np.square(w).sum() for w in weights)
    got = sum(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses)
    assert got == pytest.approx(expected, rel=1e-4)


def test_max_norm_caps_each_units_incoming_weights_after_updates():
    model = build_model("simple_cnn", (16, 16, 1), 4, width_multiplier=0.25)
    add_kernel_regularization(model, max_norm=0.5)
    model.compile(optimizer=keras.optimizers.SGD(5.0), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 1)).astype("float32")
    model.fit(x, np.arange(8) % 4, epochs=2, verbose=0)
    for kernel in kernels(model):
        w = keras.ops.convert_to_numpy(kernel)
        norms = np.sqrt(np.square(w).reshape(-1, w.shape[-1]).sum(axis=0))
        assert norms.max() <= 0.5 + 1e-4, kernel.path


def test_label_smoothing_is_in_the_training_loss():
    model = build_model("simple_cnn", (16, 16, 1), 4, width_multiplier=0.25)
    compile_for_phase(model, replace(SHORT, label_smoothing=0.2), 10, {"num_classes": 4}, 0)
    perfect = np.eye(4, dtype="float32")
    loss = float(keras.ops.convert_to_numpy(model.loss(perfect, perfect * 0.999 + 0.00025)))
    assert loss > 0.2  # without smoothing it would be ~0.001


# --------------------------------------------------------------------------- stochastic depth


def test_stochastic_depth_drops_whole_samples_in_training_only():
    layer = StochasticDepth(0.5, seed=1)
    x = np.ones((64, 3, 3, 2), "float32")
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}  # dropped, or scaled by 1 / keep
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d", "vit_tiny"])
def test_drop_path_adds_stochastic_depth_rising_to_the_rate(arch):
    plain = build_model(arch, (32, 32, 3), 5, width_multiplier=0.25)
    dropped = build_model(arch, (32, 32, 3), 5, width_multiplier=0.25, drop_path=0.2)

    def rates(model):
        return [la.rate for la in model.layers if isinstance(la, StochasticDepth)]

    assert not rates(plain)
    got = [r for r in rates(dropped) if r > 0]
    assert got and max(got) == pytest.approx(0.2, rel=0.05)
    assert plain.count_params() == dropped.count_params()


def test_drop_path_is_refused_for_families_without_residual_blocks():
    with pytest.raises(ConfigError, match="model.drop_path applies to"):
        check_model(ModelConfig(arch="vgg11", drop_path=0.1))


# --------------------------------------------------------------------------- training stage


def test_operator_choices_and_drop_path_reach_the_trained_model(digits_prepared, tmp_path):
    model_cfg = replace(SMALL, padding="reflect", activation="gelu")
    model = fit(
        digits_prepared,
        tmp_path,
        model_cfg=model_cfg,
        cfg=replace(SHORT, epochs=1),
    ).model
    names = [type(layer).__name__ for layer in model.layers]
    assert "Pad2D" in names
    assert any(
        getattr(la, "activation", None) is keras.activations.gelu for la in model.layers
    ) or any(la.get_config().get("activation") == "gelu" for la in model.layers)


def test_early_stopping_stops_and_restores_the_best_epoch(digits_prepared, tmp_path):
    # A constant rate this high makes validation loss bounce instead of settling.
    cfg = replace(
        SHORT,
        epochs=20,
        optimizer="sgd",
        learning_rate=3.0,
        schedule="constant",
        early_stopping_patience=2,
        early_stopping_monitor="val_loss",
    )
    result = fit(digits_prepared, tmp_path, cfg=cfg)
    assert result.stopped_early
    epochs = result.history["epoch"]
    assert len(epochs) < 20
    val = np.array(result.history["val_loss"])
    best = int(np.nanargmin(val))
    assert len(epochs) == best + 1 + 2  # patience epochs after the best one


def test_augmented_training_runs_and_still_learns(digits_prepared, tmp_path):
    aug = AugmentConfig(translate=0.1, mixup_alpha=0.2, cutmix_alpha=0.5, mix_prob=0.5)
    result = fit(
        digits_prepared,
        tmp_path,
        cfg=replace(SHORT, epochs=3, label_smoothing=0.1),
        augment_cfg=aug,
    )
    assert result.history["val_accuracy"][-1] > 0.5


# --------------------------------------------------------------------------- transfer learning


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
    """A simple_cnn for 5 classes saved as .keras: another task than digits' 10 classes."""
    keras.utils.set_random_seed(3)
    model = build_model("simple_cnn", (16, 16, 1), 5, width_multiplier=0.25)
    path = tmp_path_factory.mktemp("source") / "source.keras"
    model.save(path)
    return path, {
        la.name: [w.copy() for w in la.get_weights()] for la in model.layers if la.weights
    }


def backbone_unchanged(model, source_weights) -> dict[str, bool]:
    return {
        layer.name: all(
            np.array_equal(a, b)
            for a, b in zip(layer.get_weights(), source_weights[layer.name], strict=True)
        )
        for layer in transfer.backbone_layers(model)
    }


def test_init_from_copies_the_backbone_and_retrains_another_head(
    digits_prepared, tmp_path, source_model
):
    path, source_weights = source_model
    cfg = replace(SHORT, epochs=1, init_from=str(path), finetune="frozen")
    result = fit(digits_prepared, tmp_path, cfg=cfg)
    assert result.transferred_layers == len(transfer.backbone_layers(result.model))
    # frozen: the backbone (BatchNorm statistics included) is exactly the source's
    assert all(backbone_unchanged(result.model, source_weights).values())
    assert result.model.get_layer("head_dense").get_weights()[0].shape[-1] == 10


def test_progressive_unfreezing_trains_the_top_groups_first(
    digits_prepared, tmp_path, source_model
):
    path, source_weights = source_model
    # head only in epoch 1, then the top half: the bottom half never trains in 2 epochs
    cfg = replace(
        SHORT,
        epochs=2,
        init_from=str(path),
        finetune="progressive",
        unfreeze_every=1,
        unfreeze_groups=2,
    )
    assert [(p.start, p.end, p.unfrozen) for p in transfer.phases(cfg)] == [(0, 1, 0), (1, 2, 1)]
    result = fit(digits_prepared, tmp_path, cfg=cfg)
    unchanged = list(backbone_unchanged(result.model, source_weights).values())
    half = len(unchanged) - len(unchanged) // 2
    assert all(unchanged[:half]) and not any(unchanged[half:])
    assert result.history["epoch"] == [1, 2]


def test_full_fine_tuning_with_a_smaller_backbone_rate(digits_prepared, tmp_path, source_model):
    path, source_weights = source_model
    cfg = replace(SHORT, epochs=1, init_from=str(path), backbone_lr_scale=0.1)
    result = fit(digits_prepared, tmp_path, cfg=cfg)
    assert not any(backbone_unchanged(result.model, source_weights).values())


def test_phases_of_each_finetune_mode():
    full = TrainConfig(epochs=5)
    assert [(p.start, p.end) for p in transfer.phases(full)] == [(0, 5)]
    frozen = TrainConfig(epochs=5, init_from="x.keras", finetune="frozen")
    assert [(p.start, p.end, p.unfrozen) for p in transfer.phases(frozen)] == [(0, 5, 0)]
    progressive = TrainConfig(
        epochs=7, init_from="x.keras", finetune="progressive", unfreeze_every=2, unfreeze_groups=2
    )
    assert [(p.start, p.end, p.unfrozen) for p in transfer.phases(progressive)] == [
        (0, 2, 0),
        (2, 4, 1),
        (4, 7, 2),
    ]


def test_bad_init_from_names_the_key(digits_prepared, tmp_path):
    with pytest.raises(ConfigError, match="train.init_from"):
        fit(digits_prepared, tmp_path, cfg=replace(SHORT, init_from=str(tmp_path / "nope.keras")))
    with pytest.raises(ConfigError, match="train.finetune: frozen needs weights to start from"):
        check_transfer(ModelConfig(), TrainConfig(finetune="frozen"))
    check_transfer(ModelConfig(pretrained="w.pth"), TrainConfig(finetune="frozen"))
    with pytest.raises(ConfigError, match="train.init_from and model.pretrained both"):
        check_transfer(ModelConfig(pretrained="w.pth"), TrainConfig(init_from="m.keras"))


def test_train_stage_refuses_a_missing_init_from_before_any_run(digits_prepared, tmp_path):
    import shutil

    import yaml
    from conftest import ROOT, run_cli

    shutil.copytree(digits_prepared, tmp_path / "data" / "prepared")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["init_from"] = "missing.keras"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = run_cli(["train"], tmp_path)
    assert done.returncode == 2
    assert "train.init_from: missing.keras not found" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no run was started
    assert not (tmp_path / "data" / "model").exists()
