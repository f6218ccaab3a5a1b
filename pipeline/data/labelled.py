"""New labelled data for a trained model: a folder or an archive (path or http(s) URL),
fetched and decoded exactly as `fetch` and `prepare` would, at the model's image size
and channels, labelled with the model's class indices by class name.

`score` reads its data here. The layouts are fetch's: `[<split>/]<class>/<images>` for
a classifier, `[<split>/]{images,masks}/` with `classes.txt` for segmentation. Every
problem is one DataError line naming the file, folder or class.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, DataError
from pipeline.redact import mask_uri

STAGE = "score"
# PIL modes without colour: a grayscale model reads them as they are, an RGB one would not
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclass(frozen=True)
class LabelledData:
    """Decoded images and their labels in the model's class indices (masks for
    segmentation), with where they came from."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int32 (N,) class indices, or uint8 (N, H, W) masks
    classes: list[str]  # the data's classes, a subset of the model's
    task: str
    source: str  # the path or URL, credentials masked
    split: str  # the split scored, "all" for data without split folders
    digest: str  # sha256 of images and labels, as prepare digests a split
    archive_sha256: str  # of the archive as downloaded ("" for a folder)


def load(
    location: str,
    card: dict,
    *,
    split: str | None = None,
    sha256: str = "",
    timeout_s: float = 60,
    allow_missing_classes: bool = False,
) -> LabelledData:
    """Fetch `location` (a folder, or an archive's path or URL, checked against `sha256`)
    and decode the chosen split for the model whose data card is `card`.

    `split`: a split folder of the data; default `test` where it has split folders,
    the whole of it where it has none.
    """
    from pipeline.config import FetchConfig
    from pipeline.data import sources

    folder = Path(location).expanduser()
    is_url = location.lower().startswith(("http://", "https://"))
    with tempfile.TemporaryDirectory(prefix="score-") as tmp:
        if not is_url and folder.is_dir():
            if sha256:
                raise ConfigError(f"--sha256 checks an archive; {location} is a folder")
            layout = sources.read_folder(folder.absolute(), str(location))
            roots = layout.folders if layout.split else {"all": layout.root}
            task, archive_digest = layout.task, ""
            data_classes = layout.classes
        else:
            if not is_url and not folder.exists():
                raise DataError(f"{STAGE}: {location}: no such folder or archive")
            work = Path(tmp)
            cfg = FetchConfig(source="archive", url=location, sha256=sha256, timeout_s=timeout_s)
            try:
                info = sources.fetch_archive(cfg, work)
            except DataError as exc:  # fetch's words, said by this command
                raise DataError(str(exc).replace("fetch: ", f"{STAGE}: ", 1)) from None
            splits = info["splits"]
            roots = {s: work / s for s in splits} if splits else {"all": work}
            task, archive_digest = info["task"], info["sha256"]
            data_classes = info["classes"]
        model_task = card.get("task", "classification")
        if task != model_task:
            kind = "images/ and masks/" if task == "segmentation" else "class folders"
            raise DataError(
                f"{STAGE}: {mask_uri(location)} is {task} data ({kind}) and the model is a "
                f"{model_task} model; score it with a {task} model"
            )
        chosen = _chosen_split(roots, split, location)
        check_classes(data_classes, card["classes"], location, allow_missing_classes)
        if task == "segmentation":
            images, labels = _decode_pairs(roots[chosen], card, location)
        else:
            images, labels = _decode_classes(roots[chosen], card, location)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return LabelledData(
        images,
        labels,
        sorted(data_classes) if task != "segmentation" else list(data_classes),
        task,
        mask_uri(location),
        chosen,
        digest,
        archive_digest,
    )


def _chosen_split(roots: dict[str, Path], split: str | None, location: str) -> str:
    if "all" in roots:
        if split is not None:
            raise ConfigError(
                f"--split {split}: {mask_uri(location)} has no split folders "
                "(train/, val/, test/); leave --split out to score all of it"
            )
        return "all"
    wanted = split or "test"
    if wanted not in roots:
        raise ConfigError(
            f"--split {wanted}: {mask_uri(location)} has no {wanted}/ folder "
            f"(it has {', '.join(sorted(roots))})"
        )
    return wanted


def check_classes(data: list[str], model: list[str], location: str, allow_missing: bool) -> None:
    """Every class of the data must be one the model knows; the model's classes missing
    from the data are refused unless `allow_missing` (a subset is then scored)."""
    unknown = [name for name in data if name not in model]
    if unknown:
        raise DataError(
            f"{STAGE}: class {unknown[0]!r} of {mask_uri(location)} is not a class of the model "
            f"({_listed(model)})"
            + (f"; {len(unknown) - 1} more unknown" if len(unknown) > 1 else "")
        )
    missing = [name for name in model if name not in data]
    if missing and not allow_missing:
        raise DataError(
            f"{STAGE}: {mask_uri(location)} has no images of the model's class"
            f"{'es' if len(missing) > 1 else ''} {_listed(missing)}; add them, or score the "
            "classes it has with --allow-missing-classes"
        )


def _listed(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _decode_classes(root: Path, card: dict, location: str) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.data.decode import decode_each, load_image
    from pipeline.data.listing import class_images

    height, width, channels = card["image_shape"]
    index = {name: i for i, name in enumerate(card["classes"])}
    found = class_images(root, STAGE)
    paths = [path for name in sorted(found) for path in found[name]]
    labels = np.array([index[name] for name in sorted(found) for _ in found[name]], np.int32)
    check_channels(paths, channels)
    images = np.empty((len(paths), height, width, channels), np.uint8)
    decode = lambda path: load_image(path, (height, width), channels, stage=STAGE)  # noqa: E731
    for i, image in enumerate(decode_each(paths, decode)):
        images[i] = image
    return images, labels


def _decode_pairs(root: Path, card: dict, location: str) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.data.decode import VOID, check_same_size, decode_each, load_image, load_mask
    from pipeline.data.listing import image_mask_pairs

    height, width, channels = card["image_shape"]
    pairs = image_mask_pairs(root, STAGE)
    check_channels([image for image, _ in pairs], channels)
    # the void value of the data the model was trained on (CamVid's 11): new data of the
    # same kind shares it
    ignore_index = int(card.get("source", {}).get("ignore_index", VOID))

    def decode(pair):
        check_same_size(*pair)
        image = load_image(pair[0], (height, width), channels, stage=STAGE)
        return image, load_mask(pair[1], (height, width), card["num_classes"], ignore_index)

    images = np.empty((len(pairs), height, width, channels), np.uint8)
    masks = np.empty((len(pairs), height, width), np.uint8)
    for i, (image, mask) in enumerate(decode_each(pairs, decode)):
        images[i], masks[i] = image, mask
    return images, masks


def check_channels(paths: list[Path], channels: int) -> None:
    """A grayscale model given colour images, or an RGB one given grayscale images, is
    refused, naming the first such file (read from its header: no pixels decoded)."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as img:
                mode = img.mode
        except (OSError, UnidentifiedImageError):
            continue  # decoding names it
        grey = mode in GREY_MODES
        if channels == 1 and not grey:
            raise DataError(
                f"{STAGE}: {path} is a colour image ({mode}) and the model reads grayscale "
                "(1 channel, its data card); score it with an RGB model or convert the images"
            )
        if channels == 3 and grey:
            raise DataError(
                f"{STAGE}: {path} is a grayscale image ({mode}) and the model reads RGB "
                "(3 channels, its data card); score it with a grayscale model"
            )
