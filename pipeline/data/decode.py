"""Image and mask decoding, shared by prepare, predict and the served model: any file
PIL reads -> the model's uint8 input, the same way everywhere."""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.errors import DataError

VOID = 255  # void pixels in prepared masks, whatever value the source used


class CorruptImage(DataError):
    """An image or mask file that cannot be decoded; `prepare.on_corrupt` fails or skips."""

    def __init__(self, path: Path, kind: str, exc: BaseException, stage: str = "prepare") -> None:
        if isinstance(exc, UnidentifiedImageError):
            why = "not a recognised image format"
        else:
            lines = str(exc).strip().splitlines()
            why = lines[0] if lines else exc.__class__.__name__
        super().__init__(f"{stage}: cannot decode {kind} {path}: {why}")
        self.path = path


# What PIL raises on a damaged file (struct.error and EOFError from some format plugins).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)


_strict = threading.Lock()


_strict_users = 0


_strict_saved = False


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """PIL raises on a truncated file while this is open, whatever the process set.

    With `ImageFile.LOAD_TRUNCATED_IMAGES` (process-wide; some libraries turn it on), PIL
    fills the missing part of a truncated JPEG or PNG with grey and reports success: a
    damaged file would be trained on. The flag is off from the first decode that enters
    to the last that leaves (decodes run in threads), then restored.
    """
    global _strict_users, _strict_saved
    with _strict:
        if _strict_users == 0:
            _strict_saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _strict_saved


def load_image(
    path: Path, size: tuple[int, int], channels: int, *, stage: str = "prepare"
) -> np.ndarray:
    """Decode one image to uint8 (height, width, channels) for `size` = (height, width),
    whatever its mode or bit depth. A file that does not decode completely (truncated
    included) raises CorruptImage."""
    try:
        with strict_decoding(), Image.open(path) as img:
            img.load()
            return to_model_input(img, size, channels)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{stage}: refusing image {path}: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise CorruptImage(path, "image", exc, stage) from None


def to_model_input(img: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """A decoded image as the model's uint8 (height, width, channels) input: 8-bit, grey or
    RGB (alpha dropped), bilinear resize to `size` = (height, width). Training, evaluate,
    predict and the served model all go through here."""
    height, width = size
    img = _to_8bit(img)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grayscale would be clipped by convert("L"): rescale instead."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
        return Image.fromarray(np.clip(wide * 255.0 / peak, 0, 255).astype(np.uint8))
    if img.mode == "P":
        return img.convert("RGBA")
    return img


def in_threads(func: Callable[[Any], Any], items: list) -> Iterator[Any]:
    """func(item) for each item, in order, run in threads (PIL releases the GIL while it
    decodes); after a failure, no further item is started."""
    pool = ThreadPoolExecutor()
    try:
        yield from pool.map(func, items)
    finally:
        pool.shutdown(cancel_futures=True)


def decode_each(items: list, decode: Callable[[Any], Any]) -> Iterator[Any]:
    """decode(item) for each item, in order; an undecodable file raises, naming it and
    the way out."""

    def attempt(item):
        try:
            return decode(item)
        except CorruptImage as exc:
            raise DataError(
                f"{exc}; replace or delete it, or set prepare.on_corrupt: skip"
            ) from None

    return in_threads(attempt, items)


def decode_all(paths: list[Path], size: tuple[int, int], channels: int) -> np.ndarray:
    """The images as one uint8 (N, height, width, channels) array."""
    images = np.empty((len(paths), *size, channels), dtype=np.uint8)
    decode = lambda path: load_image(path, size, channels)  # noqa: E731
    for i, image in enumerate(decode_each(paths, decode)):
        images[i] = image
    return images


def find_corrupt(items: list, decode: Callable[[Any], Any]) -> list[Path]:
    """The files among `items` that `decode` finds corrupt, in order (for prepare.on_corrupt:
    skip; the decoded arrays are dropped). Other data errors raise."""

    def corrupt_file(item) -> Path | None:
        try:
            decode(item)
        except CorruptImage as exc:
            return exc.path
        return None

    return [path for path in in_threads(corrupt_file, items) if path is not None]


def load_mask(path: Path, size: tuple[int, int], num_classes: int, ignore_index: int) -> np.ndarray:
    """Decode a class-index mask to uint8 (height, width): nearest-neighbour resize only (an
    interpolated class index is another class), source void mapped to VOID."""
    height, width = size
    try:
        with strict_decoding(), Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(
                    f"prepare: mask {path} is {img.mode}; masks hold one class index per "
                    "pixel (a grayscale or palette PNG)"
                )
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.NEAREST)
            values = np.asarray(img).astype(np.int64)
    except _DECODE_ERRORS as exc:
        raise CorruptImage(path, "mask", exc) from None
    void = values == ignore_index
    bad = (values >= num_classes) & ~void
    if bad.any():
        raise DataError(
            f"prepare: mask {path} has value {int(values[bad][0])}, but there are "
            f"{num_classes} classes and void is {ignore_index} (fetch.ignore_index)"
        )
    return np.where(void, VOID, values).astype(np.uint8)


def check_same_size(image: Path, mask: Path) -> None:
    """A mask labels its image pixel for pixel: a different size means a mismatched pair."""
    try:
        with Image.open(image) as img, Image.open(mask) as lab:  # headers only
            image_size, mask_size = img.size, lab.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return  # the decoders below name the unreadable file
    if image_size != mask_size:
        raise DataError(
            f"prepare: mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image.name} "
            f"is {image_size[0]}x{image_size[1]}; a mask must match its image pixel for pixel"
        )
