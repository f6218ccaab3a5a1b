"""The data card, `data/prepared/data_card.json`: classes, image shape, counts, hashes and
the prepare settings. Not the model card (`pipeline.models.model_card`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import damaged, read_json
from pipeline.layout import PREPARED_DIR, data_card_file

# What the stages and tools read from a card, by type: a card lacking one is damaged.
CARD_KEYS = {
    "classes": list,
    "num_classes": int,
    "image_shape": list,
    "counts": dict,
    "totals": dict,
    "source": dict,
    "data_hash": str,
}


def read_card(prepared_dir: Path = PREPARED_DIR) -> dict:
    """The data card written by prepare; missing, damaged or self-contradicting, a DataError
    naming it (a missing card means prepare has not run)."""
    path = data_card_file(prepared_dir)
    card = read_json(path, CARD_KEYS)
    shape = card["image_shape"]
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise damaged(path, f"'image_shape' must be [height, width, channels], got {shape}")
    if len(card["classes"]) != card["num_classes"]:
        raise damaged(
            path, f"names {len(card['classes'])} classes but 'num_classes' is {card['num_classes']}"
        )
    return card
