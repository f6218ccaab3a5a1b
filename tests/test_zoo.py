"""Every registered architecture, one parametrized test (timm's way).

Each model builds at a small size, trains one step on CPU, survives a `.keras`
save and safe-mode reload, and is logged to MLflow and loaded back from it
(the pyfunc wrapper around it is exercised end to end in test_e2e).
CI runs this file on the TensorFlow backend and again with KERAS_BACKEND=jax.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline import tracking
from pipeline.models.registry import build_model, get_spec, list_models

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (the default store of a temp project)."""
    root = tmp_path_factory.mktemp("zoo-store")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield root
    mp.undo()
    import os

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it


@pytest.mark.parametrize("name", list_models())
def test_model_trains_saves_reloads_and_logs(name, store, tmp_path):
    side = max(32, get_spec(name).min_size)
    shape = (side, side, 3)
    model = build_model(
        name, shape, NUM_CLASSES, dropout=0.1, width_multiplier=0.5, small_input=True
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, *shape)).astype(np.float32)
    labels = np.arange(4) % NUM_CLASSES

    # One eager step: tracing a graph for a single step costs far more than it saves.
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        run_eagerly=True,
    )
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    loss = model.train_on_batch(images, labels)
    assert np.isfinite(loss)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))

    def predict(m):
        return keras.ops.convert_to_numpy(m(images, training=False))

    probs = predict(model)
    assert probs.shape == (4, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)

    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(predict(reloaded), probs, rtol=1e-4, atol=1e-5)

    import mlflow

    with tracking.training_run("zoo", run_name=name, params={"model.arch": name}, tags={}):
        uri = tracking.log_model(model, input_shape=shape, num_classes=NUM_CLASSES)
    logged = mlflow.keras.load_model(uri)
    np.testing.assert_allclose(predict(logged), probs, rtol=1e-4, atol=1e-5)
    keras.backend.clear_session()
