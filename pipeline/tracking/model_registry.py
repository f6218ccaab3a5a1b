"""The MLflow model registry: register a run's model as a version, aliases `challenger`
and `champion`, and gated promotion. (The `register` stage calls it; the architecture
registry is `pipeline.models.architectures`.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pipeline.errors import PipelineError, PromotionRefused
from pipeline.tracking.store import (
    connect,
    machine_lock,
    mlflow_client,
    reaching_the_store,
    tracking_uri,
)

CHALLENGER, CHAMPION = "challenger", "champion"


VERSION_TAGS = ("architecture", "data_hash", "git_commit", "git_dirty", "dvc_experiment")


def register(run_file: dict[str, str], name: str, *, metrics: dict[str, float]) -> str:
    """Register the run's model as a new version of `name` and alias it `challenger`.

    The version carries the test metrics and the run's provenance tags, and a
    description generated from the run (architecture, size, data, metrics).
    """
    import mlflow

    with reaching_the_store("nothing new is registered; rerun register when it answers"):
        connect()
        client = mlflow_client()
        run = client.get_run(run_file["run_id"])
        tags = {k: run.data.tags[k] for k in VERSION_TAGS if k in run.data.tags}
        tags.update({k: f"{v:.6g}" for k, v in metrics.items() if isinstance(v, float)})
        version = mlflow.register_model(run_file["model_uri"], name, tags=tags)
        client.update_model_version(name, version.version, description=_describe(run, metrics))
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    return str(version.version)


def _describe(run, metrics: dict[str, float]) -> str:
    params = run.data.params
    lines = [
        f"{params.get('model.arch', '?')} trained on {params.get('data.source', '?')} "
        f"({params.get('data.image_shape', '?')}, {params.get('data.num_classes', '?')} classes).",
        f"Parameters: {params.get('model.params', '?')} "
        f"({params.get('model.trainable_params', '?')} trainable), "
        f"{params.get('model.macs', '?')} multiply-accumulates per image, "
        f"depth {params.get('model.depth', '?')}, "
        f"receptive field {params.get('model.receptive_field', '?')} px.",
        "Test: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
        f"Run: {run.info.run_id}; git commit {run.data.tags.get('git_commit', 'unknown')}.",
    ]
    return "\n".join(lines)


def promote(
    name: str, *, version: str | None, metric: str, higher_is_better: bool, force: bool
) -> tuple[str, float | None, float]:
    """Point alias `champion` at `version` (default: the challenger) if its metric is not worse.

    Returns (version, champion's figure or None, candidate's figure). A worse
    candidate raises PromotionRefused unless `force`.
    """
    with _promotion_lock(name), reaching_the_store("no alias was moved"):
        return _promote(name, version, metric, higher_is_better, force)


@contextlib.contextmanager
def _promotion_lock(name: str) -> Iterator[None]:
    """Serialize promotions of `name` in one store on this machine.

    Promotion reads the champion, compares and moves the alias: two promotes at
    once could both compare against the old champion, and the worse one could
    land last. A lock file per (store, model) in the temp folder prevents that.
    """
    with machine_lock("promote", f"{tracking_uri()}\0{name}"):
        yield


def _promote(
    name: str, version: str | None, metric: str, higher_is_better: bool, force: bool
) -> tuple[str, float | None, float]:
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    try:
        candidate = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, CHALLENGER)
        )
    except MlflowException as exc:
        what = f"version {version}" if version else f"alias {CHALLENGER!r}"
        raise PipelineError(
            f"promote: registered model {name!r} has no {what} ({exc.error_code})"
        ) from None
    new = _version_metric(client, candidate, metric)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    old = _version_metric(client, champion, metric) if champion else None
    worse = old is not None and (new < old if higher_is_better else new > old)
    if worse and not force:
        raise PromotionRefused(
            f"promote: refusing {name} v{candidate.version}: {metric} {new:.4f} is worse than "
            f"champion v{champion.version}'s {old:.4f} (use --force to override)"
        )
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return str(candidate.version), old, new


def _version_metric(client, version, metric: str) -> float:
    run = client.get_run(version.run_id)
    if metric not in run.data.metrics:
        raise PipelineError(
            f"promote: {version.name} v{version.version} has no metric "
            f"{metric!r} (register.metric); evaluate it first"
        )
    return run.data.metrics[metric]
