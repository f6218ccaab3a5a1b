"""A model's outputs over a prepared split: class probabilities, or a streamed pixel
confusion matrix with a few examples for the plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import DataError


def predict_split(model, prepared_dir: Path, split: str, batch_size: int, tta: str = "none"):
    """(probabilities, labels) of one prepared split, averaged over `tta`'s views."""
    from pipeline.data.loader import ArrayBatches, load_split

    images, labels = load_split(prepared_dir, split)
    if not len(labels):
        raise DataError(f"{prepared_dir}: the {split} split is empty")
    if tta == "none":
        probs = model.predict(ArrayBatches(images, labels, batch_size), verbose=0)
        return np.asarray(probs, dtype=np.float64), np.asarray(labels)
    return classify(model, np.asarray(images), batch_size, tta), np.asarray(labels)


def classify(model, images: np.ndarray, batch_size: int, tta: str = "none") -> np.ndarray:
    """float64 class probabilities of uint8 `images`, batch by batch, averaged over `tta`'s
    views (`scoring.tta`)."""
    from pipeline.scoring import tta as views

    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        out.append(views.average(model.predict_on_batch, batch, tta))
    return np.concatenate(out)


EXAMPLES = 6  # test images drawn with ground truth and prediction


def segment_split(
    model, prepared_dir: Path, split: str, batch_size: int, card: dict, tta: str = "none"
):
    """The split's pixel confusion matrix (void excluded), streamed batch by batch, and the
    first EXAMPLES (images, masks, predictions); `tta`: flip or none."""
    from pipeline.data.loader import load_split

    images, masks = load_split(prepared_dir, split)
    if not len(masks):
        raise DataError(f"{prepared_dir}: the {split} split is empty")
    return segment(model, images, masks, batch_size, card, tta)


def segment(model, images, masks, batch_size: int, card: dict, tta: str = "none"):
    """`segment_split` over arrays: (pixel confusion matrix, first EXAMPLES)."""
    from pipeline.scoring import tta as views
    from pipeline.scoring.metrics import PixelConfusion

    confusion = PixelConfusion(card["num_classes"], ignore_index=card["ignore_index"])
    examples = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
        preds = views.average(model.predict_on_batch, batch, tta, pixels=True).argmax(axis=-1)
        confusion.update(masks[start : start + batch_size], preds)
        if len(examples) < EXAMPLES:
            examples.append(preds[: EXAMPLES - len(examples)])
    shown = np.concatenate(examples)
    return confusion.matrix, (images[: len(shown)], masks[: len(shown)], shown)
