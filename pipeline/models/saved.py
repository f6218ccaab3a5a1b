"""The trained model as a file: `data/model/model.keras`, saved for inference and loaded
in Keras's safe mode with the zoo's custom layers known."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import read_keras_model
from pipeline.layout import MODEL_DIR

MODEL_FILE = "model.keras"


def inference_copy(model):
    """`model` without its optimizer and compile config: what is saved and served.

    Smaller (no optimizer slots) and loadable anywhere: the training loss, optimizer
    and schedule may be classes of this package (SegmentationLoss, differential
    learning rates, one-cycle). Rebuilt from its config, not `clone_model`, which
    compiles the clone like the original.
    """
    import keras

    copy = keras.Model.from_config(model.get_config())
    for layer, source in zip(copy.layers, model.layers, strict=True):
        set_layer_weights(layer, source.get_weights())
    return copy


def set_layer_weights(layer, arrays) -> None:
    """`layer.set_weights`, then the state a layer derives from its variables: a
    Normalization layer computes with new statistics only after `finalize_state`
    (Keras's own loaders call it; `set_weights` does not)."""
    layer.set_weights(arrays)
    if hasattr(layer, "finalize_state"):
        layer.finalize_state()


def model_summary(model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=110)
    return "\n".join(lines)


def load_trained_model(model_dir: Path = MODEL_DIR):
    """The trained Keras model, loaded in safe mode (no code from the file runs); a missing
    or damaged file is a DataError naming it."""
    return load_keras_file(model_dir / MODEL_FILE)


def load_keras_file(path: Path):
    """A `.keras` file of this project, in safe mode, with the zoo's custom layers known.

    Safe mode refuses a file that carries Python code (a Lambda layer's bytecode) before
    any of it runs; that, and a missing, cut or garbled file, is a one-line DataError
    naming the file (`pipeline.artifacts`).
    """
    import pipeline.models.layers  # noqa: F401  registers the zoo's custom layers

    return read_keras_model(path)
