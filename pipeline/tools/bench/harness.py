"""`python -m pipeline bench`: what an architecture costs to train and run, per precision,
XLA setting and backend, with PyTorch/timm and exported copies (ONNX Runtime, LiteRT)
measured beside it.

Every combination runs in a process of its own (`python -m pipeline.tools.bench.worker`):
the Keras backend is fixed per process, peak host memory is the worker's own,
global state (dtype policy, compiled functions) cannot leak from one case into
the next, and a crash or out-of-memory is recorded as that case's failure
while the sweep goes on.

A worker measures, after `warmup` steps, `steps` timed training steps (each
one synchronized: Keras's `train_on_batch` returns host floats, torch's loop
calls `.item()`), the same number of inference batches, the input pipeline
alone (the trainer's own `ArrayBatches` over the same data), the first step's
time (compilation included), peak host and device memory, and MACs per image.
Achieved FLOP/s counts 2 FLOPs per MAC and a training step as 3 forward passes
(forward, and backward for activations and weights), as is usual.

With `--exported`, each architecture's Keras model (float32, built as its Keras case
builds it) is also converted by `pipeline.export` on the TensorFlow backend, to ONNX or
LiteRT, float32 or int8 (calibrated on 64 of the case's images), and its runtime measured:
inference only, with the file's size. Every case of such a sweep also times inference at
batch 1 and 32 (`LATENCY_BATCHES`), so that the rows compare at the same batches. Each
framework uses every core the process may: TensorFlow's and PyTorch's default thread
pools, and ONNX Runtime and LiteRT with one thread per core (`pipeline.export.runtimes`).

Results: one JSON object per case appended to a `.jsonl` file, and a markdown
table with the machine, versions, date and command in its header.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.tools.bench.cases import (
    BACKENDS,
    EXPORTED,
    LATENCY_BATCHES,
    PRECISIONS,
    TIMM_NAMES,
    Case,
)

CASE_TIMEOUT_S = 1800

FAKE_DEVICES = (
    "note: the devices are fake CPU devices sharing the same cores; images/s per device "
    "count and scaling efficiency say nothing about real multi-device scaling here"
)


@dataclass
class Result:
    case: Case
    status: str = "ok"  # ok | failed | skipped
    error: str = ""
    figures: dict = field(default_factory=dict)

    def record(self, context: dict) -> dict:
        return {**asdict(self.case), "status": self.status, "error": self.error,
                **self.figures, **context}  # fmt: skip


def cases(
    archs: list[str],
    *,
    backends: list[str],
    precisions: list[str],
    xla: list[bool],
    peer: bool,
    devices: list[int] = (1,),
    exported: list[str] = (),
    **common,
) -> list[Case]:
    """Every (arch, backend, precision, xla, devices) case, device counts side by side, and
    with `peer` the timm case of each (arch, precision, xla) next to them, on one device,
    for the architectures timm has; then one case per `exported` runtime of the arch.
    With `exported`, the one-device cases also time inference at LATENCY_BATCHES."""
    batches = LATENCY_BATCHES if exported else ()
    out = []
    for arch in archs:
        for precision in precisions:
            for jit in xla:
                # The JAX backend always compiles the step with XLA (jax.jit).
                out += [Case(arch, "keras", b, precision, jit or b == "jax", devices=n,
                             infer_batches=batches if n == 1 else (), **common)
                        for b in backends for n in sorted(set(devices))]  # fmt: skip
                if peer and arch in TIMM_NAMES:
                    out.append(Case(arch, "timm", "torch", precision, jit,
                                    infer_batches=batches, **common))  # fmt: skip
        for runtime in exported:
            framework, precision = EXPORTED[runtime]
            out.append(
                Case(arch, framework, "tensorflow", precision, infer_batches=batches, **common)
            )
    return list(dict.fromkeys(out))  # without repeats (JAX under --xla both)


def check_options(
    archs: list[str],
    backends,
    precisions,
    peer: bool,
    data: str,
    devices: list[int] = (1,),
    batch_size: int = 1,
    exported: list[str] = (),
) -> list[str]:
    """Validate names and device counts; expand `all`. Returns the architecture list."""
    from pipeline.models.architectures import list_models

    known = list_models()
    if archs == ["all"]:
        archs = known
    for arch in archs:
        if arch not in known:
            raise ConfigError(
                f"bench --arch: unknown architecture {arch!r} (see `pipeline models`)"
            )
    for backend in backends:
        if backend not in BACKENDS:
            raise ConfigError(f"bench --backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ConfigError(
                f"bench --precision: {precision!r} is not one of {', '.join(PRECISIONS)}"
            )
    for runtime in exported:
        if runtime not in EXPORTED:
            raise ConfigError(f"bench --exported: {runtime!r} is not one of {', '.join(EXPORTED)}")
    if data not in ("synthetic", "prepared"):
        raise ConfigError(f"bench --data: {data!r} is not synthetic or prepared")
    for n in devices:
        if n < 1:
            raise ConfigError(f"bench --devices: {n} is not a device count (1 or more)")
        if batch_size % n:
            raise ConfigError(
                f"bench --batch-size {batch_size}: the global batch must split evenly over "
                f"--devices {n} (use a multiple of {n})"
            )
    if max(devices) > 1 and "torch" in backends:
        raise ConfigError("bench --devices: data parallelism needs the jax or tensorflow backend")
    if peer and not any(a in TIMM_NAMES for a in archs):
        raise ConfigError(
            f"bench --peer timm: no timm counterpart for {', '.join(archs)} "
            f"(known: {', '.join(sorted(TIMM_NAMES))})"
        )
    return archs


def run_case(case: Case, *, timeout_s: float = CASE_TIMEOUT_S) -> Result:
    """Measure one case in a fresh worker process; a crash or timeout is a failed Result."""
    figures, error = _worker([json.dumps(asdict(case))], _runner(case.framework, case.backend),
                             timeout_s, case.devices)  # fmt: skip
    return Result(case, figures=figures) if figures is not None else Result(case, "failed", error)


def matmul_peaks(planned: list[Case], side: int = 0, *, echo=print) -> dict[str, float]:
    """The bfloat16 matrix-multiply TFLOP/s each framework/backend of `planned` reaches on
    this machine (one worker each; `side` 0 picks the size), the denominator of MFU."""
    peaks = {}
    for runner in dict.fromkeys(_runner(case.framework, case.backend) for case in planned):
        framework = "timm" if runner == "torch" else "keras"
        figures, error = _worker(["--peak", framework, str(side)], runner, 600)
        if figures is not None:
            peaks[runner] = figures["matmul_tflops"]
        else:
            echo(f"bf16 matmul peak on {runner} failed, no MFU for it: {error}")
    return peaks


def _has_gpu() -> bool:
    """Whether this host has an NVIDIA GPU, asked without importing a framework."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def _runner(framework: str, backend: str) -> str:
    """What runs a case: the Keras backend, or "torch" for timm."""
    return "torch" if framework == "timm" else backend


def _worker(
    args: list[str], runner: str, timeout_s: float, replicas: int = 1
) -> tuple[dict | None, str]:
    """`python -m pipeline.tools.bench.worker ARGS` on `runner` (with `replicas` devices):
    (its JSON figures, "") or (None, why it failed)."""
    env = dict(os.environ)
    if runner != "torch":
        env["KERAS_BACKEND"] = runner
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if replicas > 1 and runner == "jax" and not _has_gpu():
        # One CPU is one JAX device: split it into `replicas` fake ones sharing its cores.
        flag = f"--xla_force_host_platform_device_count={replicas}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    command = [sys.executable, "-m", "pipeline.tools.bench.worker", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return None, _failure(done)
    return json.loads(lines[-1]), ""


def with_mfu(record: dict, peaks: dict[str, float]) -> dict:
    """`record` with `mfu`: its training FLOP/s over the measured bf16 matmul rate."""
    peak = peaks.get(_runner(record["framework"], record["backend"]))
    if record["status"] != "ok" or not peak or not _trained(record):
        return record
    return record | {
        "matmul_tflops": peak,
        "mfu": record["train_gflops_per_s"] / (peak * 1000),
    }


def with_scaling(record: dict, earlier: list[dict]) -> dict:
    """`record` with its images/s per device and, when the same case on one device was
    measured, its scaling efficiency: images/s on N / (N x images/s on 1)."""
    n = record.get("devices", 1)
    if record["status"] != "ok" or not _trained(record):
        return record
    out = record | {"train_images_per_s_per_device": record["train_images_per_s"] / n}
    single = [r for r in earlier if r["status"] == "ok" and r.get("devices", 1) == 1
              and _key(r)[:-1] == _key(record)[:-1]]  # fmt: skip
    if single:
        out["scaling_efficiency"] = record["train_images_per_s"] / (
            n * single[-1]["train_images_per_s"]
        )
    return out


def _failure(done: subprocess.CompletedProcess) -> str:
    """The last meaningful line of a worker's stderr (an OOM kill has none)."""
    if done.returncode < 0:
        return f"killed by signal {-done.returncode} (out of memory?)"
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("error: ")]
    if errors and errors[-1].startswith("error: "):
        return errors[-1].removeprefix("error: ")[:300]
    return (errors or lines or [f"exit {done.returncode}"])[-1][:300]


def context(command: str) -> dict:
    """Machine, versions, date and command: written with every record."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("keras", "tensorflow", "jax", "jaxlib", "torch", "timm", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return {
        "machine": machine(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def sweep(
    planned: list[Case],
    jsonl: Path,
    markdown: Path | None,
    command: str,
    *,
    mfu: bool = False,
    echo=print,
) -> list[dict]:
    """Run every case in turn, appending each record to `jsonl` as it lands. With `mfu`,
    each framework's bf16 matmul rate is measured first and every record gets its MFU."""
    info = context(command)
    peaks = matmul_peaks(planned, echo=echo) if mfu else {}
    if peaks:
        info["matmul_tflops"] = peaks
        echo("bf16 matmul peak: " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in peaks.items()))
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    records, shared_note = [], ""
    for i, case in enumerate(planned, 1):
        result = run_case(case)
        record = with_scaling(with_mfu(result.record(info), peaks), records)
        records.append(record)
        with open(jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        echo(f"[{i}/{len(planned)}] {case.label()}: {summary(record)}")
        if case.devices > 1 and record.get("device_platform") == "cpu" and not shared_note:
            shared_note = FAKE_DEVICES
            echo(FAKE_DEVICES)
    if shared_note:
        info["note"] = shared_note
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(table(records, info))
    return records


def summary(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record['error']}"
    text = f"train {record['train_images_per_s']:.0f} img/s, " if _trained(record) else ""
    text += (
        f"infer {record['infer_images_per_s']:.0f} img/s, {record['mmacs_per_image']:.1f} MMACs/img"
    )
    for n in LATENCY_BATCHES:
        if f"infer_b{n}_ms" in record:
            text += f", batch {n} {record[f'infer_b{n}_ms']:.2f} ms"
    if "file_bytes" in record:
        text += f", {record['file_bytes'] / 1e6:.2f} MB"
    if record.get("input_images_per_s"):
        text += f", input {record['input_images_per_s']:.0f} img/s"
    if record.get("devices", 1) > 1:
        text += f", {record['train_images_per_s_per_device']:.0f} img/s per device"
    if "scaling_efficiency" in record:
        text += f", scaling efficiency {record['scaling_efficiency']:.0%}"
    return text


COLUMNS = [
    ("arch", "arch"),
    ("framework", "framework"),
    ("backend", "backend"),
    ("precision", "precision"),
    ("XLA", "xla"),
    ("batch", "batch_size"),
    ("devices", "devices"),
    ("train img/s", "train_images_per_s"),
    ("per device", "train_images_per_s_per_device"),
    ("scaling eff.", "scaling_efficiency"),
    ("step ms (median, IQR)", "step"),
    ("infer img/s", "infer_images_per_s"),
    ("batch 1 ms", "infer_b1_ms"),
    ("batch 1 img/s", "infer_b1_images_per_s"),
    ("batch 32 ms", "infer_b32_ms"),
    ("batch 32 img/s", "infer_b32_images_per_s"),
    ("file MB", "file_bytes"),
    ("input img/s", "input_images_per_s"),
    ("first step s", "first_step_s"),
    ("host MB", "peak_host_mb"),
    ("device MB", "peak_device_mb"),
    ("MMACs/img", "mmacs_per_image"),
    ("train GFLOP/s", "train_gflops_per_s"),
    ("MFU", "mfu"),
    ("vs timm (train)", "vs_timm"),
]
# Columns a table has only when a row has the figure (a sweep with `--exported`).
OPTIONAL = {
    "infer_b1_ms",
    "infer_b1_images_per_s",
    "infer_b32_ms",
    "infer_b32_images_per_s",
    "file_bytes",
}
# Training columns, blank for rows that only run inference (exported copies).
TRAINING = {
    "train_images_per_s",
    "train_images_per_s_per_device",
    "scaling_efficiency",
    "step",
    "input_images_per_s",
    "first_step_s",
    "train_gflops_per_s",
    "mfu",
    "vs_timm",
}


def table(records: list[dict], info: dict) -> str:
    """A markdown table in the style of timm's benchmark CSVs, headed by the context."""
    peers = {}  # (arch, precision, xla) -> timm record; (arch, precision, None): any
    for r in records:
        if r["framework"] == "timm" and r["status"] == "ok":
            peers[(r["arch"], r["precision"], r["xla"])] = r
            peers.setdefault((r["arch"], r["precision"], None), r)
    columns = [(name, key) for name, key in COLUMNS
               if key not in OPTIONAL or any(key in r for r in records)]  # fmt: skip
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        f"Machine: {info['machine']}  ",
        f"Versions: {versions}  ",
        f"Date: {info['date']}  ",
        *(
            [
                "bf16 matmul peak (MFU's denominator): "
                + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in info["matmul_tflops"].items())
                + "  "
            ]
            if info.get("matmul_tflops")
            else []
        ),
        f"Command: `{info['command']}`",
        *([f"Note: {info['note'].removeprefix('note: ')}"] if info.get("note") else []),
        "",
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|"
        + "|".join(
            "---" if key in ("arch", "framework", "backend", "precision") else "---:"
            for _, key in columns
        )
        + "|",  # fmt: skip
    ]
    for r in records:
        lines.append("| " + " | ".join(_cell(r, key, peers) for _, key in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(r: dict, key: str, peers: dict) -> str:
    if key in ("arch", "framework", "backend", "precision", "batch_size"):
        return str(r[key])
    if key == "xla":
        if r["framework"] not in ("keras", "timm"):  # an exported copy has no such setting
            return ""
        return "on" if r["xla"] else "off"
    if key == "devices":
        return str(r.get("devices", 1))
    if r["status"] != "ok":
        return f"{r['status']}: {r['error'][:60]}" if key == "train_images_per_s" else ""
    if key in TRAINING and not _trained(r):
        return ""
    if key == "step":
        return f"{r['step_ms_median']:.1f} ({r['step_ms_p25']:.1f}–{r['step_ms_p75']:.1f})"
    if key == "vs_timm":
        peer = peers.get((r["arch"], r["precision"], r["xla"])) or peers.get(
            (r["arch"], r["precision"], None)
        )
        if r["framework"] != "keras" or not peer or r.get("devices", 1) > 1:
            return ""
        if abs(peer["mmacs_per_image"] / r["mmacs_per_image"] - 1) > 0.05:
            return "other network (MACs differ)"
        return f"{r['train_images_per_s'] / peer['train_images_per_s']:.2f}×"
    value = r.get(key)
    if value is None:
        return "–"
    if key in ("mfu", "scaling_efficiency"):
        return f"{value:.1%}" if key == "mfu" else f"{value:.0%}"
    if key == "file_bytes":
        return f"{value / 1e6:.2f}"
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def _trained(r: dict) -> bool:
    """Whether the row has training figures (an exported copy's has none)."""
    return "train_images_per_s" in r


def compare_with_baseline(records: list[dict], baseline: Path) -> list[str]:
    """Lines of new/old ratios for training and inference images/s, per matching case."""
    try:
        old = [json.loads(line) for line in baseline.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"bench --baseline: cannot read {baseline} ({exc})") from None
    by_key = {_key(r): r for r in old if r.get("status") == "ok"}
    lines = []
    for r in records:
        before = by_key.get(_key(r))
        if r["status"] != "ok" or not before:
            continue
        train = ""
        if _trained(r) and _trained(before):
            train = f"train {r['train_images_per_s'] / before['train_images_per_s']:.2f}×, "
        lines.append(
            f"{Case(**_case_fields(r)).label()}: {train}infer "
            f"{r['infer_images_per_s'] / before['infer_images_per_s']:.2f}× of {baseline.name}"
        )
    return lines


def _key(r: dict) -> tuple:
    return (r["arch"], r["framework"], r["backend"], r["precision"], r["xla"],
            r["image_size"], r["batch_size"], r.get("devices", 1))  # fmt: skip


def _case_fields(r: dict) -> dict:
    names = Case.__dataclass_fields__
    return {k: v for k, v in r.items() if k in names}


def command_line(argv: list[str]) -> str:
    return "python -m pipeline " + " ".join(shlex.quote(a) for a in argv)
