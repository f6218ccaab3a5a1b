"""`python -m pipeline predict IMAGES_DIR --out OUT`: the trained model on a folder of images.

Images are decoded and resized exactly as `prepare` did for training (size and
channels from the data card). A classifier writes `OUT/predictions.csv` (file,
class, probability); a segmentation model writes, per image, `<stem>.png`
(colour-coded classes, legend in `OUT/classes.csv`) and `<stem>_classes.png`
(class indices), both resized back to the image's own size by nearest neighbour.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.data.layout import IMAGE_SUFFIXES, MODEL_DIR, PREPARED_DIR
from pipeline.errors import DataError

BATCH = 32


def run(
    images_dir: Path,
    out_dir: Path,
    *,
    model_dir: Path = MODEL_DIR,
    prepared_dir: Path = PREPARED_DIR,
) -> int:
    """Predict every image under `images_dir` into `out_dir`; return how many."""
    from PIL import Image

    from pipeline.data.prepare import load_image, read_card
    from pipeline.evaluate import load_trained_model

    if not images_dir.is_dir():
        raise DataError(f"predict: {images_dir} is not a folder of images")
    paths = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"predict: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images_dir}")
    card = read_card(prepared_dir)
    model = load_trained_model(model_dir)
    height, width, channels = card["image_shape"]
    classes = card["classes"]
    out_dir.mkdir(parents=True, exist_ok=True)
    segmentation = card.get("task") == "segmentation"
    rows = []
    for start in range(0, len(paths), BATCH):
        chunk = paths[start : start + BATCH]
        batch = np.stack([load_image(p, (height, width), channels) for p in chunk]).astype(
            np.float32
        )
        probs = np.asarray(model.predict_on_batch(batch))
        for path, prob in zip(chunk, probs, strict=True):
            name = path.relative_to(images_dir)
            if segmentation:
                with Image.open(path) as original:
                    shape = original.size
                _write_masks(prob.argmax(axis=-1), classes, shape, out_dir / name.with_suffix(""))
            else:
                best = int(prob.argmax())
                rows.append([name.as_posix(), classes[best], f"{prob[best]:.6f}"])
    if segmentation:
        _write_legend(classes, out_dir / "classes.csv")
    else:
        with open(out_dir / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class", "probability"])
            writer.writerows(rows)
    return len(paths)


def _write_masks(mask: np.ndarray, classes: list[str], size: tuple[int, int], stem: Path) -> None:
    from PIL import Image

    from pipeline.plots import colour_mask

    stem.parent.mkdir(parents=True, exist_ok=True)
    indices = Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    indices.save(stem.parent / f"{stem.name}_classes.png")
    colours = colour_mask(np.asarray(indices), len(classes))
    Image.fromarray(colours).save(stem.parent / f"{stem.name}.png")


def _write_legend(classes: list[str], path: Path) -> None:
    from pipeline.plots import class_colours

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "class", "r", "g", "b"])
        for index, (name, rgb) in enumerate(zip(classes, class_colours(len(classes)), strict=True)):
            writer.writerow([index, name, *map(int, rgb)])
