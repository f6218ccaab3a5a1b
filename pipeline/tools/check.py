"""`python -m pipeline check`: every section of params.yaml parsed, and the model section
checked against the architecture registry, as `train` would before starting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import config


def run(path: Path = config.DEFAULT_PARAMS) -> dict[str, Any]:
    """The config objects of `path`, each section validated; ConfigError names the key."""
    from pipeline.models.from_config import check_model

    return config.load_all(path, model_check=check_model)
