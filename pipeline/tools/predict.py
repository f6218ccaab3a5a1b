"""`python -m pipeline predict`: a trained model on a folder of images.

The model is this project's last trained one (`data/model`) or, with
`--model`, any logged or registered one (`models:/NAME@champion`,
`models:/NAME/VERSION`, `runs:/ID/model`); its data card (from `data/prepared`,
or logged with its run) gives the classes and the input size. Images are
decoded and resized exactly as `prepare` did for training.

A classifier writes one CSV row per image: file, class, probability and the
top-5 classes (`|`-separated). A segmentation model writes, per image,
`<stem>.png` (colour-coded classes, legend in `classes.csv`) and
`<stem>_classes.png` (class indices), both resized back to the image's own
size by nearest neighbour.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_file
from pipeline.errors import DataError
from pipeline.layout import IMAGE_SUFFIXES, MODEL_DIR, PREPARED_DIR
from pipeline.serving.outputs import mask_at_size, ranked

BATCH = 32


def run(
    images_dir: Path,
    output: Path,
    *,
    model_uri: str | None = None,
    model_dir: Path = MODEL_DIR,
    prepared_dir: Path = PREPARED_DIR,
    progress: bool = False,
) -> int:
    """Predict every image under `images_dir`; return how many.

    `output` is a folder, or for a classifier also a `.csv` file path (default
    name in a folder: predictions.csv).
    """
    from PIL import Image
    from tqdm import tqdm

    from pipeline.data.decode import load_image
    from pipeline.tracking.logged_models import model_and_card

    if not images_dir.is_dir():
        raise DataError(f"predict: {images_dir} is not a folder of images")
    paths = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"predict: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images_dir}")
    model, card = model_and_card(model_uri, model_dir, prepared_dir, key="predict --model")
    height, width, channels = card["image_shape"]
    classes = card["classes"]
    segmentation = card.get("task") == "segmentation"
    if segmentation and output.suffix.lower() == ".csv":
        raise DataError(f"predict: {output}: a segmentation model writes masks into a folder")
    csv_path = output if output.suffix.lower() == ".csv" else output / "predictions.csv"
    out_dir = output if segmentation else csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    # closed on an error too, so the error starts a line of its own
    with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress) as bar:
        for start in range(0, len(paths), BATCH):
            chunk = paths[start : start + BATCH]
            size = (height, width)
            batch = np.stack([load_image(p, size, channels, stage="predict") for p in chunk])
            probs = np.asarray(model.predict_on_batch(batch.astype(np.float32)))
            for path, prob in zip(chunk, probs, strict=True):
                name = path.relative_to(images_dir)
                if segmentation:
                    with Image.open(path) as original:
                        mask = mask_at_size(prob, original.size)
                    _write_masks(mask, classes, out_dir / name.with_suffix(""))
                else:
                    top = ranked(prob, classes)
                    top5 = "|".join(top["top5"])
                    rows.append([name.as_posix(), top["class"], f"{top['probability']:.6f}", top5])
            bar.update(len(chunk))
    if segmentation:
        _write_legend(classes, out_dir / "classes.csv")
    else:
        with atomic_file(csv_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class", "probability", "top5"])
            writer.writerows(rows)
    return len(paths)


def _write_masks(mask: np.ndarray, classes: list[str], stem: Path) -> None:
    from PIL import Image

    from pipeline.scoring.plots import colour_mask

    for suffix, pixels in (("_classes", mask), ("", colour_mask(mask, len(classes)))):
        with atomic_file(stem.parent / f"{stem.name}{suffix}.png") as tmp:
            Image.fromarray(pixels).save(tmp)


def _write_legend(classes: list[str], path: Path) -> None:
    from pipeline.scoring.plots import class_colours

    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "class", "r", "g", "b"])
        for index, (name, rgb) in enumerate(zip(classes, class_colours(len(classes)), strict=True)):
            writer.writerow([index, name, *map(int, rgb)])
