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


def run_rows(runs: list[dict]) -> list[dict]:
    """The report's figures per run (None where a run lacks one)."""
    rows = []
    for run in runs:
        params, metrics, tags = run["params"], run["metrics"], run["tags"]
        train_acc = run["curves"].get("train_accuracy") or [None]
        val_acc = run["curves"].get("val_accuracy") or [None]
        gap = None
        if train_acc[-1] is not None and val_acc[-1] is not None:
            gap = train_acc[-1] - val_acc[-1]
        rows.append(
            {
                "run": tags.get("dvc_experiment") or run["name"],
                "run_id": run["run_id"],
                "arch": params.get("model.arch", "?"),
                "grid": tags.get("grid", ""),
                "dvc_experiment": tags.get("dvc_experiment", ""),
                "test_top1": metrics.get("test_top1"),
                "params": _number(params.get("model.params")),
                "macs": _number(params.get("model.macs")),
                "images_per_second": metrics.get("train_images_per_second"),
                "train_val_gap": gap,
                "val_accuracy": val_acc if val_acc[0] is not None else [],
                "settings": {},
            }
        )
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
    lines = [
        f"# Comparison: {experiment}",
        "",
        f"{len(rows)} runs, best test top-1 first.",
        "",
        "| run | arch | settings | grid | test top-1 | params | MMACs | train img/s "
        "| train-val gap |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    ordered = sorted(rows, key=lambda r: -(r["test_top1"] if r["test_top1"] is not None else -1))
    for r in ordered:
        macs = r["macs"] / 1e6 if r["macs"] is not None else None
        settings = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in r["settings"].items())
        lines.append(
            f"| {r['run']} | {r['arch']} | {settings} | {r['grid']} "
            f"| {_fmt(r['test_top1'], '.4f')} | {_fmt(r['params'], ',.0f')} | {_fmt(macs, ',.1f')} "
            f"| {_fmt(r['images_per_second'], ',.0f')} | {_fmt(r['train_val_gap'], '+.3f')} |"
        )
    lines += [
        "",
        "![top-1 against parameters](top1_vs_params.png)",
        "![top-1 against throughput](top1_vs_throughput.png)",
        "![learning curves](learning_curves.png)",
        "![train-val gap](train_val_gap.png)",
        "",
    ]
    return "\n".join(lines)


def charts(rows: list[dict], out_dir: Path) -> list[Path]:
    from pipeline.scoring.plots import new_figure, save_figure

    written = []
    for key, label, name, log_x in (
        ("params", "parameters", "top1_vs_params.png", True),
        ("images_per_second", "training images/s", "top1_vs_throughput.png", True),
    ):
        fig = new_figure(6, 4.5)
        ax = fig.add_subplot()
        for r in rows:
            if r[key] is not None and r["test_top1"] is not None:
                ax.scatter(r[key], r["test_top1"])
                ax.annotate(r["run"], (r[key], r["test_top1"]), fontsize=7)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test top-1")
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, out_dir / name))

    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    palette = colormaps["tab20"]
    for i, r in enumerate(rows):
        if r["val_accuracy"]:
            epochs = range(1, len(r["val_accuracy"]) + 1)
            ax.plot(epochs, r["val_accuracy"], label=r["run"], color=palette(i % 20), marker=".")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    written.append(save_figure(fig, out_dir / "learning_curves.png"))

    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    gaps = [(r["run"], r["train_val_gap"]) for r in rows if r["train_val_gap"] is not None]
    ax.bar([g[0] for g in gaps], [g[1] for g in gaps])
    ax.set_ylabel("final train - validation accuracy")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    written.append(save_figure(fig, out_dir / "train_val_gap.png"))
    return written


def run(experiment: str, out_dir: Path | None = None, *, log: bool = True) -> Path:
    """Write the report of `experiment` to `out_dir` (reports/<experiment>); log it to MLflow."""
    from pipeline.tracking import reports

    runs = reports.experiment_runs(experiment)
    if not runs:
        raise PipelineError(f"--experiment {experiment!r} has no finished runs to compare")
    out_dir = out_dir or REPORTS_DIR / experiment
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = run_rows(runs)
    charts(rows, out_dir)
    (out_dir / "report.md").write_text(markdown(experiment, rows))
    if log:
        reports.log_report(experiment, out_dir)
    return out_dir
