"""`python -m pipeline export`: a trained model as ONNX, LiteRT or a TensorFlow SavedModel,
float32 and, with `--quantize`, int8 beside it; each copy checked against Keras.

The output folder (replaced whole) holds the float32 copy (`model.onnx`,
`model.tflite` or `saved_model/`), the quantized one (`model.int8.onnx`, ...), the
model's data card (classes, input size) and `export.json`: for each copy its size
and its agreement with the Keras model over the prepared test split (largest logit
and probability difference, top-1 agreement, both top-1s). ONNX copies are logged
to the model's run with MLflow's onnx flavor, the others as artifacts, with those
figures as metrics. docs/export.md has the details.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.layout import PREPARED_DIR

EXPORT_FILE = "export.json"
DEFAULT_CALIBRATION = 256


def run(
    out: Path,
    *,
    model_uri: str | None = None,
    fmt: str = "onnx",
    quantize: str = "none",
    calibration: int = DEFAULT_CALIBRATION,
    prepared_dir: Path = PREPARED_DIR,
    log: bool = True,
) -> dict:
    """Export, check and log the model; return export.json's content."""
    import keras

    from pipeline.atomic import atomic_dir, write_json
    from pipeline.data.loader import load_split
    from pipeline.export import agreement, convert, runtimes
    from pipeline.export.quantize import quantized_copy
    from pipeline.redact import masked
    from pipeline.tracking import evaluations, logged_models, runs

    check_options(fmt, quantize, calibration, keras.backend.backend())
    key = "export --model"
    if model_uri is None:
        model_uri = runs.read_run_file()["model_uri"]
    model, card = logged_models.load_logged_model(model_uri, key=key)
    check_prepared(card, prepared_dir)
    ref = evaluations.resolve(model_uri, key=key, then="nothing was exported") if log else None
    test_images, test_labels = load_split(prepared_dir, "test")
    calibration_images = None
    if quantize == "int8":
        calibration_images = calibration_set(prepared_dir, calibration)
    source = convert.with_logits(convert.float32_copy(model))
    copies = {}
    with atomic_dir(out) as tmp:
        name = "model" + convert.SUFFIXES[fmt] if fmt != "saved_model" else "saved_model"
        float_path = convert.export(source, fmt, tmp / name)
        copies["float32"] = float_path
        if quantize != "none":
            copies[quantize] = quantized_copy(source, fmt, quantize, float_path, calibration_images)
        write_json(tmp / "data_card.json", masked(card))
        figures = {}
        for precision, path in copies.items():
            with runtime_errors(fmt, path, keras.backend.backend()):
                measured = agreement.measure(
                    source, runtimes.runner(fmt, path), test_images, test_labels
                )
            figures[precision] = {
                "file": path.name,
                "size_bytes": convert.size_bytes(path),
                **measured,
            }
        float_size = figures["float32"]["size_bytes"]
        for entry in figures.values():
            entry["size_vs_float32"] = entry["size_bytes"] / float_size
        result = {
            "model_uri": model_uri,
            "format": fmt,
            "backend": keras.backend.backend(),
            "quantize": quantize,
            "calibration_images": 0 if calibration_images is None else len(calibration_images),
            "input": {"name": convert.INPUT_NAME, "shape": [None, *card["image_shape"]]},
            "outputs": list(convert.OUTPUT_NAMES),
            "copies": figures,
        }
        write_json(tmp / EXPORT_FILE, result)
    if log:
        files = {precision: out / path.name for precision, path in copies.items()}
        result["logged"] = evaluations.log_export(ref, fmt, files, result, out / EXPORT_FILE)
    return result


@contextlib.contextmanager
def runtime_errors(fmt: str, path: Path, backend: str) -> Iterator[None]:
    """A copy its runtime cannot load or run (an exporter's bug: jax2onnx 0.17 writes
    MaxPool nodes ONNX Runtime refuses) is one line naming the file and the way round."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, PipelineError):
            raise
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        other = "tensorflow" if backend == "jax" else "jax"
        raise DataError(
            f"export: {fmt} runtime cannot run {path.name} as Keras's exporter on {backend} "
            f"wrote it ({reason}); try KERAS_BACKEND={other}"
        ) from None


def check_options(fmt: str, quantize: str, calibration: int, backend: str) -> None:
    """Refuse, in one line, what the chosen format or quantization would not do."""
    from pipeline.export.convert import check_format

    check_format(fmt, backend)
    if fmt == "saved_model" and quantize != "none":
        raise ConfigError(
            f"export --quantize {quantize}: a SavedModel is not quantized; "
            "use --format onnx or litert"
        )
    if calibration != DEFAULT_CALIBRATION and quantize != "int8":
        raise ConfigError(
            f"export --calibration {calibration} does nothing without --quantize int8; remove it"
        )
    if calibration < 1:
        raise ConfigError(f"export --calibration {calibration}: give at least 1 image")


def check_prepared(card: dict, prepared_dir: Path) -> None:
    """The prepared data must be of the model's classes and input size: its test split is
    what each copy is checked on."""
    from pipeline.data.data_card import read_card

    prepared = read_card(prepared_dir)
    for key in ("task", "classes", "image_shape"):
        if prepared.get(key, "classification") != card.get(key, "classification"):
            raise DataError(
                f"export --prepared {prepared_dir}: its {key} ({prepared.get(key)}) is not the "
                f"model's ({card.get(key)}); give the prepared data of the model's classes"
            )


def calibration_set(prepared_dir: Path, count: int) -> np.ndarray:
    """`count` train images drawn at random (seed 0), as uint8 arrays."""
    from pipeline.data.loader import load_split

    images, _ = load_split(prepared_dir, "train")
    chosen = np.sort(np.random.default_rng(0).permutation(len(images))[:count])
    return np.asarray(images[chosen])


def summary_line(result: dict) -> str:
    """One line per copy: size, agreement, top-1."""
    parts = []
    for precision, entry in result["copies"].items():
        parts.append(
            f"{precision} {entry['file']} {entry['size_bytes'] / 1e6:.2f} MB "
            f"({entry['size_vs_float32']:.0%}), max |logit diff| "
            f"{entry['max_abs_logit_diff']:.2g}, top-1 agreement {entry['top1_agreement']:.2%}, "
            f"top-1 {entry['export_top1']:.4f} (Keras {entry['keras_top1']:.4f})"
        )
    logged = result.get("logged")
    where = f"; logged as {', '.join(logged.values())}" if logged else ""
    return f"export: {result['format']}: " + "; ".join(parts) + where
