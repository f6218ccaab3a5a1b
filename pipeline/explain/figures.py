"""Small PNG grids for `pipeline.explain`: heatmaps over images, and tiles of maps,
filters or synthesised images. Written atomically, through `scoring.plots`' Agg figures
(no pyplot, nothing left open)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TILE_INCHES = 1.6  # at scoring.plots.DPI (100): tiles of 160 px, PNGs of tens of KB
HEAT_ALPHA = 0.45


def overlay_grid(
    images: np.ndarray,
    heatmaps: np.ndarray,
    titles: Sequence[str],
    path: Path,
    *,
    columns: int | None = None,
) -> Path:
    """Heatmaps (N, H, W) in [0, 1] drawn over images (uint8 N, H, W, C; grey or RGB),
    one titled tile each, as one PNG at `path`."""
    images = np.asarray(images)
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    if len(images) != len(heatmaps) or len(titles) != len(images):
        raise ValueError(
            f"overlay_grid: {len(images)} images, {len(heatmaps)} heatmaps, {len(titles)} titles"
        )

    def draw(ax, i):
        ax.imshow(_displayable(images[i]), cmap="gray", vmin=0, vmax=255)
        height, width = images[i].shape[:2]
        ax.imshow(
            heatmaps[i],
            cmap="jet",
            alpha=HEAT_ALPHA,
            vmin=0,
            vmax=1,
            extent=(-0.5, width - 0.5, height - 0.5, -0.5),
            interpolation="bilinear",
        )

    return _grid(len(images), titles, path, draw, columns)


def tile_grid(
    tiles: np.ndarray,
    titles: Sequence[str],
    path: Path,
    *,
    columns: int | None = None,
    cmap: str = "viridis",
    limits: tuple[float, float] | None = None,
) -> Path:
    """Tiles as one PNG: (N, H, W) maps drawn with `cmap`, or (N, H, W, 3) RGB images
    (uint8, or floats). Each float tile is scaled to its own range, or with `limits`
    (low, high) all to the same one (filters: 0.5 is a zero weight)."""
    tiles = np.asarray(tiles)
    low, high = limits if limits else (None, None)

    def draw(ax, i):
        tile = tiles[i]
        if tile.ndim == 3 and tile.shape[-1] == 1:
            tile = tile[..., 0]
        if tile.ndim == 2:
            ax.imshow(tile, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        elif limits and tile.dtype != np.uint8:
            scaled = np.clip((tile - low) / (high - low), 0, 1)
            ax.imshow((scaled * 255).round().astype(np.uint8), interpolation="nearest")
        else:
            ax.imshow(_to_uint8(tile), interpolation="nearest")

    return _grid(len(tiles), titles, path, draw, columns)


def _grid(count: int, titles: Sequence[str], path: Path, draw, columns: int | None) -> Path:
    from pipeline.scoring.plots import new_figure, save_figure

    if count == 0:
        raise ValueError(f"figures: nothing to draw into {path}")
    columns = columns or min(count, 8)
    rows = math.ceil(count / columns)
    fig = new_figure(TILE_INCHES * columns, (TILE_INCHES + 0.2) * rows)
    for i in range(count):
        ax = fig.add_subplot(rows, columns, i + 1)
        draw(ax, i)
        ax.set_title(titles[i], fontsize=7)
        ax.set_axis_off()
    fig.tight_layout(pad=0.8)
    return save_figure(fig, path)


def _displayable(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) for grey, (H, W, 3) for colour."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return image.astype(np.uint8) if image.dtype != np.uint8 else image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return (scaled * 255).round().astype(np.uint8)
