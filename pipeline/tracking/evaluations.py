"""A model judged after training: `score`'s evaluation runs and `export`'s copies, each
linked to the model they measured.

An evaluation run sits in the experiment of the run that trained the model. Its
metrics are linked to the logged model (MLflow 3's `model_id`) and to the scored
dataset, so the model's page lists them by dataset; the data is its input (context
`scored`). A registered version also gets tags naming the dataset and its score:
`score.<digest12>.<metric>`, `score.<digest12>.source` and `score.<digest12>.run_id`
(`score.<digest12>.tta_flip.<metric>`, ... for a score with test-time augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.tracking.store import connect, mlflow_client, reaching_the_store, source_tags


@dataclass(frozen=True)
class ModelRef:
    """Where a model URI points in the store."""

    uri: str
    run_id: str
    model_id: str | None  # the LoggedModel (MLflow 3); None for older logs
    name: str | None  # registered model and version, for models:/ URIs
    version: str | None


def resolve(model_uri: str, *, key: str, then: str) -> ModelRef:
    """The run, logged model and registered version behind `model_uri`."""
    from mlflow.exceptions import MlflowException

    mlflow = connect()
    client = mlflow_client()
    name = version = None
    with reaching_the_store(then):
        try:
            info = mlflow.models.get_model_info(model_uri)
            if model_uri.startswith("models:/"):
                name, _, rest = model_uri.removeprefix("models:/").partition("/")
                if "@" in name:
                    name, alias = name.split("@", 1)
                    version = client.get_model_version_by_alias(name, alias).version
                else:
                    version = rest.split("/")[0]
        except MlflowException as exc:
            raise ConfigError(f"{key} {model_uri!r}: {str(exc).splitlines()[0]}") from None
    if not info.run_id:
        raise ConfigError(f"{key} {model_uri!r}: the logged model names no run; {then}")
    return ModelRef(model_uri, info.run_id, info.model_id, name, str(version) if version else None)


def log_scoring(
    ref: ModelRef,
    data,
    report: dict[str, float],
    files: list[Path],
    *,
    settings: dict[str, str],
    metric: str,
) -> str:
    """Start and finish an evaluation run of `ref` on `data` (`data.labelled.LabelledData`);
    return its id. `metric` is the headline score tagged on the registered version."""
    from pipeline.tracking import datasets

    then = "the scores are written to the output folder; rerun score when it answers"
    mlflow = connect()
    client = mlflow_client()
    with reaching_the_store(then):
        trained = client.get_run(ref.run_id)
        scored = datasets.dataset(f"scored/{data.split}", data.source, data.digest)
        label = f"v{ref.version}" if ref.version else ref.run_id[:8]
        tags = {
            "pipeline.kind": "score",
            "scored_model_uri": ref.uri,
            "scored_model_run_id": ref.run_id,
            "mlflow.parentRunId": ref.run_id,  # listed under the training run in the UI
            **source_tags(),
            **settings,
        }
        with mlflow.start_run(
            experiment_id=trained.info.experiment_id,
            run_name=f"score {ref.name or 'model'} {label} on {_short(data.source)}",
            tags=tags,
            log_system_metrics=False,
        ) as run:
            mlflow.log_input(scored, context="scored")
            metrics = {k: v for k, v in report.items() if isinstance(v, float)}
            mlflow.log_metrics(metrics, model_id=ref.model_id, dataset=scored)
            for path in files:
                mlflow.log_artifact(str(path), artifact_path=_folder(path))
        if ref.name and ref.version and metric in report:
            tta = settings.get("score.tta", "none")  # a TTA score beside the plain one
            prefix = f"score.{data.digest[:12]}" + (f".tta_{tta}" if tta != "none" else "")
            for key, value in (
                (f"{prefix}.{metric}", f"{report[metric]:.6g}"),
                (f"{prefix}.source", data.source),
                (f"{prefix}.run_id", run.info.run_id),
            ):
                client.set_model_version_tag(ref.name, ref.version, key, value)
    return run.info.run_id


def _short(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def _folder(path: Path) -> str | None:
    """Plots under plots/, tables under tables/, the JSON files at the top."""
    return {"images": "plots", "tables": "tables"}.get(path.parent.name)


EXPORT_METRICS = (
    "size_bytes",
    "size_vs_float32",
    "max_abs_logit_diff",
    "max_abs_probability_diff",
    "top1_agreement",
    "export_top1",
)


def log_export(
    ref: ModelRef, fmt: str, files: dict[str, Path], result: dict, record: Path
) -> dict[str, str]:
    """Log each exported copy to the run that trained the model: ONNX ones as MLflow onnx
    models (`onnx_float32`, `onnx_int8`, ...), others as artifacts under `exports/`;
    their size and agreement as metrics `export.<format>.<precision>.<figure>`. Return
    where each copy is in the store (a model URI, or the run's artifact path)."""
    then = "the exported files are written; rerun export when it answers"
    mlflow = connect()
    logged = {}
    with reaching_the_store(then), mlflow.start_run(run_id=ref.run_id, log_system_metrics=False):
        for precision, path in files.items():
            figures = result["copies"][precision]
            mlflow.log_metrics(
                {f"export.{fmt}.{precision}.{k}": float(figures[k]) for k in EXPORT_METRICS}
            )
            if fmt == "onnx":
                import mlflow.onnx
                import onnx

                info = mlflow.onnx.log_model(
                    onnx.load(str(path)),
                    name=f"onnx_{precision}",
                    metadata={"source_model_uri": ref.uri, **_scalars(figures)},
                )
                logged[precision] = info.model_uri
            elif path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=f"exports/{path.name}")
                logged[precision] = f"runs:/{ref.run_id}/exports/{path.name}"
            else:
                mlflow.log_artifact(str(path), artifact_path="exports")
                logged[precision] = f"runs:/{ref.run_id}/exports/{path.name}"
        mlflow.log_artifact(str(record), artifact_path=f"exports/{fmt}")
    return logged


def _scalars(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, int | float | str)}
