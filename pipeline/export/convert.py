"""The Keras model as a file other runtimes load, through Keras's own exporters
(`model.export`): ONNX (tf2onnx on TensorFlow, jax2onnx on JAX), LiteRT (TensorFlow's
converter; TensorFlow backend only) and a TensorFlow SavedModel.

Every copy takes what the Keras model takes, float32 pixels 0..255 of the data card's
(height, width, channels) with any batch size, and does its own scaling (the serving
preprocessing is inside the model); decoding and resizing stay with the caller
(`data.decode.to_model_input`). A classifier's copy answers `logits` and
`probabilities`; a segmentation model's the same per pixel. The exporters need a
float32 policy, so a model trained in mixed precision is rebuilt in float32 first.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError

FORMATS = ("onnx", "litert", "saved_model")
SUFFIXES = {"onnx": ".onnx", "litert": ".tflite", "saved_model": ""}
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")


def check_format(fmt: str, backend: str) -> None:
    """LiteRT and SavedModel are TensorFlow's: refused on another backend, in one line."""
    if fmt in ("litert", "saved_model") and backend != "tensorflow":
        raise ConfigError(
            f"export --format {fmt} needs Keras's TensorFlow backend (KERAS_BACKEND={backend} "
            "here); use --format onnx, or KERAS_BACKEND=tensorflow"
        )


def float32_copy(model):
    """`model` rebuilt with every layer's dtype policy float32, its weights cast."""
    import keras
    import numpy as np

    config = _float32_config(model.get_config())
    copy = keras.Model.from_config(config)
    for layer, source in zip(copy.layers, model.layers, strict=True):
        weights = source.get_weights()
        layer.set_weights([np.asarray(w, np.float32) if _floating(w) else w for w in weights])
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()
    return copy


def _floating(array) -> bool:
    import numpy as np

    return np.issubdtype(np.asarray(array).dtype, np.floating)


def _float32_config(config):
    """The config with each `dtype` policy that computes in 16 bits made float32."""
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and _mixed(value):
                out[key] = "float32"
            else:
                out[key] = _float32_config(value)
        return out
    if isinstance(config, list):
        return [_float32_config(item) for item in config]
    return config


def _mixed(dtype) -> bool:
    name = dtype.get("config", {}).get("name", "") if isinstance(dtype, dict) else str(dtype)
    return "16" in str(name)


def with_logits(model):
    """A model answering {"logits", "probabilities"}: the input of the final softmax
    (`probs`, which every builder of the zoo ends with) beside its output."""
    import keras

    probs = model.get_layer("probs")
    two = keras.Model(
        model.inputs, {"logits": probs.input, "probabilities": model.output}, name=model.name
    )
    # Keras's exporters read the input signature of a model that has been called
    shape = [1, *model.input_shape[1:]]
    two(keras.ops.zeros(shape, "float32"))
    return two


def export(model, fmt: str, path: Path, *, litert_options: dict | None = None) -> Path:
    """Write `model` (float32, `with_logits`) as `fmt` to `path`; return the path."""
    import keras

    check_format(fmt, keras.backend.backend())
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        model.export(str(path), format="onnx", verbose=False)
        name_onnx_io(path)
    elif fmt == "litert":
        model.export(str(path), format="litert", verbose=False, **(litert_options or {}))
    else:
        model.export(str(path), format="tf_saved_model", verbose=False)
    return path


def name_onnx_io(path: Path) -> None:
    """The ONNX graph's input named `image` and outputs `logits` and `probabilities`, on
    either exporter (tf2onnx and jax2onnx name them after internal tensors), with a
    symbolic batch dimension."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    (graph_input,) = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    old = graph_input.name
    for node in graph.node:
        node.input[:] = [INPUT_NAME if name == old else name for name in node.input]
    graph_input.name = INPUT_NAME
    graph_input.type.tensor_type.shape.dim[0].dim_param = "batch"
    outputs = list(graph.output)
    if len(outputs) != len(OUTPUT_NAMES):
        raise RuntimeError(f"{path}: {len(outputs)} outputs, expected logits and probabilities")
    # jax2onnx and tf2onnx both keep the sorted order of the output dict's keys
    for output, name in zip(outputs, OUTPUT_NAMES, strict=True):
        for node in graph.node:
            node.output[:] = [name if out == output.name else out for out in node.output]
            node.input[:] = [name if inp == output.name else inp for inp in node.input]
        output.name = name
        if output.type.tensor_type.shape.dim:
            output.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(model, str(path))


def size_bytes(path: Path) -> int:
    """The file's size, or a SavedModel folder's total."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
