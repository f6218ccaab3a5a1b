"""The MLflow model registry: register a run's model as a version, aliases `challenger`
and `champion`, and gated promotion. (The `register` stage calls it; the architecture
registry is `pipeline.models.architectures`.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pipeline.errors import ConfigError, PipelineError, PromotionRefused
from pipeline.tracking.store import (
    StoreProblem,
    connect,
    mlflow_client,
    reaching_the_store,
    store_lock,
    tracking_uri,
)

CHALLENGER, CHAMPION = "challenger", "champion"
# MLflow's error codes for a registered model, version or alias that is not there
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


VERSION_TAGS = ("architecture", "data_hash", "git_commit", "git_dirty", "dvc_experiment")


def register(run_file: dict[str, str], name: str, *, metrics: dict[str, float]) -> str:
    """Register the run's model as a new version of `name` and alias it `challenger`.

    The version carries the test metrics and the run's provenance tags, and a
    description generated from the run (architecture, size, data, metrics). The model
    must load first (`check_loads`): a version whose files are gone would point
    `challenger` at nothing.
    """
    import mlflow

    kept = "nothing new is registered; rerun register when it answers"
    check_loads(
        run_file["model_uri"],
        f"register: run {run_file['run_id']}'s model",
        refused="nothing is registered and no alias moved",
        then=kept,
    )
    with reaching_the_store(kept):
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
    with reaching_the_store(KEPT), _promotion_lock():
        return _promote(name, version, metric, higher_is_better, force)


KEPT = "no alias was moved"


@contextlib.contextmanager
def _promotion_lock() -> Iterator[None]:
    """Serialize promotions in one store on this machine, whichever users run them.

    Promotion reads the champion, compares and moves the alias: two promotes at
    once could both compare against the old champion, and the worse one could
    land last. A lock per store (`store.store_lock`) prevents that.
    """
    with store_lock("promote", tracking_uri()):
        yield


def check_loads(model_uri: str, what: str, *, refused: str, then: str) -> None:
    """Refuse a model that does not load as serving loads it (downloaded through MLflow,
    Keras safe mode): one line naming `what`, the missing or damaged file, and ending
    with `refused`. A store that fails meanwhile ends with `then`. One load: seconds."""
    from pipeline.tracking.logged_models import load_logged_model

    try:
        load_logged_model(model_uri, key=what, then=then)
    except StoreProblem:
        raise
    except ConfigError as exc:
        raise PipelineError(f"{exc}; {refused}") from None


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
        if exc.error_code not in _NOT_FOUND:
            raise  # the store failing is not a missing version
        what = f"version {version}" if version else f"alias {CHALLENGER!r}"
        raise PipelineError(
            f"promote: registered model {name!r} has no {what} ({exc.error_code})"
        ) from None
    new = _version_metric(client, candidate, metric)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code not in _NOT_FOUND:
            raise  # a store that fails here must not read as "no champion yet"
        champion = None
    old = _version_metric(client, champion, metric) if champion else None
    worse = old is not None and (new < old if higher_is_better else new > old)
    if worse and not force:
        raise PromotionRefused(
            f"promote: refusing {name} v{candidate.version}: {metric} {new:.4f} is worse than "
            f"champion v{champion.version}'s {old:.4f} (use --force to override)"
        )
    check_loads(
        f"models:/{name}/{candidate.version}",
        f"promote: {name} v{candidate.version} (run {candidate.run_id})",
        refused=KEPT,
        then=KEPT,
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
