"""`python -m pipeline compare --experiment NAME`: one report over an experiment's runs.

Reads every finished training run of the MLflow experiment (a queued DVC grid
is one experiment) and writes to `reports/<experiment>/`:

- `report.md`: a table per run, labelled by its DVC experiment name (architecture,
  the settings that vary across the runs, grid, test top-1, parameters, MACs,
  training images/s, final train-val accuracy gap);
- `top1_vs_params.png`, `top1_vs_throughput.png`: accuracy against size and cost;
- `learning_curves.png`: validation accuracy per epoch, runs overlaid;
- `train_val_gap.png`: the final train minus validation accuracy per run;

then logs the folder to MLflow as a `compare` run of the same experiment.

Segmenters (tag `task=segmentation`) get their own table: test mIoU, mean Dice and
pixel accuracy instead of top-1, the train-val mIoU gap, and a per-class IoU table
(a row per class, a column per run), with `miou_vs_params.png`, `miou_vs_throughput.png`,
`val_miou_curves.png` and `per_class_iou.png`. An experiment holding both tasks gets one
section per task: MLflow cannot move runs between experiments, so refusing would leave
such an experiment with no report at all. A run trained but not yet evaluated has empty
test cells.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError

REPORTS_DIR = Path("reports")
# Param sections a user sets; other params (data.*, model.params, ...) are derived.
SETTING_SECTIONS = ("model.", "train.", "augment.")
# model.* figures the train stage logs from the model card, and the arch (its own column)
DERIVED = frozenset(
    f"model.{k}"
    for k in (
        *("arch", "params", "trainable_params", "non_trainable_params", "macs"),
        *("depth", "layers", "receptive_field", "output_stride"),
    )
)
SEGMENTATION = "segmentation"
# test_<score> metrics of a segmenter's table, and the prefix of its per-class IoU metrics
SEGMENTATION_SCORES = ("miou", "mean_dice", "pixel_accuracy")
IOU_PREFIX = "test_iou_"


def task_of(run: dict) -> str:
    """segmentation or classification, by the run's `task` tag; runs from before the tag:
    segmentation if they log mIoU."""
    task = run["tags"].get("task")
    if task is None and {"test_miou", "val_miou"} & set(run["metrics"]):
        task = SEGMENTATION
    return SEGMENTATION if task == SEGMENTATION else "classification"


def run_rows(runs: list[dict]) -> list[dict]:
    """The report's figures per classifier run (None where a run lacks one)."""
    rows = []
    for run in runs:
        val_acc = run["curves"].get("val_accuracy") or []
        rows.append(
            common_row(run)
            | {
                "test_top1": run["metrics"].get("test_top1"),
                "train_val_gap": _last_gap(run["curves"], "accuracy"),
                "val_accuracy": val_acc,
            }
        )
    return _with_settings(rows, runs)


def segmentation_rows(runs: list[dict]) -> list[dict]:
    """The report's figures per segmenter run: test mIoU, Dice, pixel accuracy, per-class
    IoU ({metric suffix: IoU}), the val mIoU curve and the final train-val mIoU gap."""
    rows = []
    for run in runs:
        metrics = run["metrics"]
        rows.append(
            common_row(run)
            | {key: metrics.get(f"test_{key}") for key in SEGMENTATION_SCORES}
            | {
                "train_val_gap": _last_gap(run["curves"], "miou"),
                "val_miou": run["curves"].get("val_miou") or [],
                "per_class_iou": {
                    k.removeprefix(IOU_PREFIX): v for k, v in metrics.items()
                    if k.startswith(IOU_PREFIX)
                },
            }
        )  # fmt: skip
    return _with_settings(rows, runs)


def common_row(run: dict) -> dict:
    """What every task's row holds: its label, architecture, grid, size, cost."""
    params, tags = run["params"], run["tags"]
    return {
        "run": tags.get("dvc_experiment") or run["name"],
        "run_id": run["run_id"],
        "arch": params.get("model.arch", "?"),
        "grid": tags.get("grid", ""),
        "dvc_experiment": tags.get("dvc_experiment", ""),
        "params": _number(params.get("model.params")),
        "macs": _number(params.get("model.macs")),
        "images_per_second": run["metrics"].get("train_images_per_second"),
        "settings": {},
    }


def _last_gap(curves: dict, metric: str) -> float | None:
    """Final-epoch train minus validation `metric`, or None without both curves."""
    train, val = curves.get(f"train_{metric}"), curves.get(f"val_{metric}")
    return train[-1] - val[-1] if train and val else None


def _with_settings(rows: list[dict], runs: list[dict]) -> list[dict]:
    varied = varied_settings([run["params"] for run in runs])
    for row, run in zip(rows, runs, strict=True):
        row["settings"] = {key: run["params"].get(key, "") for key in varied}
    return rows


def varied_settings(params: list[dict[str, str]]) -> list[str]:
    """The user-set params (model.*, train.*, augment.*) whose value differs between runs;
    the architecture has its own column."""
    keys = {k for p in params for k in p if k.startswith(SETTING_SECTIONS) and k not in DERIVED}
    return sorted(k for k in keys if len({p.get(k) for p in params}) > 1)


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(experiment: str, rows: list[dict]) -> str:
    """The report of a classification experiment."""
    return report_markdown(experiment, {"classification": classification_lines(rows)})


def classification_lines(rows: list[dict]) -> list[str]:
    lines = [
        f"{len(rows)} runs, best test top-1 first.",
        "",
        "| run | arch | settings | grid | test top-1 | params | MMACs | train img/s "
        "| train-val gap |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in _best_first(rows, "test_top1"):
        lines.append(
            f"| {r['run']} | {r['arch']} | {_settings(r)} | {r['grid']} "
            f"| {_fmt(r['test_top1'], '.4f')} | {_size_and_cost(r)} "
            f"| {_fmt(r['train_val_gap'], '+.3f')} |"
        )
    lines += [
        "",
        "![top-1 against parameters](top1_vs_params.png)",
        "![top-1 against throughput](top1_vs_throughput.png)",
        "![learning curves](learning_curves.png)",
        "![train-val gap](train_val_gap.png)",
        "",
    ]
    return lines


def segmentation_lines(rows: list[dict]) -> list[str]:
    """The segmenters' table, their per-class IoU table and charts."""
    ordered = _best_first(rows, "miou")
    lines = [
        f"{len(rows)} runs, best test mIoU first.",
        "",
        "| run | arch | settings | grid | test mIoU | mean Dice | pixel acc. | params | MMACs "
        "| train img/s | train-val mIoU gap |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ordered:
        scores = " | ".join(_fmt(r[key], ".4f") for key in SEGMENTATION_SCORES)
        lines.append(
            f"| {r['run']} | {r['arch']} | {_settings(r)} | {r['grid']} | {scores} "
            f"| {_size_and_cost(r)} | {_fmt(r['train_val_gap'], '+.3f')} |"
        )
    pending = [r["run"] for r in rows if r["miou"] is None]
    if pending:
        lines += ["", f"Not evaluated yet (no test metrics): {', '.join(pending)}."]
    lines += ["", *per_class_lines(ordered)]
    lines += [
        "",
        "![mIoU against parameters](miou_vs_params.png)",
        "![mIoU against throughput](miou_vs_throughput.png)",
        "![validation mIoU curves](val_miou_curves.png)",
        "![per-class IoU](per_class_iou.png)",
        "",
    ]
    return lines


def per_class_lines(rows: list[dict]) -> list[str]:
    """Test IoU per class: a row per class, a column per evaluated run (in `rows` order)."""
    scored = [r for r in rows if r["per_class_iou"]]
    if not scored:
        return ["No per-class test IoU yet."]
    lines = [
        "Per-class test IoU (empty: the class is in neither the labels nor the predictions).",
        "",
        "| class | " + " | ".join(r["run"] for r in scored) + " |",
        "|---|" + "---:|" * len(scored),
    ]
    for name in class_names(scored):
        cells = " | ".join(_fmt(r["per_class_iou"].get(name), ".4f") for r in scored)
        lines.append(f"| {name} | {cells} |")
    return lines


def class_names(rows: list[dict]) -> list[str]:
    """Every class any run scores, sorted (MLflow keeps no label order of metrics)."""
    return sorted({name for r in rows for name in r["per_class_iou"]})


def report_markdown(experiment: str, sections: dict[str, list[str]]) -> str:
    """The report: the lines of its one task, or a section per task when there are several."""
    lines = [f"# Comparison: {experiment}", ""]
    if len(sections) == 1:
        return "\n".join([*lines, *next(iter(sections.values()))])
    lines += ["Runs of several tasks: one section each.", ""]
    for task, body in sections.items():
        lines += [f"## {task.capitalize()}", "", *body]
    return "\n".join(lines)


def _best_first(rows: list[dict], key: str) -> list[dict]:
    """Rows by `key`, highest first; rows without it last, in their order."""
    return sorted(rows, key=lambda r: -(r[key] if r[key] is not None else -1))


def _settings(row: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in row["settings"].items())


def _size_and_cost(row: dict) -> str:
    """The params, MMACs and train img/s cells."""
    macs = row["macs"] / 1e6 if row["macs"] is not None else None
    return (
        f"{_fmt(row['params'], ',.0f')} | {_fmt(macs, ',.1f')} "
        f"| {_fmt(row['images_per_second'], ',.0f')}"
    )


def charts(rows: list[dict], out_dir: Path) -> list[Path]:
    """The classification charts."""
    from pipeline.scoring.plots import new_figure, save_figure

    written = [
        _scatter(rows, "params", "parameters", "test_top1", "test top-1",
                 out_dir / "top1_vs_params.png"),
        _scatter(rows, "images_per_second", "training images/s", "test_top1", "test top-1",
                 out_dir / "top1_vs_throughput.png"),
        _curves(rows, "val_accuracy", "validation accuracy", out_dir / "learning_curves.png"),
    ]  # fmt: skip

    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    gaps = [(r["run"], r["train_val_gap"]) for r in rows if r["train_val_gap"] is not None]
    ax.bar([g[0] for g in gaps], [g[1] for g in gaps])
    ax.set_ylabel("final train - validation accuracy")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    written.append(save_figure(fig, out_dir / "train_val_gap.png"))
    return written


def segmentation_charts(rows: list[dict], out_dir: Path) -> list[Path]:
    """mIoU against size and cost, val mIoU curves, per-class IoU bars grouped by class."""
    from pipeline.scoring.plots import runs_per_class_iou_png

    written = [
        _scatter(rows, "params", "parameters", "miou", "test mIoU",
                 out_dir / "miou_vs_params.png"),
        _scatter(rows, "images_per_second", "training images/s", "miou", "test mIoU",
                 out_dir / "miou_vs_throughput.png"),
        _curves(rows, "val_miou", "validation mIoU", out_dir / "val_miou_curves.png"),
    ]  # fmt: skip
    scored = [r for r in _best_first(rows, "miou") if r["per_class_iou"]]  # the table's order
    iou = {c: {r["run"]: r["per_class_iou"].get(c) for r in scored} for c in class_names(scored)}
    names = [r["run"] for r in scored]
    if not iou:  # nothing evaluated yet: an empty chart that says so, not a missing file
        names, iou = ["no run evaluated yet"], {"": {"no run evaluated yet": None}}
    written.append(runs_per_class_iou_png(iou, names, out_dir / "per_class_iou.png"))
    return written


def _scatter(rows: list[dict], x: str, x_label: str, y: str, y_label: str, path: Path) -> Path:
    """`y` against `x` (log scale), a labelled point per run that has both."""
    from pipeline.scoring.plots import new_figure, save_figure

    fig = new_figure(6, 4.5)
    ax = fig.add_subplot()
    for r in rows:
        if r[x] is not None and r[y] is not None:
            ax.scatter(r[x], r[y])
            ax.annotate(r["run"], (r[x], r[y]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _curves(rows: list[dict], key: str, y_label: str, path: Path) -> Path:
    """The per-epoch series `key` of every run, overlaid."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    from pipeline.scoring.plots import new_figure, save_figure

    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    palette = colormaps["tab20"]
    for i, r in enumerate(rows):
        if r[key]:
            epochs = range(1, len(r[key]) + 1)
            ax.plot(epochs, r[key], label=r["run"], color=palette(i % 20), marker=".")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def by_task(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs grouped by task, classification first, in their order within a task."""
    groups: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: task_of(r) == SEGMENTATION):
        groups.setdefault(task_of(run), []).append(run)
    return groups


def section(task: str, runs: list[dict], out_dir: Path) -> list[str]:
    """Charts of one task's runs written to `out_dir`; the markdown lines of its section."""
    if task == SEGMENTATION:
        rows = segmentation_rows(runs)
        segmentation_charts(rows, out_dir)
        return segmentation_lines(rows)
    rows = run_rows(runs)
    charts(rows, out_dir)
    return classification_lines(rows)


def run(experiment: str, out_dir: Path | None = None, *, log: bool = True) -> Path:
    """Write the report of `experiment` to `out_dir` (reports/<experiment>); log it to MLflow."""
    from pipeline.tracking import reports

    runs = reports.experiment_runs(experiment)
    if not runs:
        raise PipelineError(f"--experiment {experiment!r} has no finished runs to compare")
    if log:
        reports.check_can_log(experiment)  # a read-only store: before any file is written
    out_dir = out_dir or REPORTS_DIR / experiment
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = {
        task: section(task, task_runs, out_dir) for task, task_runs in by_task(runs).items()
    }
    (out_dir / "report.md").write_text(report_markdown(experiment, sections))
    if log:
        reports.log_report(experiment, out_dir)
    return out_dir
