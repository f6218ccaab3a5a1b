"""Runs read back and written for reports: an experiment's finished runs for `compare`,
the comparison report and benchmark sweeps as runs of their own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.tracking.store import (
    StoreProblem,
    connect,
    ensure_experiment,
    mlflow_client,
    reaching_the_store,
    source_tags,
    tracking_uri,
    write_problem,
)


def log_bench(records: list[dict], files: list[Path], command: str) -> str:
    """A benchmark sweep as a run of experiment `bench`: per-case metrics and the files."""
    import re

    kept = f"the results are in {', '.join(map(str, files))}, not logged to MLflow"
    with reaching_the_store(kept), _run("bench", "bench") as (mlflow, run):
        mlflow.set_tags({"command": command, **source_tags()})
        first = records[0] if records else {}
        mlflow.log_params(
            {k: first[k] for k in ("image_size", "batch_size", "steps", "warmup", "data")
             if k in first} | {"machine": first.get("machine", "")}
        )  # fmt: skip
        for r in records:
            if r["status"] != "ok":
                continue
            prefix = re.sub(r"[^\w.-]", "_", f"{r['arch']}.{r['framework']}.{r['backend']}.")
            prefix += f"{r['precision']}.{'xla' if r['xla'] else 'noxla'}"
            # exported-model rows (`--exported`) measure inference only
            figures = ("train_images_per_s", "infer_images_per_s", "peak_host_mb",
                       "infer_b1_images_per_s", "infer_b32_images_per_s")  # fmt: skip
            mlflow.log_metrics(
                {f"{prefix}.{k}": r[k] for k in figures if isinstance(r.get(k), int | float)}
            )
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id


REPORT_TAG = "pipeline.report"
CURVES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "train_miou", "val_miou")


def experiment_runs(experiment: str) -> list[dict[str, Any]]:
    """Finished training runs of `experiment`, oldest first, with their per-epoch curves.

    Each: run_id, name, params, metrics, tags, and `curves` {metric: [values by epoch]}
    for the CURVES the run logged (accuracy for classifiers, mIoU for segmenters).
    Report runs (made by `compare`) are left out. A missing experiment is a ConfigError.
    """
    with reaching_the_store("no report was written"):
        return _experiment_runs(experiment)


def _experiment_runs(experiment: str) -> list[dict[str, Any]]:
    from pipeline.errors import ConfigError

    client = mlflow_client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(
            f"--experiment {experiment!r}: no such MLflow experiment at {tracking_uri()}"
        )
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    result = []
    for run in runs:
        if run.data.tags.get(REPORT_TAG):
            continue
        curves = {
            key: [
                m.value
                for m in sorted(
                    client.get_metric_history(run.info.run_id, key), key=lambda m: m.step
                )
            ]
            for key in CURVES
            if key in run.data.metrics
        }
        result.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "params": dict(run.data.params),
                "metrics": dict(run.data.metrics),
                "tags": dict(run.data.tags),
                "curves": curves,
            }
        )
    return result


NOT_WRITTEN = "no report was written (--no-log writes it without logging it)"


def check_can_log(experiment: str) -> None:
    """Refuse, before a report is written, a store this user cannot write (a read-only
    mlflow.db, its folder, or the experiment's artifact folder)."""
    with reaching_the_store(NOT_WRITTEN):
        found = connect().get_experiment_by_name(experiment)
        problem = write_problem(found.artifact_location if found else None)
        if problem:
            raise StoreProblem(problem)


def log_report(experiment: str, report_dir: Path) -> str:
    """Log a comparison report folder as a run of its own in `experiment`; return its id."""
    kept = f"the report is in {report_dir}, not logged to MLflow (--no-log skips logging)"
    with reaching_the_store(kept), _run(experiment, "compare") as (mlflow, run):
        mlflow.set_tags({REPORT_TAG: "true", **source_tags()})
        mlflow.log_artifacts(str(report_dir), artifact_path="report")
        return run.info.run_id


@contextlib.contextmanager
def _run(experiment: str, name: str) -> Iterator[tuple[Any, Any]]:
    """(mlflow, the active run): a run of its own in `experiment`, ended when done."""
    mlflow = connect()
    with mlflow.start_run(experiment_id=ensure_experiment(experiment), run_name=name) as run:
        yield mlflow, run
