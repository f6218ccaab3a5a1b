"""A trained model logged to MLflow (the pyfunc of `pipeline.serving`) and loaded back,
by URI: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/ID/model`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.redact import masked
from pipeline.tracking.store import connect


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


def load_logged_model(model_uri: str, *, key: str) -> tuple[Any, dict]:
    """(Keras model, data card) of a model logged by training."""
    from pipeline.errors import ConfigError
    from pipeline.serving.image_model import ImageModel

    mlflow = connect()
    with _naming_the_uri(model_uri, key):
        loaded = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    if not isinstance(loaded, ImageModel):
        raise ConfigError(f"{key} {model_uri!r}: not a model logged by this pipeline")
    return loaded.keras_model, loaded.card


@contextlib.contextmanager
def _naming_the_uri(model_uri: str, key: str) -> Iterator[None]:
    """MLflow's and the file system's errors about `model_uri` as one-line ConfigErrors."""
    from mlflow.exceptions import MlflowException

    from pipeline.errors import ConfigError

    try:
        yield
    except MlflowException as exc:
        text = str(exc).strip()
        first_line = text.splitlines()[0] if text else type(exc).__name__
        raise ConfigError(f"{key} {model_uri!r}: {first_line}") from None
    except OSError as exc:
        raise ConfigError(f"{key} {model_uri!r}: {exc.strerror or exc}") from None
