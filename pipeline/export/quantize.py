"""Post-training quantization of an exported copy (`export --quantize`).

Keras's own `model.quantize` leaves Conv2D in float, so a CNN is quantized by the
runtime's tools instead:

- ONNX, `dynamic`: ONNX Runtime's `quantize_dynamic`, int8 weights, activations
  quantized on the fly per batch; no calibration data.
- ONNX, `int8`: `quantize_static`, int8 weights (per output channel) and activations
  in QDQ form, activation ranges calibrated on `calibration` train images.

ONNX weights use 7 of their 8 bits (`reduce_range`): x86 CPUs without VNNI (AVX2 ones,
this project's) saturate int8 products in their u8 x s8 instruction. A CIFAR-10
simple_cnn lost 3.1 points of top-1 to it with 8 bits (47.56% -> 44.48%) and none with
7 (47.64%); the copy may run on any CPU, so every copy gets 7.
- LiteRT, `dynamic`: the converter's dynamic-range quantization (int8 weights).
- LiteRT, `int8`: full-integer quantization with a representative dataset of train
  images; float32 input and output, int8 inside.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.export.convert import INPUT_NAME

MODES = ("none", "dynamic", "int8")


def onnx(source: Path, target: Path, mode: str, calibration: np.ndarray | None) -> Path:
    """Quantize the float32 ONNX file `source` into `target`."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared = Path(tmp, "prepared.onnx")
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        if mode == "dynamic":
            quantize_dynamic(
                str(prepared), str(target), weight_type=QuantType.QInt8, reduce_range=True
            )
            return target

        class Images(CalibrationDataReader):
            def __init__(self, images: np.ndarray, batch: int = 32):
                self.batches = iter(
                    {INPUT_NAME: images[i : i + batch].astype(np.float32)}
                    for i in range(0, len(images), batch)
                )

            def get_next(self):
                return next(self.batches, None)

        quantize_static(
            str(prepared),
            str(target),
            Images(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
        )
    return target


def litert_options(mode: str, calibration: np.ndarray | None) -> dict:
    """The TFLite converter settings of `mode`, as Keras's LiteRT exporter takes them."""
    import tensorflow as tf

    if mode == "none":
        return {}
    options = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if mode == "int8":

        def representative():
            for image in calibration:
                yield [image[None].astype(np.float32)]

        options["representative_dataset"] = representative
        options["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
    return options


def quantized_copy(model, fmt: str, mode: str, float_path: Path, calibration) -> Path:
    """The `mode` copy of `model` (float32, `convert.with_logits`) beside its float32
    export `float_path`: ONNX quantizes that file, LiteRT converts again with options."""
    from pipeline.export import convert

    if fmt == "onnx":
        return onnx(float_path, float_path.with_name(f"model.{mode}.onnx"), mode, calibration)
    target = float_path.with_name(f"model.{mode}.tflite")
    return convert.export(model, fmt, target, litert_options=litert_options(mode, calibration))
