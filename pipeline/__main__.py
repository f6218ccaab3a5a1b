"""`python -m pipeline <command>`: one subcommand per DVC stage, plus tools.

Each command loads only the params.yaml sections it reads, calls the stage's
plain `run` function, and turns a PipelineError into one line on stderr and
its exit code (2 for bad input, 1 for a refused promotion).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import time
import traceback
from pathlib import Path

from pipeline import config
from pipeline.errors import ConfigError, PipelineError
from pipeline.redact import mask_urls_in
from pipeline.tensorflow_logs import quiet_tensorflow_startup
from pipeline.versions import drift_warning

STAGES = ("fetch", "prepare", "train", "evaluate", "register")
# --model of the tools that load a trained model (predict, explain, probe)
MODEL_URI_HELP = (
    "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model "
    "(default: this project's data/model)"
)


def cmd_fetch(args: argparse.Namespace) -> None:
    from pipeline.stages import fetch

    summary = fetch.run(config.load("fetch", args.params))
    print(f"fetch: {summary['num_images']} images, {len(summary['classes'])} classes -> data/raw")


def cmd_prepare(args: argparse.Namespace) -> None:
    from pipeline.stages import prepare

    card = prepare.run(config.load("prepare", args.params))
    print(f"prepare: {card['totals']} images of {card['image_shape']} -> data/prepared")


def cmd_train(args: argparse.Namespace) -> None:
    from pipeline.stages import train
    from pipeline.training import cluster

    params = config.read_params(args.params)
    # several processes (hosts): join them before anything touches a device
    cluster.initialize(cluster.from_env(args))
    result = train.run(
        config.load("model", args.params, params),
        config.load("train", args.params, params),
        config.load("mlflow", args.params, params),
        augment_cfg=config.load("augment", args.params, params),
        task=config.load_task(args.params, params),
    )
    print(
        f"train: {result.seconds:.1f}s, {result.images_per_second:.0f} images/s, "
        f"policy {result.policy}"
        + (", stopped by train.max_minutes" if result.out_of_time else "")
        + (", stopped early" if result.stopped_early and not result.out_of_time else "")
    )


def cmd_launch(args: argparse.Namespace) -> None:
    from pipeline.tools import launch

    command = launch.pipeline_command(args.command_line, str(args.params))
    code = launch.run(command, args.processes, port=args.port)
    if code:
        raise SystemExit(code)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pipeline.stages import evaluate

    report = evaluate.run(config.load("evaluate", args.params))
    if "test_miou" in report:
        print(
            f"evaluate: test mIoU {report['test_miou']:.4f}, mean Dice "
            f"{report['test_mean_dice']:.4f}, pixel accuracy {report['test_pixel_accuracy']:.4f}"
        )
        return
    print(
        f"evaluate: test top-1 {report['test_top1']:.4f}, top-5 {report['test_top5']:.4f}, "
        f"loss {report['test_loss']:.4f}"
    )


def cmd_register(args: argparse.Namespace) -> None:
    from pipeline.stages import register

    register.run(load_register(args.params))


def cmd_promote(args: argparse.Namespace) -> None:
    from pipeline.tools import promote

    promote.run(load_register(args.params), name=args.name, version=args.version, force=args.force)


def load_register(path: Path) -> config.RegisterConfig:
    """The register section, its gate checked against the task as `check` does."""
    params = config.read_params(path)
    cfg = config.load("register", path, params)
    try:
        config.check_register(config.load_task(path, params), cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def cmd_check(args: argparse.Namespace) -> None:
    from pipeline.tools import check

    check.run(args.params)
    print(f"{args.params}: valid")


def cmd_compare(args: argparse.Namespace) -> None:
    from pipeline.tools import compare

    out = compare.run(args.experiment, args.out, log=not args.no_log)
    print(f"compare: report in {out / 'report.md'}")


def cmd_predict(args: argparse.Namespace) -> None:
    from pipeline.tools import predict

    images = args.input or args.images
    if images is None:
        raise ConfigError("predict: give a folder of images (predict DIR or --input DIR)")
    count = predict.run(images, args.output, model_uri=args.model, progress=True)
    print(f"predict: {count} images -> {args.output}")


def cmd_score(args: argparse.Namespace) -> None:
    from pipeline.tools import score

    summary, run_id = score.run(
        args.data,
        args.out,
        model_uri=args.model,
        split=args.split,
        sha256=args.sha256,
        tta=args.tta,
        batch_size=args.batch_size,
        allow_missing_classes=args.allow_missing_classes,
        timeout_s=args.timeout_s,
        log=not args.no_log,
    )
    if "test_miou" in summary:
        line = f"mIoU {summary['test_miou']:.4f}, mean Dice {summary['test_mean_dice']:.4f}"
    else:
        line = f"top-1 {summary['test_top1']:.4f}, top-5 {summary['test_top5']:.4f}"
    logged = f"; evaluation run {run_id}" if run_id else ""
    print(
        f"score: {summary['num_images']} images ({summary['split']}), {line} -> {args.out}{logged}"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from pipeline.tools import export

    result = export.run(
        args.out,
        model_uri=args.model,
        fmt=args.format,
        quantize=args.quantize,
        calibration=args.calibration,
        prepared_dir=args.prepared,
        log=not args.no_log,
    )
    print(export.summary_line(result))


def cmd_explain(args: argparse.Namespace) -> None:
    from pipeline.tools import explain

    methods = explain.parse_methods(args.method)
    index = explain.run(
        args.input,
        args.out,
        methods=methods,
        model_uri=args.model,
        layer=args.layer,
        class_name=args.class_name,
        limit=args.limit,
    )
    print(f"explain: {len(index['images'])} images, {','.join(methods)} -> {args.out}")


def cmd_probe(args: argparse.Namespace) -> None:
    from pipeline.tools import probe

    rows, files, run_id = probe.run(
        args.out,
        model_uri=args.model,
        prepared_dir=args.prepared,
        max_train=args.max_train,
        log=not args.no_log,
    )
    for row in rows:
        print(
            f"probe: {row.kind:>14} {row.layer:<28} val {row.val_top1:.4f} test {row.test_top1:.4f}"
        )
    logged = f", logged to MLflow run {run_id} (probe/)" if run_id else ""
    print(f"probe: table in {files[1]}, chart {files[2]}{logged}")


def cmd_models(args: argparse.Namespace) -> None:
    """Print the model card of each registered architecture (a table, or JSON)."""
    import json

    from pipeline.models import model_card as card

    cards = card.registry_cards(
        args.image_size,
        args.num_classes,
        args.channels,
        names=args.arch,
        small_input=args.small_input,
    )
    print(json.dumps(cards, indent=2) if args.json else card.format_table(cards))


def cmd_server(args: argparse.Namespace) -> None:
    from pipeline.tools import server

    server.run(
        server.resolve(
            backend_store_uri=args.backend_store_uri,
            artifacts_destination=args.artifacts_destination,
            host=args.host,
            port=args.port,
            workers=args.workers,
            allowed_hosts=args.allowed_hosts,
        )
    )


def cmd_bench(args: argparse.Namespace) -> None:
    from pipeline.tools.bench import harness as bench

    archs = bench.check_options(
        _names(args.arch),
        _names(args.backend),
        _names(args.precision),
        args.peer == "timm",
        args.data,
        args.devices,
        args.batch_size,
        _names(args.exported),
    )
    xla = {"off": [False], "on": [True], "both": [False, True]}[args.xla]
    planned = bench.cases(
        archs,
        backends=_names(args.backend),
        precisions=_names(args.precision),
        xla=xla,
        peer=args.peer == "timm",
        devices=args.devices,
        exported=_names(args.exported),
        image_size=args.image_size,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        data=args.data,
        prepared_dir=str(args.prepared_dir),
        small_input=not args.imagenet_stem,
    )
    command = bench.command_line(sys.argv[1:])
    markdown = args.out.with_suffix(".md")
    records = bench.sweep(planned, args.out, markdown, command, mfu=args.mfu)
    print(f"bench: {len(records)} cases -> {args.out}, {markdown}")
    if args.baseline:
        for line in bench.compare_with_baseline(records, args.baseline):
            print(line)
    if args.mlflow:
        from pipeline.tracking import reports

        run_id = reports.log_bench(records, [args.out, markdown], command)
        print(f"bench: logged as MLflow run {run_id}")


def _names(values: list[str]) -> list[str]:
    """`a,b c` -> [a, b, c]."""
    return [name for value in values for name in value.split(",") if name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params",
        type=Path,
        default=config.DEFAULT_PARAMS,
        help="params file (default: params.yaml)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func, text in [
        ("fetch", cmd_fetch, "download/extract raw images to data/raw"),
        ("prepare", cmd_prepare, "decode, resize, split to data/prepared"),
        ("train", cmd_train, "train the model, log the MLflow run"),
        ("evaluate", cmd_evaluate, "test metrics and plots"),
        ("register", cmd_register, "register the model, alias 'challenger'"),
        ("check", cmd_check, "validate params.yaml"),
    ]:
        sub = commands.add_parser(name, help=text)
        sub.set_defaults(func=func)
        if name == "train":
            add_cluster_flags(sub)
    promote = commands.add_parser("promote", help="move alias 'champion' to a better version")
    promote.add_argument("--name", help="registered model (default: register.model_name)")
    promote.add_argument("--version", help="version to promote (default: @challenger)")
    promote.add_argument("--force", action="store_true", help="promote even if worse")
    promote.set_defaults(func=cmd_promote)
    compare = commands.add_parser(
        "compare", help="report comparing an MLflow experiment's runs (markdown + PNG charts)"
    )
    compare.add_argument("--experiment", required=True, help="MLflow experiment name")
    compare.add_argument("--out", type=Path, help="report folder (default: reports/EXPERIMENT)")
    compare.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    compare.set_defaults(func=cmd_compare)
    predict = commands.add_parser(
        "predict",
        help="the trained model on a folder of images (classes CSV, or colour-coded masks)",
    )
    predict.add_argument(
        "images", type=Path, nargs="?", help="folder of images (searched recursively)"
    )
    predict.add_argument("--input", type=Path, help="the same folder, as an option")
    predict.add_argument(
        "--output",
        "--out",
        type=Path,
        default=Path("predictions"),
        help="output folder, or a classifier's CSV file (default: predictions/)",
    )
    predict.add_argument(
        "--model",
        help=MODEL_URI_HELP,
    )
    predict.set_defaults(func=cmd_predict)
    score = commands.add_parser(
        "score",
        help="a trained model on new labelled data: evaluate's metrics and plots, logged as "
        "an MLflow evaluation run of the model (docs/scoring.md)",
    )
    score.add_argument(
        "--data",
        required=True,
        help="a folder or an archive (path or http(s) URL) laid out as fetch reads them",
    )
    score.add_argument("--model", help=MODEL_URI_HELP)
    score.add_argument("--sha256", default="", help="the checksum an archive must match")
    score.add_argument(
        "--split", help="the split folder to score (default: test/ where the data has splits)"
    )
    score.add_argument(
        "--tta",
        choices=["none", "flip", "flip_translate"],
        default="none",
        help="test-time augmentation (default: none)",
    )
    score.add_argument("--batch-size", type=int, default=256, help="default 256")
    score.add_argument(
        "--allow-missing-classes",
        action="store_true",
        help="score data that lacks some of the model's classes",
    )
    score.add_argument("--timeout-s", type=float, default=60, help="download timeout (60)")
    score.add_argument(
        "--out", type=Path, default=Path("reports/score"), help="default: reports/score"
    )
    score.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    score.set_defaults(func=cmd_score)
    export = commands.add_parser(
        "export",
        help="the model as ONNX, LiteRT or a SavedModel, float32 or int8, checked against "
        "Keras and logged to its run (docs/export.md)",
    )
    export.add_argument("--model", help=MODEL_URI_HELP)
    export.add_argument(
        "--format", choices=["onnx", "litert", "saved_model"], default="onnx", help="default onnx"
    )
    export.add_argument(
        "--quantize",
        choices=["none", "dynamic", "int8"],
        default="none",
        help="post-training quantization (default: none)",
    )
    export.add_argument(
        "--calibration",
        type=int,
        default=256,
        help="--quantize int8: train images that calibrate the ranges (default 256)",
    )
    export.add_argument(
        "--prepared",
        type=Path,
        default=Path("data/prepared"),
        help="prepared data of the model's classes: the agreement check reads its test "
        "split, calibration its train split (default: data/prepared)",
    )
    export.add_argument("--out", type=Path, default=Path("exports"), help="default: exports/")
    export.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    export.set_defaults(func=cmd_export)
    explain = commands.add_parser(
        "explain",
        help="what a classifier looks at: Grad-CAM, saliency, feature maps, filters, "
        "activation maximization, ViT attention (PNGs + index.json; docs/explain.md)",
    )
    explain.add_argument(
        "--input",
        required=True,
        help="a folder of images (searched recursively), or a split of data/prepared "
        "(train, val, test)",
    )
    explain.add_argument("--out", type=Path, required=True, help="output folder (replaced whole)")
    explain.add_argument(
        "--model",
        help=MODEL_URI_HELP,
    )
    explain.add_argument(
        "--method",
        default="gradcam",
        help="comma-separated: gradcam,gradcampp,saliency,smoothgrad,features,filters,"
        "maximize,attention (default: gradcam)",
    )
    explain.add_argument(
        "--layer", help="Grad-CAM's, feature maps' or maximize's layer (default: per method)"
    )
    explain.add_argument(
        "--class",
        dest="class_name",
        metavar="NAME",
        help="explain this class (default: each image's predicted one)",
    )
    explain.add_argument(
        "--limit", type=int, help="at most N images (default: all of a folder, 16 of a split)"
    )
    explain.set_defaults(func=cmd_explain)
    probe = commands.add_parser(
        "probe",
        help="linear probes: how well each stage's pooled features tell the classes apart "
        "(table + chart, logged to the model's MLflow run; docs/explain.md)",
    )
    probe.add_argument(
        "--model",
        help=MODEL_URI_HELP,
    )
    probe.add_argument(
        "--out", type=Path, default=Path("reports/probe"), help="default: reports/probe"
    )
    probe.add_argument(
        "--prepared",
        type=Path,
        default=Path("data/prepared"),
        help="the prepared splits the probes fit and score (default: data/prepared)",
    )
    probe.add_argument(
        "--max-train", type=int, default=5000, help="train images the probes fit on (default 5000)"
    )
    probe.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    probe.set_defaults(func=cmd_probe)
    models = commands.add_parser(
        "models", help="model card per architecture: params, MACs, depth, receptive field"
    )
    models.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    models.add_argument(
        "--image-size", type=int, help="input side (default: each model's ImageNet size)"
    )
    models.add_argument("--num-classes", type=int, default=1000, help="default: 1000")
    models.add_argument("--channels", type=int, default=3, help="default: 3")
    models.add_argument("--arch", nargs="+", metavar="NAME", help="default: every architecture")
    models.add_argument(
        "--small-input", action="store_true", help="CIFAR-style stems (model.small_input)"
    )
    models.set_defaults(func=cmd_models)
    server = commands.add_parser(
        "server",
        help="MLflow tracking server for a team: PostgreSQL store, proxied artifacts "
        "(docs/team-server.md)",
    )
    server.add_argument(
        "--backend-store-uri",
        metavar="URI",
        help="runs and registry, e.g. postgresql://USER:PASSWORD@HOST:5432/DB "
        "(default: $MLFLOW_BACKEND_STORE_URI, else this project's sqlite mlflow.db)",
    )
    server.add_argument(
        "--artifacts-destination",
        metavar="DIR_OR_URI",
        help="where the server keeps artifacts it proxies (default: this project's mlartifacts/)",
    )
    server.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1: this machine)"
    )
    server.add_argument("--port", type=int, default=5000, help="default: 5000")
    server.add_argument("--workers", type=int, help="uvicorn worker processes (default: 4)")
    server.add_argument(
        "--allowed-hosts",
        metavar="HOSTS",
        help="Host headers to accept, comma-separated, e.g. mlflow.example.com "
        "(default: MLflow's, localhost and private IPs)",
    )
    server.set_defaults(func=cmd_server)
    bench = commands.add_parser(
        "bench",
        help="training/inference throughput, memory and FLOP/s per architecture, precision, "
        "XLA and backend, beside PyTorch/timm (docs/benchmarks.md)",
    )
    bench.add_argument("--arch", nargs="+", default=["resnet18"], help="names, or all")
    bench.add_argument("--backend", nargs="+", default=["tensorflow"], help="Keras backends")
    bench.add_argument(
        "--precision", nargs="+", default=["float32"], help="float32 mixed_bfloat16 mixed_float16"
    )
    bench.add_argument("--xla", choices=["off", "on", "both"], default="off")
    bench.add_argument("--image-size", type=int, default=32, help="synthetic side (default 32)")
    bench.add_argument("--batch-size", type=int, default=64, help="the global batch")
    bench.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[1],
        help="data-parallel device counts, e.g. 1 2 4: images/s and scaling efficiency each",
    )
    bench.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    bench.add_argument("--data", default="synthetic", help="synthetic, or prepared (data/prepared)")
    bench.add_argument(
        "--prepared-dir",
        type=Path,
        default=Path("data/prepared"),
        help="with --data prepared (default: data/prepared)",
    )
    bench.add_argument(
        "--imagenet-stem", action="store_true", help="ImageNet stems instead of small-input ones"
    )
    bench.add_argument("--peer", choices=["none", "timm"], default="none", help="PyTorch/timm too")
    bench.add_argument(
        "--exported",
        nargs="+",
        default=[],
        metavar="RUNTIME",
        help="onnx onnx_int8 litert litert_int8: each arch's model exported, inference on that "
        "runtime; every case then also times batch 1 and 32",
    )
    bench.add_argument(
        "--out", type=Path, default=Path("bench/results.jsonl"), help="JSON lines (+ .md table)"
    )
    bench.add_argument("--baseline", type=Path, help="an earlier .jsonl: print ratios against it")
    bench.add_argument("--mlflow", action="store_true", help="log the results as an MLflow run")
    bench.add_argument(
        "--mfu",
        action="store_true",
        help="measure each framework's bf16 matmul rate first; report training MFU against it",
    )
    bench.set_defaults(func=cmd_bench)
    launch = commands.add_parser(
        "launch",
        help="N training processes on this machine, as N hosts run them "
        "(launch --processes N -- train [ARGS])",
    )
    launch.add_argument("--processes", type=int, required=True, help="how many (>= 1)")
    launch.add_argument(
        "--port", type=int, help="the coordinator's port on 127.0.0.1 (default: a free one)"
    )
    launch.add_argument(
        "command_line", nargs=argparse.REMAINDER, metavar="-- train [ARGS]", help="train's"
    )
    launch.set_defaults(func=cmd_launch)
    return parser


def add_cluster_flags(train: argparse.ArgumentParser) -> None:
    """Multi-host JAX training: the same three settings on every host (or Keras's
    KERAS_DISTRIBUTION_* variables; a flag wins)."""
    train.add_argument(
        "--coordinator", metavar="HOST:PORT", help="process 0's host and a free port"
    )
    train.add_argument("--num-processes", type=int, metavar="N", help="processes in the group")
    train.add_argument("--process-id", type=int, metavar="I", help="this one, 0 to N-1")


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow_startup()
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.command in STAGES and (drift := drift_warning(args.command)):
        print(drift, file=sys.stderr)
    try:
        args.func(args)
        if args.command in STAGES:  # `dvc repro` then shows each stage's wall time
            print(f"{args.command}: {time.perf_counter() - start:.1f} s wall time")
    except PipelineError as exc:
        print(f"error: {mask_urls_in(str(exc))}", file=sys.stderr)
        _abandon_group(exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _abandon_group(130)
        return 130
    except Exception as exc:
        full = out_of_space(exc)
        if full is None:
            if "pipeline.training.cluster" in sys.modules:
                traceback.print_exc()
                _abandon_group(1)
            raise
        print(
            f"error: {args.command}: out of disk space ({full}); free some and rerun: "
            "outputs already finished and training checkpoints were kept",
            file=sys.stderr,
        )
        _abandon_group(1)
        return 1
    return 0


def _abandon_group(code: int) -> None:
    """A process of a multi-process training exits at once: JAX's shutdown barrier would
    keep it waiting for peers that wait for it (the peers stop on its missing heartbeat)."""
    if "pipeline.training.cluster" in sys.modules:
        from pipeline.training import cluster

        cluster.abandon(code)


_OUT_OF_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# The C library's words inside wrapped messages (h5py), SQLite's (the MLflow store on
# the same disk), and numpy's for a short write
_OUT_OF_SPACE_WORDS = re.compile(
    r"No space left on device|Disk quota exceeded|File too large|database or disk is full"
    r"|(\d+) requested and (\d+) written"
)


def out_of_space(exc: BaseException) -> str | None:
    """What ran out, if `exc` (or an error it wraps: h5py, Keras, MLflow wrap them) is a
    write that failed for lack of space; None for any other error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE_ERRNOS:
            return os.strerror(exc.errno) + (f": {exc.filename}" if exc.filename else "")
        found = _OUT_OF_SPACE_WORDS.search(str(exc))
        if found and found[1]:
            return f"a write stopped short: {found[2]} of {found[1]} bytes written"
        if found:
            return str(exc).splitlines()[0][:200]
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
