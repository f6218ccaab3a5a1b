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
from conftest import SAME_CODE_AS_SIBLING

from pipeline.models.architectures import build_model, get_spec, list_models
from pipeline.tracking import logged_models, runs

NUM_CLASSES = 5
ON_JAX = keras.backend.backend() == "jax"


def zoo_params():
    """Every architecture; on CI's JAX pass not those running a sibling's code (they add
    minutes and no code path there). The TensorFlow pass builds every name."""
    for name in list_models():
        sibling = SAME_CODE_AS_SIBLING.get(name)
        skip = pytest.mark.skipif(ON_JAX, reason=f"same code as {sibling}; TensorFlow pass runs it")
        yield pytest.param(name, marks=[skip] if sibling else [])


def test_siblings_are_registered():
    names = set(list_models())
    assert set(SAME_CODE_AS_SIBLING) | set(SAME_CODE_AS_SIBLING.values()) <= names


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


@pytest.mark.parametrize("name", zoo_params())
def test_model_trains_saves_reloads_and_logs(name, store, tmp_path):
    side = max(32, get_spec(name).min_size)
    shape = (side, side, 3)
    model = build_model(
        name, shape, NUM_CLASSES, dropout=0.1, width_multiplier=0.5, small_input=True
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, *shape)).astype(np.float32)
    labels = np.arange(4) % NUM_CLASSES

    # TensorFlow: one eager step, since tracing a graph for a single step costs more
    # than it saves. JAX is the other way round: op-by-op dispatch compiles every
    # primitive, and one XLA compile of the whole step is 3x faster.
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        run_eagerly=not ON_JAX,
    )
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    loss = model.train_on_batch(images, labels)
    assert np.isfinite(loss)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))

    def predict(m):
        if ON_JAX:
            return m.predict_on_batch(images)
        return keras.ops.convert_to_numpy(m(images, training=False))

    probs = predict(model)
    assert probs.shape == (4, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)

    path = tmp_path / f"{name}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(predict(reloaded), probs, rtol=1e-4, atol=1e-5)

    with runs.training_run("zoo", run_name=name, params={"model.arch": name}, tags={}):
        card = {"classes": [f"c{i}" for i in range(NUM_CLASSES)], "image_shape": list(shape)}
        uri = logged_models.log_model(model, card=card)
    logged = logged_models.load_keras_model(uri)
    np.testing.assert_allclose(predict(logged), probs, rtol=1e-4, atol=1e-5)
    keras.backend.clear_session()
