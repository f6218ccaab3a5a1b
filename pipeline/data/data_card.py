"""The data card, `data/prepared/data_card.json`: classes, image shape, counts, hashes and
the prepare settings. Not the model card (`pipeline.models.model_card`)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import DataError
from pipeline.layout import PREPARED_DIR, data_card_file


def read_card(prepared_dir: Path = PREPARED_DIR) -> dict:
    """The data card written by `run`; a missing card means prepare has not run."""
    path = data_card_file(prepared_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found; run `python -m pipeline prepare` first") from None
