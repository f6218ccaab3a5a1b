"""A trained model logged to MLflow (the pyfunc of `pipeline.serving`) and loaded back,
by URI: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/ID/model`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.redact import masked
from pipeline.tracking.store import connect, reaching_the_store


def log_model(model, *, card: dict) -> str:
    """Log the model as the pyfunc of `pipeline.serving.image_model`; return its model URI.

    The pyfunc decodes, resizes and labels images itself; it holds the Keras
    file, the data card and a copy of the package modules it runs
    (`serving.image_model.SERVED_FILES`), not the trainer. Requirements are given,
    not inferred: inference reloads the model in a subprocess and costs tens
    of seconds.
    """
    import shutil
    import tempfile

    import keras

    import pipeline
    from pipeline.atomic import write_json
    from pipeline.serving import image_model as serving

    mlflow = connect()
    with tempfile.TemporaryDirectory() as tmp:
        keras_file, card_file = Path(tmp, "model.keras"), Path(tmp, "data_card.json")
        model.save(keras_file)
        write_json(card_file, masked(card))
        package = Path(pipeline.__file__).parent
        code = Path(tmp, "code", package.name)
        for name in serving.SERVED_FILES:
            (code / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package / name, code / name)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(serving.__file__).with_name("served_model.py")),
            artifacts={
                serving.KERAS_ARTIFACT: str(keras_file),
                serving.CARD_ARTIFACT: str(card_file),
            },
            code_paths=[str(code)],
            signature=serving.signature(card),
            pip_requirements=_requirements(keras),
            metadata={"task": card.get("task", "classification"), "classes": card["classes"]},
        )
    return info.model_uri


def _requirements(keras) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    backend = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[keras.backend.backend()]
    reqs = []
    for package in ("keras", backend, "numpy", "pandas", "pillow"):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{package}=={version(package)}")
    return reqs


def load_keras_model(model_uri: str, *, key: str = "train.init_from"):
    """The Keras model behind `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/ID/model`.

    A ConfigError names `key` (the param or option that gave the URI) when it does not resolve.
    """
    return load_logged_model(model_uri, key=key)[0]


def load_logged_model(model_uri: str, *, key: str, then: str = "") -> tuple[Any, dict]:
    """(Keras model, data card) of a model logged by training, loaded as serving loads it.

    Its files are downloaded through MLflow to a temporary folder (so a remote server's
    too), checked against its MLmodel, and loaded by the pyfunc (the Keras file in safe
    mode). A URI that does not resolve, a missing or damaged file, is a one-line
    ConfigError naming `key`, the URI and the file; a store that fails, one naming the
    store and ending with `then`. The registry checks models this way before an alias
    moves (`model_registry`).
    """
    import tempfile

    from pipeline.errors import ConfigError
    from pipeline.serving.image_model import ImageModel

    mlflow = connect()
    with tempfile.TemporaryDirectory(prefix="logged-model-") as tmp:
        with reaching_the_store(then), _naming_the_uri(model_uri, key), _no_progress_bar():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        problem = _files_problem(local)
        if problem:
            raise ConfigError(
                f"{key} {model_uri!r}: the logged model's {problem}; log it again: "
                "`dvc repro -f train`"
            )
        with _naming_the_uri(model_uri, key, local=local):
            loaded = mlflow.pyfunc.load_model(str(local)).unwrap_python_model()
    if not isinstance(loaded, ImageModel):
        raise ConfigError(f"{key} {model_uri!r}: not a model logged by this pipeline")
    return loaded.keras_model, loaded.card


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow's download bar off (unless MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR is set): the
    tools' stderr is their one-line error, and a model's few files copy in seconds."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def model_and_card(model_uri: str | None, model_dir: Path, prepared_dir: Path, *, key: str):
    """(model, data card) for the tools (predict, explain, probe): the logged or registered
    model `model_uri` (`key` names the option in its errors), else this project's trained
    one with the prepared data's card, checked to fit it."""
    if model_uri:
        return load_logged_model(model_uri, key=key)
    from pipeline.artifacts import check_card_fits_model
    from pipeline.data.data_card import read_card
    from pipeline.layout import data_card_file
    from pipeline.models.saved import MODEL_FILE, load_trained_model

    card = read_card(prepared_dir)
    model = load_trained_model(model_dir)
    check_card_fits_model(card, data_card_file(prepared_dir), model, model_dir / MODEL_FILE)
    return model, card


def _files_problem(local: Path) -> str | None:
    """What is wrong with the files of the logged model in `local`, or None: its MLmodel
    missing or unreadable, or a file the MLmodel lists missing."""
    import yaml

    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        return f"file MLmodel is {_GONE}"
    try:
        flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
        needed = [entry["path"] for entry in flavor.get("artifacts", {}).values()]
        needed += [Path(flavor["model_code_path"]).name] if flavor.get("model_code_path") else []
        needed += [flavor["code"]] if flavor.get("code") else []
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        return f"file MLmodel is damaged (not an MLflow model's description: {reason})"
    missing = next((name for name in needed if not (local / name).exists()), None)
    return f"file {missing} is {_GONE}" if missing else None


_GONE = "missing from the tracking store's artifacts (deleted?)"


# MLflow's error codes for a URI that names nothing: no such model, version, alias or run
_NOT_RESOLVED = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@contextlib.contextmanager
def _naming_the_uri(model_uri: str, key: str, *, local: Path | None = None) -> Iterator[None]:
    """Errors about `model_uri` as one-line ConfigErrors naming `key`: MLflow's when it
    does not resolve (the store's own go to `reaching_the_store`) and, while loading its
    files from `local`, any error of the load, with the file named by its place in the
    logged model."""
    from mlflow.exceptions import MlflowException

    from pipeline.errors import ConfigError, PipelineError

    def shown(text: str) -> str:
        text = text.strip().splitlines()[0] if text.strip() else ""
        return text.replace(f"{local}/", "").replace(str(local), "the model") if local else text

    try:
        yield
    except PipelineError as exc:
        if local is None:
            raise
        raise ConfigError(f"{key} {model_uri!r}: {shown(str(exc))}") from None
    except MlflowException as exc:
        if local is None and exc.error_code not in _NOT_RESOLVED:
            raise  # the store's own trouble: damaged, read-only, its server failing
        raise ConfigError(f"{key} {model_uri!r}: {shown(str(exc)) or exc.error_code}") from None
    except OSError as exc:
        if local is None:
            raise
        where = f" ({shown(os.fsdecode(exc.filename))})" if exc.filename else ""
        raise ConfigError(f"{key} {model_uri!r}: {exc.strerror or exc}{where}") from None
    except Exception as exc:  # the load: yaml, cloudpickle, zip, Keras raise many types
        if local is None:
            raise
        reason = shown(str(exc)) or type(exc).__name__
        raise ConfigError(
            f"{key} {model_uri!r}: the logged model does not load ({reason})"
        ) from None
