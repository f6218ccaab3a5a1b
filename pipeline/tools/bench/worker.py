"""One benchmark case, in a process of its own: `python -m pipeline.tools.bench.worker CASE_JSON`.

Prints one JSON object of figures on its last stdout line (see `pipeline.tools.bench.harness`).
Keras cases run on the backend KERAS_BACKEND names; timm cases on PyTorch; exported cases
convert the Keras model on that backend and run the copy with ONNX Runtime or LiteRT.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np

CALIBRATION = 64  # images an int8 copy's activation ranges are calibrated on


def main(argv: list[str]) -> int:
    from pipeline.errors import PipelineError
    from pipeline.tools.bench.cases import Case

    if argv[0] == "--peak":  # --peak FRAMEWORK SIDE (0: 8192 on a GPU, 2048 on a CPU)
        side = int(argv[2]) or (8192 if has_gpu(argv[1]) else 2048)
        print(json.dumps(matmul_peak(argv[1], side)))
        return 0
    case = Case(**json.loads(argv[0]))
    try:
        images, labels, num_classes = data(case)
        measure = {"keras": keras_case, "timm": timm_case}.get(case.framework, exported_case)
        figures = measure(case, images, labels, num_classes)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    figures["peak_host_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures))
    return 0


def data(case) -> tuple[np.ndarray, np.ndarray, int]:
    """uint8 images and int labels, enough for a few distinct batches (and the largest
    latency batch, and the calibration of an int8 copy)."""
    calibration = CALIBRATION if case.exported and case.precision == "int8" else 0
    count = max(case.batch_size * 4, *case.infer_batches, calibration)
    if case.data == "prepared":
        from pathlib import Path

        from pipeline.data.data_card import read_card
        from pipeline.data.loader import load_split

        images, labels = load_split(Path(case.prepared_dir), "train")
        num_classes = read_card(Path(case.prepared_dir))["num_classes"]
        return images, np.asarray(labels), num_classes
    rng = np.random.default_rng(0)
    side = case.image_size
    images = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    return images, rng.integers(0, case.num_classes, count), case.num_classes


def step_figures(times: list[float], batch: int) -> dict:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {
        "images_per_s": batch * len(times) / sum(times),
        "ms_median": 1000 * statistics.median(times),
        "ms_p25": 1000 * quartiles[0],
        "ms_p75": 1000 * quartiles[-1],
    }


def timed(fn, count: int) -> list[float]:
    times = []
    for i in range(count):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


def inference(predict, batch, case) -> dict:
    """`step_figures` of `predict(batch)` (which returns on the host), over `case.steps`
    calls after `case.warmup` (at least one) untimed ones."""
    timed(lambda i: predict(batch), max(case.warmup, 1))
    return step_figures(timed(lambda i: predict(batch), case.steps), len(batch))


def latency(predict, make_batch, case) -> dict:
    """Median ms and images/s of inference at each of `case.infer_batches`, `make_batch(n)`
    giving the input of n images."""
    out = {}
    for n in case.infer_batches:
        measured = inference(predict, make_batch(n), case)
        out[f"infer_b{n}_ms"] = measured["ms_median"]
        out[f"infer_b{n}_images_per_s"] = measured["images_per_s"]
    return out


def pixels(images: np.ndarray, n: int) -> np.ndarray:
    """`n` images as float32 pixels 0..255 (repeated when there are fewer)."""
    return np.resize(images, (n, *images.shape[1:])).astype(np.float32)


def input_pipeline(case, images, labels, num_classes) -> float:
    """Images/s of the trainer's own batching (uint8 → float32 cut, one-hot) alone."""
    from pipeline.data.loader import ArrayBatches

    batches = ArrayBatches(images, labels, case.batch_size, shuffle=True, num_classes=num_classes)
    count = min(len(batches), max(case.steps, 1))
    times = timed(lambda i: batches[i % len(batches)], count)
    return case.batch_size * count / sum(times)


def keras_case(case, images, labels, num_classes) -> dict:
    import keras

    from pipeline.data.loader import ArrayBatches
    from pipeline.models.architectures import build_model
    from pipeline.models.model_card import model_card
    from pipeline.training import devices
    from pipeline.training.precision import set_precision

    placement, replicated = replicas(case)
    set_precision(case.precision)
    shape = tuple(images.shape[1:])
    with replicated:
        model = build_model(case.arch, shape, num_classes, small_input=case.small_input)
        devices.synchronize_batch_norm(model, placement)
        macs = model_card(model)["macs"]
        model.compile(
            optimizer=keras.optimizers.AdamW(1e-3),
            loss=keras.losses.CategoricalCrossentropy(),
            jit_compile=case.xla,
            auto_scale_loss=case.precision == "mixed_float16",
        )
    batches = ArrayBatches(images, labels, case.batch_size, num_classes=num_classes)
    feed = [batches[i] for i in range(min(len(batches), 4))]
    feed = [(x, y) for x, y in feed if len(x) == case.batch_size] or feed

    def train(i):
        model.train_on_batch(*feed[i % len(feed)])

    first = timed(train, 1)[0]
    timed(train, case.warmup)
    train_times = timed(train, case.steps)

    def infer(i):
        np.asarray(model.predict_on_batch(feed[i % len(feed)][0]))

    timed(infer, max(case.warmup, 1))
    infer_times = timed(infer, case.steps)
    at_batches = latency(
        lambda x: np.asarray(model.predict_on_batch(x)), lambda n: pixels(images, n), case
    )
    return figures(case, first, train_times, infer_times, macs, keras_device_peak_mb()) | {
        **at_batches,
        "input_images_per_s": input_pipeline(case, images, labels, num_classes),
        "policy": keras.mixed_precision.global_policy().name,
        "device_platform": placement.device_kinds()[0].rsplit(":", 1)[-1].lower(),
    }


def replicas(case):
    """(the placement on the first `case.devices` devices, the scope to build, compile and
    train in): data-parallel over them, or nothing for one device."""
    import contextlib

    import keras

    from pipeline.errors import ConfigError
    from pipeline.training import devices

    backend = keras.backend.backend()
    if case.devices > 1 and backend == "tensorflow":
        split_tensorflow_cpu(case.devices)
    found = devices.training_devices()
    if case.devices == 1:
        return devices.Placement("none", found[:1]), contextlib.nullcontext()
    if len(found) < case.devices:
        raise ConfigError(
            f"bench --devices {case.devices}: the {backend} backend sees {len(found)} "
            f"device(s) ({', '.join(found)})"
        )
    placement = devices.Placement("data_parallel", found[: case.devices])
    return placement, devices.scope(placement)


def split_tensorflow_cpu(count: int) -> None:
    """Without GPUs, TensorFlow sees one CPU: split it into `count` logical ones (sharing
    the same cores) so MirroredStrategy has replicas."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    if tf.config.list_physical_devices("GPU") or len(cpus) != 1:
        return
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * count
    )


def keras_device_peak_mb() -> float | None:
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        elif backend == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform != "cpu":
                return device.memory_stats()["peak_bytes_in_use"] / 2**20
    except (KeyError, RuntimeError, ValueError):
        return None
    return None


def figures(case, first: float, train_times, infer_times, macs: int, device_mb) -> dict:
    train = step_figures(train_times, case.batch_size)
    infer = step_figures(infer_times, case.batch_size)
    return {
        "train_images_per_s": train["images_per_s"],
        "step_ms_median": train["ms_median"],
        "step_ms_p25": train["ms_p25"],
        "step_ms_p75": train["ms_p75"],
        "infer_images_per_s": infer["images_per_s"],
        "infer_ms_median": infer["ms_median"],
        "first_step_s": first,
        "compile_s": max(first - train["ms_median"] / 1000, 0.0),
        "mmacs_per_image": macs / 1e6,
        "train_gflops_per_s": 6 * macs * train["images_per_s"] / 1e9,
        "infer_gflops_per_s": 2 * macs * infer["images_per_s"] / 1e9,
        "peak_device_mb": device_mb,
    }


def timm_case(case, images, labels, num_classes) -> dict:
    """The same architecture from timm on PyTorch, with the same small-input stem, loss
    and optimizer; bf16 through autocast, channels-last; `xla` means torch.compile."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.tools.bench.cases import TIMM_NAMES

    torch.manual_seed(0)
    model = timm_model(TIMM_NAMES[case.arch], num_classes, case.small_input, case.image_size)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.from_numpy(images[: case.batch_size]).permute(0, 3, 1, 2).float().div(255)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(np.asarray(labels[: case.batch_size])).long()
    with FlopCounterMode(display=False) as counter:
        model(x[:1])
    macs = counter.get_total_flops() // 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    run = torch.compile(model) if case.xla else model
    dtype = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(case.precision)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=dtype)

    def train(i):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(run(x), y)
        loss.backward()
        optimizer.step()
        loss.item()

    first = timed(train, 1)[0]
    timed(train, case.warmup)
    train_times = timed(train, case.steps)
    run.eval()

    def infer(i):
        with torch.inference_mode(), autocast():
            run(x).float().numpy()

    timed(infer, max(case.warmup, 1))
    infer_times = timed(infer, case.steps)

    def on_torch(n):
        batch = torch.from_numpy(pixels(images, n)).permute(0, 3, 1, 2).div(255)
        return batch.contiguous(memory_format=torch.channels_last)

    def predict(batch):
        with torch.inference_mode(), autocast():
            run(batch).float().numpy()

    return figures(case, first, train_times, infer_times, macs, None) | {
        **latency(predict, on_torch, case),
        "input_images_per_s": None,
        "policy": case.precision,
        "timm_model": TIMM_NAMES[case.arch],
    }


def exported_case(case, images, labels, num_classes) -> dict:
    """The Keras case's model (float32) converted by `pipeline.export` to ONNX or LiteRT,
    int8 calibrated on CALIBRATION of the images, and run by its runtime with a thread
    per core: inference only, at the case's batch and its `infer_batches`, and the file's
    size. No training figures: the copy only answers."""
    import tempfile
    from pathlib import Path

    from pipeline.export import convert, quantize, runtimes
    from pipeline.models.architectures import build_model
    from pipeline.models.model_card import model_card

    fmt = "onnx" if case.framework == "onnxruntime" else "litert"
    mode = "int8" if case.precision == "int8" else "none"
    model = build_model(case.arch, images.shape[1:], num_classes, small_input=case.small_input)
    macs = model_card(model)["macs"]
    source = convert.with_logits(model)
    calibration = pixels(images, CALIBRATION) if mode == "int8" else None
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        path = convert.export(source, fmt, Path(tmp, "model" + convert.SUFFIXES[fmt]))
        if mode == "int8":
            path = quantize.quantized_copy(source, fmt, mode, path, calibration)
        run = runtimes.runner(fmt, path)
        measured = inference(run, pixels(images, case.batch_size), case)
        return {
            "infer_images_per_s": measured["images_per_s"],
            "infer_ms_median": measured["ms_median"],
            **latency(run, lambda n: pixels(images, n), case),
            "file_bytes": convert.size_bytes(path),
            "mmacs_per_image": macs / 1e6,
            "infer_gflops_per_s": 2 * macs * measured["images_per_s"] / 1e9,
            "peak_device_mb": None,
        }


def timm_model(name: str, num_classes: int, small_input: bool, side: int):
    """A timm model; `small_input` makes the stem stride 1 as this zoo's small_input does
    (ResNet: a 3x3/1 conv, no max pool; MobileNet/EfficientNet: stem and first
    downsampling block at stride 1)."""
    import torch

    from pipeline.tools.bench import torchvision_stand_in

    torchvision_stand_in.install()
    import timm

    # this zoo's ViT cuts 4x4 patches for small inputs, 16x16 otherwise
    kwargs = {"img_size": side, "patch_size": 4 if small_input else 16} if "vit" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if not small_input:
        return model
    if hasattr(model, "maxpool") and hasattr(model, "conv1"):  # ResNet family
        out = model.conv1.out_channels
        model.conv1 = torch.nn.Conv2d(3, out, 3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    elif hasattr(model, "conv_stem"):  # MobileNet / EfficientNet
        model.conv_stem.stride = (1, 1)
        for block in model.blocks:
            first = block[0]
            conv = getattr(first, "conv_dw", None) or getattr(first, "conv_pw", None)
            if conv is not None and conv.stride == (2, 2):
                conv.stride = (1, 1)
                break
    return model


def has_gpu(framework: str) -> bool:
    if framework == "timm":
        import torch

        return torch.cuda.is_available()
    from pipeline.training.devices import gpu_compute_capability

    return gpu_compute_capability() is not None


def matmul_peak(framework: str, side: int, seconds: float = 2.0) -> dict:
    """The bfloat16 matrix-multiply rate this device reaches, in TFLOP/s: MFU's denominator.

    Square `side`x`side` products, repeated for about `seconds` after one untimed call,
    synchronized by reading one value back. Keras measures on the backend KERAS_BACKEND
    names (on its default device); "timm" measures with PyTorch (on CUDA if there is one).
    """
    if framework == "timm":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        a = torch.randn(side, side, device=device, dtype=torch.bfloat16)

        def product():
            return torch.matmul(a, a)

        def wait(x):
            return float(x[0, 0])
    else:
        import keras

        a = keras.ops.cast(keras.random.normal((side, side)), "bfloat16")

        def product():
            return keras.ops.matmul(a, a)

        def wait(x):  # via float32: TensorFlow's bfloat16 scalars do not become numpy
            return float(keras.ops.convert_to_numpy(keras.ops.cast(x[0, 0], "float32")))

    wait(product())  # compile, allocate
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        out = product()
        count += 1
        if count % 8 == 0:
            wait(out)
    wait(out)
    elapsed = time.perf_counter() - start
    return {"matmul_side": side, "matmul_tflops": 2 * side**3 * count / elapsed / 1e12}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
