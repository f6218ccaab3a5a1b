"""`python -m pipeline bench`: one tiny real sweep, its files' schema, failures recorded, the
baseline ratios and the MLflow run. No timed assertions: figures only have to exist."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import run_cli

FIGURES = {
    "train_images_per_s",
    "step_ms_median",
    "step_ms_p25",
    "step_ms_p75",
    "infer_images_per_s",
    "input_images_per_s",
    "first_step_s",
    "compile_s",
    "peak_host_mb",
    "peak_device_mb",
    "mmacs_per_image",
    "train_gflops_per_s",
    "infer_gflops_per_s",
}
CONTEXT = {"machine", "versions", "date", "command"}
TINY = ["--steps", "2", "--warmup", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, list[dict], str]:
    """lenet5 on TensorFlow, and vgg16 at 16x16, below its minimum (32); with MFU."""
    work = tmp_path_factory.mktemp("bench")
    out = work / "r.jsonl"
    args = ["bench", "--arch", "lenet5,vgg16", "--image-size", "16", *TINY, "--out", str(out)]
    args.append("--mfu")
    done = run_cli(args, work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, [json.loads(line) for line in out.read_text().splitlines()], done.stdout


def test_records_have_every_figure_and_the_context(sweep):
    _, records, stdout = sweep
    lenet = records[0]
    assert lenet["arch"] == "lenet5" and lenet["status"] == "ok", lenet
    assert set(lenet) >= FIGURES | CONTEXT
    assert lenet["train_images_per_s"] > 0 and lenet["infer_images_per_s"] > 0
    assert lenet["step_ms_p25"] <= lenet["step_ms_median"] <= lenet["step_ms_p75"]
    assert lenet["peak_host_mb"] > 100  # TensorFlow alone takes that much
    assert lenet["peak_device_mb"] is None  # no GPU here
    assert lenet["mmacs_per_image"] > 0 and lenet["versions"]["keras"]
    assert "[1/2] lenet5 keras/tensorflow float32 no-xla: train" in stdout
    # MFU: training FLOP/s over the bf16 matmul rate measured first, on the same backend
    assert lenet["matmul_tflops"] > 0
    assert lenet["mfu"] == pytest.approx(
        lenet["train_gflops_per_s"] / 1000 / lenet["matmul_tflops"]
    )
    assert 0 < lenet["mfu"] < 1
    assert "bf16 matmul peak: tensorflow " in stdout


def test_a_failing_case_is_recorded_and_the_sweep_goes_on(sweep):
    _, records, _ = sweep
    vgg = records[1]
    assert vgg["arch"] == "vgg16" and vgg["status"] == "failed"
    assert "vgg16 needs images of at least 32x32" in vgg["error"]
    assert not FIGURES & set(vgg)


def test_markdown_table_has_the_header_and_a_row_per_case(sweep):
    work, _, _ = sweep
    text = (work / "r.md").read_text()
    assert text.startswith("Machine: ") and "Versions: keras" in text
    assert "Command: `python -m pipeline bench --arch lenet5,vgg16" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| arch | framework | backend |") and len(rows) == 3
    assert "| failed: " in rows[2]
    assert "bf16 matmul peak (MFU's denominator): tensorflow " in text
    assert rows[0].endswith("| MFU | vs timm (train) |") and "% |" in rows[1]


def test_baseline_prints_ratios_and_mlflow_logs_a_run(sweep, tmp_path):
    from mlflow import MlflowClient

    work, _, _ = sweep
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["bench", "--arch", "lenet5", "--image-size", "16", *TINY, "--out", "again.jsonl"]
    args += ["--baseline", str(work / "r.jsonl"), "--mlflow"]
    done = run_cli(args, tmp_path, MLFLOW_TRACKING_URI=store)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lenet5 keras/tensorflow float32 no-xla: train " in done.stdout
    assert "× of r.jsonl" in done.stdout
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert run.data.metrics["lenet5.keras.tensorflow.float32.noxla.train_images_per_s"] > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"again.jsonl", "again.md"}


def test_devices_give_a_row_per_count_and_the_scaling_efficiency(tmp_path):
    """JAX on 1 and 2 devices (fake CPU devices here, which the output says once)."""
    args = ["bench", "--arch", "lenet5", "--backend", "jax", "--devices", "1", "2"]
    args += ["--image-size", "16", *TINY, "--out", "r.jsonl"]
    done = run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines())
    assert (one["devices"], two["devices"]) == (1, 2) and two["status"] == "ok", two
    assert two["device_platform"] == "cpu"
    assert two["train_images_per_s_per_device"] == pytest.approx(two["train_images_per_s"] / 2)
    assert two["scaling_efficiency"] == pytest.approx(
        two["train_images_per_s"] / (2 * one["train_images_per_s"])
    )
    assert "scaling_efficiency" not in one
    assert "lenet5 keras/jax float32 xla on 2 devices: train " in done.stdout
    assert "scaling efficiency " in done.stdout
    assert done.stdout.count("fake CPU devices sharing the same cores") == 1
    rows = [line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("| ")]
    assert "| devices |" in rows[0] and "| scaling eff. |" in rows[0] and len(rows) == 3
    assert "| 8 | 2 |" in rows[2] and "% |" in rows[2]


def test_exported_copies_are_measured_beside_keras_at_batch_1_and_32(tmp_path):
    """ONNX Runtime rows, float32 and int8, of the same simple_cnn: inference only, the
    file's size, and batch 1 and 32 on every row; training columns blank on theirs."""
    args = ["bench", "--arch", "simple_cnn", "--image-size", "16", *TINY]
    done = run_cli([*args, "--exported", "onnx", "onnx_int8", "--out", "r.jsonl"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    keras_row, onnx, int8 = rows
    assert [(r["framework"], r["precision"]) for r in rows] == [
        ("keras", "float32"), ("onnxruntime", "float32"), ("onnxruntime", "int8")
    ]  # fmt: skip
    for r in rows:
        assert r["status"] == "ok", r
        assert r["infer_b1_images_per_s"] > 0 and r["infer_b32_images_per_s"] > 0
        assert r["infer_b1_ms"] > 0 and r["infer_b32_ms"] > 0 and r["infer_images_per_s"] > 0
    assert "train_images_per_s" not in onnx and keras_row["train_images_per_s"] > 0
    assert 0 < int8["file_bytes"] < onnx["file_bytes"]
    assert onnx["mmacs_per_image"] == keras_row["mmacs_per_image"]
    assert "simple_cnn onnxruntime int8 (from keras/tensorflow): infer " in done.stdout
    lines = (tmp_path / "r.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert "| batch 1 img/s |" in table[0] and "| file MB |" in table[0] and len(table) == 4
    assert table[2].startswith("| simple_cnn | onnxruntime | tensorflow | float32 |  | 8 | 1 |  |")
    assert table[3].startswith("| simple_cnn | onnxruntime | tensorflow | int8 |")


def test_a_bad_exported_runtime_is_a_one_line_error(tmp_path, capsys):
    from pipeline.__main__ import main

    code = main(["bench", "--exported", "onnx,tensorrt", "--out", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--exported: 'tensorrt' is not one of onnx, onnx_int8, litert, litert_int8" in err
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize(
    "args, key",
    [
        (["--arch", "resnet9000"], "--arch"),
        (["--backend", "mxnet"], "--backend"),
        (["--precision", "fp8"], "--precision"),
        (["--arch", "lenet5", "--peer", "timm"], "--peer timm"),
        (["--data", "imagenet"], "--data"),
        (["--devices", "1", "3", "--batch-size", "8"], "--devices 3"),
    ],
)
def test_bad_options_are_one_line_errors(args, key, tmp_path):
    done = run_cli(["bench", *args, "--out", "r.jsonl"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and key in done.stderr, done.stderr
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("timm")),
    reason="the timm peer needs torch and timm (optional: pip install torch==2.13.0 timm)",
)
def test_timm_peer_builds_the_same_network(tmp_path):
    """Same MACs per image as the Keras model: the same stem, widths and strides."""
    args = ["bench", "--arch", "resnet18", "--peer", "timm", "--image-size", "16", *TINY]
    done = run_cli([*args, "--out", "r.jsonl"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    keras_row, timm_row = (json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines())
    assert timm_row["framework"] == "timm" and timm_row["status"] == "ok", timm_row
    assert timm_row["mmacs_per_image"] == pytest.approx(keras_row["mmacs_per_image"], rel=0.01)
    assert "×" in (tmp_path / "r.md").read_text().splitlines()[-2]  # the keras row's ratio
