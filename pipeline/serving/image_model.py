"""The model as logged and registered: a pyfunc that carries its own preprocessing.

A client sends images as they are, not tensors: encoded PNG/JPEG/... bytes
(column `image`; base64 strings in JSON, which MLflow's server decodes) or pixel
arrays of any size (column `array`: nested lists of 0-255 values, (H, W),
(H, W, 1), (H, W, 3) or (H, W, 4)). Every image is decoded and resized exactly as
`prepare` did for training (`to_model_input`). The Keras model rescales itself.

A classifier answers one row per image: `class`, `probability`, `top5` and
`top5_probabilities` (names, best first) and `probabilities` (class name ->
probability). A segmentation model answers `mask`, the class index of every
pixel at the image's own size (nearest-neighbour resize back), and
`classes_present`, the names of the classes in it.

The model folder holds the Keras file, the data card (classes, input size,
task) and a copy of the package modules it runs (`code/pipeline`, SERVED_FILES),
so the served model needs keras, its backend, numpy, pandas and pillow, not this
project installed.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

# The package files the served model runs, copied into the logged model (its whole
# import closure: tests/test_layout.py checks it), so serving needs no trainer code.
SERVED_FILES = (
    "__init__.py",
    "artifacts.py",
    "errors.py",
    "layout.py",
    "data/__init__.py",
    "data/decode.py",
    "models/__init__.py",
    "models/layers.py",
    "models/saved.py",
    "serving/__init__.py",
    "serving/image_model.py",
    "serving/outputs.py",
    "serving/served_model.py",
)
KERAS_ARTIFACT = "keras_model"
CARD_ARTIFACT = "data_card"
IMAGE_COLUMN, ARRAY_COLUMN = "image", "array"


class ImageModel(mlflow.pyfunc.PythonModel):
    """Images in, class names (or masks) out; see the module docstring for the columns."""

    def load_context(self, context) -> None:
        from pipeline.artifacts import read_json
        from pipeline.models.saved import load_keras_file

        self.keras_model = load_keras_file(Path(context.artifacts[KERAS_ARTIFACT]))
        self.card = read_json(Path(context.artifacts[CARD_ARTIFACT]))  # damaged: named

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        from pipeline.data.decode import to_model_input
        from pipeline.serving.outputs import ranked

        images = input_images(model_input)
        height, width, channels = self.card["image_shape"]
        batch = np.stack([to_model_input(image, (height, width), channels) for image in images])
        probs = np.asarray(self.keras_model.predict_on_batch(batch.astype(np.float32)))
        classes = self.card["classes"]
        if self.card.get("task") == "segmentation":
            rows = [
                segmentation_row(p, image, classes) for p, image in zip(probs, images, strict=True)
            ]
        else:
            rows = [ranked(p, classes) for p in probs]
        return pd.DataFrame(rows)


def input_images(model_input) -> list:
    """The request's images, each a PIL image: from a DataFrame with an `image`
    (bytes) or `array` (pixels) column, or a dict of such lists (the `inputs` JSON form)."""
    from mlflow.exceptions import MlflowException

    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame) or not len(model_input):
        raise MlflowException.invalid_parameter_value(
            f"send images in a column {IMAGE_COLUMN!r} (encoded bytes, base64 in JSON) "
            f"or {ARRAY_COLUMN!r} (pixel arrays)"
        )
    images = []
    for i, row in enumerate(model_input.to_dict("records")):
        encoded, pixels = row.get(IMAGE_COLUMN), row.get(ARRAY_COLUMN)
        if _present(encoded):
            images.append(_decode(encoded, i))
        elif _present(pixels):
            images.append(_from_array(pixels, i))
        else:
            raise MlflowException.invalid_parameter_value(
                f"row {i}: neither {IMAGE_COLUMN!r} nor {ARRAY_COLUMN!r} is set"
            )
    return images


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float):
        return not np.isnan(value)  # pandas fills a missing cell with NaN
    return True


def _decode(encoded, row: int):
    """Encoded bytes as a PIL image. Base64 that MLflow left encoded (the `inputs` JSON
    form, or no schema) is decoded here."""
    import base64
    import binascii

    from mlflow.exceptions import MlflowException
    from PIL import Image, UnidentifiedImageError

    data = encoded.encode("ascii", "replace") if isinstance(encoded, str) else bytes(encoded)
    candidates = [data]
    with contextlib.suppress(binascii.Error, ValueError):
        candidates.append(base64.b64decode(data, validate=False))
    for candidate in candidates:
        try:
            image = Image.open(io.BytesIO(candidate))
            image.load()
            return image
        except Image.DecompressionBombError as exc:
            raise MlflowException.invalid_parameter_value(f"row {row}: {exc}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            reason = exc.__class__.__name__
    raise MlflowException.invalid_parameter_value(
        f"row {row}: {IMAGE_COLUMN!r} is not a decodable image ({reason})"
    )


def _from_array(pixels, row: int):
    from mlflow.exceptions import MlflowException
    from PIL import Image

    try:
        array = np.asarray(pixels)
    except ValueError:  # ragged nested lists
        array = np.asarray([], dtype=object)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
    if not shape_ok or array.dtype.kind not in "uif" or not array.size:
        raise MlflowException.invalid_parameter_value(
            f"row {row}: {ARRAY_COLUMN!r} must be (H, W) or (H, W, 1|3|4) numbers 0-255, "
            f"got shape {array.shape} of {array.dtype}"
        )
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def segmentation_row(prob: np.ndarray, image, classes: list[str]) -> dict[str, Any]:
    from pipeline.serving.outputs import mask_at_size

    mask = mask_at_size(prob, image.size)
    return {
        "mask": mask.astype(int).tolist(),
        "classes_present": [classes[i] for i in np.unique(mask)],
    }


def signature(card: dict):
    """Inputs: `image` (binary) or `array` (any); outputs as the module docstring says."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Map, Schema

    inputs = Schema(
        [
            ColSpec(DataType.binary, IMAGE_COLUMN, required=False),
            ColSpec(AnyType(), ARRAY_COLUMN, required=False),
        ]
    )
    if card.get("task") == "segmentation":
        outputs = [
            ColSpec(Array(Array(DataType.long)), "mask"),
            ColSpec(Array(DataType.string), "classes_present"),
        ]
    else:
        outputs = [
            ColSpec(DataType.string, "class"),
            ColSpec(DataType.double, "probability"),
            ColSpec(Array(DataType.string), "top5"),
            ColSpec(Array(DataType.double), "top5_probabilities"),
            ColSpec(Map(DataType.double), "probabilities"),
        ]
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))
