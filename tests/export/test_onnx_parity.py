"""ONNX copies of zoo models answer as Keras does, on the backend running the tests
(tf2onnx on TensorFlow, jax2onnx on JAX): logits within 1e-5 of their scale, the same
top class for every image, the input and output names `export` documents."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.export import agreement, convert, runtimes
from pipeline.models.architectures import build_model

JAX = keras.backend.backend() == "jax"
ARCHS = [
    pytest.param(
        "simple_cnn",
        marks=pytest.mark.xfail(
            JAX,
            reason="jax2onnx 0.17 writes max pooling as a 4-D MaxPool ONNX Runtime refuses",
            strict=True,
        ),
    ),
    "resnet18",
    "mobilenet_v2",
    "efficientnet_b0",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_copy_matches_keras(arch, tmp_path):
    keras.utils.set_random_seed(0)
    model = convert.with_logits(convert.float32_copy(build_model(arch, (32, 32, 3), 10)))
    path = convert.export(model, "onnx", tmp_path / "model.onnx")
    run = runtimes.runner("onnx", path)
    images = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros(len(images), np.int64)
    scale = float(np.abs(model.predict_on_batch(images[:16].astype(np.float32))["logits"]).max())
    measured = agreement.measure(model, run, images, labels, batch_size=16)
    assert measured["max_abs_logit_diff"] <= 1e-5 * max(1.0, scale), (measured, scale)
    assert measured["top1_disagreements"] == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    # any batch size: the first dimension is symbolic
    assert run(images[:3].astype(np.float32))["probabilities"].shape == (3, 10)


def test_a_mixed_precision_model_is_exported_in_float32(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_model("simple_cnn", (16, 16, 1), 4, width_multiplier=0.25)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in mixed.layers)
    copy = convert.float32_copy(mixed)
    assert all(layer.dtype_policy.name == "float32" for layer in copy.layers)
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(
        copy.predict_on_batch(images), mixed.predict_on_batch(images), atol=0.05
    )
