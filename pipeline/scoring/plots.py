"""PNG figures and the confusion CSV that the evaluate and train stages write.

matplotlib is imported lazily, inside each function, so importing this module
costs nothing. Figures are built as `matplotlib.figure.Figure` objects on the
Agg canvas rather than through pyplot: they never enter pyplot's global figure
registry, so nothing leaks across many calls and no GUI backend is touched;
each function still closes its figure explicitly. Every function creates the
parent directory of `path` and returns the path it wrote.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_file

# Above this many classes, cell counts would be unreadable: colour only.
MAX_ANNOTATED_CLASSES = 30
# Above this many classes, tick labels would overlap: none are drawn.
MAX_TICK_LABELS = 60
DPI = 100


def new_figure(width: float, height: float):
    """A Figure on the Agg canvas, outside pyplot's registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save `fig` as PNG at `path` (parent created), then close it."""
    out = Path(path)
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        _close(fig)
    return out


def _close(fig) -> None:
    """Release a figure's memory; also drop it from pyplot if it is registered there."""
    import sys

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    fig.clear()


def confusion_matrix_png(
    cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike
) -> Path:
    """Heatmap of a confusion matrix (rows = true, columns = predicted).

    Colour is row-normalised (the fraction of each true class), so rare classes
    are as visible as common ones; the cells show raw counts, unless there are
    more than MAX_ANNOTATED_CLASSES classes.
    """
    cm = np.asarray(cm)
    n = len(class_names)
    if cm.ndim != 2 or cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} class names")
    row_sums = cm.sum(axis=1, keepdims=True).astype(np.float64)
    frac = np.zeros(cm.shape, dtype=np.float64)
    np.divide(cm, row_sums, out=frac, where=row_sums != 0)

    side = min(max(4.0, 0.45 * n + 2.5), 24.0)
    fig = new_figure(side + 1.0, side)
    try:
        ax = fig.add_subplot()
        image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
        if n <= MAX_TICK_LABELS:
            ax.set_xticks(
                range(n),
                labels=[str(c) for c in class_names],
                rotation=45,
                ha="right",
                rotation_mode="anchor",
            )
            ax.set_yticks(range(n), labels=[str(c) for c in class_names])
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if n <= MAX_ANNOTATED_CLASSES:
            fontsize = 9 if n <= 15 else 7
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        str(int(cm[i, j])),
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="white" if frac[i, j] > 0.5 else "black",
                    )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix ({int(cm.sum())} images)")
        fig.tight_layout()
    except BaseException:
        _close(fig)
        raise
    return save_figure(fig, path)


# Panels: (title, y label, [(legend label, accepted history keys in order of preference)]).
# Keras' own History keys ("loss", "accuracy") are accepted as the train series.
_PANELS = (
    ("Loss", "loss", [("train", ("train_loss", "loss")), ("val", ("val_loss",))]),
    (
        "Accuracy",
        "accuracy",
        [("train", ("train_accuracy", "accuracy")), ("val", ("val_accuracy",))],
    ),
    ("Mean IoU", "mIoU", [("train", ("train_miou",)), ("val", ("val_miou",))]),
    ("Learning rate", "learning rate", [("learning rate", ("learning_rate", "lr"))]),
)


def _series(history: Mapping[str, Sequence[float]], keys: Sequence[str]) -> list[float] | None:
    """The first non-empty history series among `keys`, as floats, or None."""
    for key in keys:
        values = history.get(key)
        if values is not None and len(values) > 0:
            return [float("nan") if v is None else float(v) for v in values]
    return None


def training_curves_png(history: Mapping[str, Sequence[float]], path: str | os.PathLike) -> Path:
    """Per-epoch curves side by side: loss, accuracy and learning rate, each if present.

    `history` maps keys such as train_loss, val_loss, train_accuracy,
    val_accuracy, learning_rate to one value per epoch; absent keys drop their
    line, and a panel with no line is left out. Epochs are numbered from 1.
    """
    panels = []
    for title, ylabel, lines in _PANELS:
        found = [(label, s) for label, keys in lines if (s := _series(history, keys)) is not None]
        if found:
            panels.append((title, ylabel, found))
    if not panels:
        raise ValueError(
            "history has no plottable series; expected some of train_loss, val_loss, "
            f"train_accuracy, val_accuracy, learning_rate, got {sorted(history)}"
        )

    from matplotlib.ticker import MaxNLocator

    fig = new_figure(4.5 * len(panels), 3.8)
    try:
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, ylabel, found) in zip(axes, panels, strict=True):
            longest = 1
            for label, values in found:
                epochs = np.arange(1, len(values) + 1)
                longest = max(longest, len(values))
                ax.plot(
                    epochs,
                    values,
                    marker="o" if len(values) <= 30 else None,
                    markersize=3,
                    label=label,
                )
            if title == "Learning rate":
                positive = [v for _, vals in found for v in vals if np.isfinite(v) and v > 0]
                if positive and max(positive) / min(positive) > 10:
                    ax.set_yscale("log")
            ax.set_xlim(0.5, longest + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            if len(found) > 1:
                ax.legend()
        fig.tight_layout()
    except BaseException:
        _close(fig)
        raise
    return save_figure(fig, path)


def per_class_png(
    report_per_class: Mapping[str, Mapping[str, float]], path: str | os.PathLike
) -> Path:
    """Grouped bar chart of precision and recall per class.

    Takes the `per_class` part of `metrics.classification_report`: {name:
    {"precision": .., "recall": .., ...}}, in the order given.
    """
    return _per_class_bars(
        report_per_class, ("precision", "recall"), "Per-class precision and recall", path
    )


def _per_class_bars(
    per_class: Mapping[str, Mapping[str, float | None]],
    keys: Sequence[str],
    title: str,
    path: str | os.PathLike,
) -> Path:
    """One group of bars per class, one bar per key (an undefined value draws none)."""
    if not per_class:
        raise ValueError("per-class report is empty")
    names = [str(n) for n in per_class]
    n = len(names)
    x = np.arange(n)
    width = 0.8 / len(keys)

    fig = new_figure(min(max(6.0, 0.5 * n + 2.0), 30.0), 4.5)
    try:
        ax = fig.add_subplot()
        for k, key in enumerate(keys):
            values = [float(v[key] or 0.0) for v in per_class.values()]
            ax.bar(x + (k - (len(keys) - 1) / 2) * width, values, width, label=key)
        if n <= MAX_TICK_LABELS:
            ax.set_xticks(
                x, labels=names, rotation=45 if n > 10 else 0, ha="right" if n > 10 else "center"
            )
        else:
            ax.set_xticks([])
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylim(0.0, 1.05)
        ax.set_xlabel("class")
        ax.set_ylabel("score")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never hides a bar
        fig.tight_layout()
    except BaseException:
        _close(fig)
        raise
    return save_figure(fig, path)


def confusion_csv(
    labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str], path: str | os.PathLike
) -> Path:
    """Write `actual,predicted` rows of class names, one per test image.

    This is the input DVC's `confusion` plot template reads
    (`dvc plots show` with `x: actual`, `y: predicted`).
    """
    labels = np.asarray(labels).astype(np.int64)
    preds = np.asarray(preds).astype(np.int64)
    n = len(class_names)
    if labels.ndim != 1 or labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} must be 1-D, same length")
    for name, values in (("labels", labels), ("preds", preds)):
        if values.size and (values.min() < 0 or values.max() >= n):
            raise ValueError(f"{name} must be in [0, {n}) for {n} class names")
    names = [str(c) for c in class_names]
    out = Path(path)
    with atomic_file(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["actual", "predicted"])
        writer.writerows((names[a], names[p]) for a, p in zip(labels, preds, strict=True))
    return out


# --------------------------------------------------------------------------- segmentation

VOID_COLOUR = (0, 0, 0)


def class_colours(num_classes: int) -> np.ndarray:
    """uint8 RGB per class (matplotlib's tab20, then hsv beyond 20); void is black."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"] if num_classes <= 20 else colormaps["hsv"]
    steps = np.linspace(0, 1, num_classes, endpoint=num_classes > 20)
    colours = (np.asarray([cmap(float(t))[:3] for t in steps]) * 255).round()
    return colours.astype(np.uint8)


def colour_mask(mask: np.ndarray, num_classes: int, void: int | None = None) -> np.ndarray:
    """A class-index map (H, W) as an RGB image (H, W, 3); void (and out of range) black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:num_classes] = class_colours(num_classes)
    if void is not None:
        palette[void] = VOID_COLOUR
    return palette[np.clip(mask, 0, 255).astype(np.uint8)]


def segmentation_examples_png(
    images: np.ndarray,
    masks: np.ndarray,
    preds: np.ndarray,
    classes: Sequence[str],
    void: int,
    path: str | os.PathLike,
) -> Path:
    """One row per image: the input, ground truth, prediction, and the prediction
    blended over the input; a legend of class colours (void black)."""
    n = len(images)
    fig = new_figure(12, 3 * n + 0.8)
    try:
        colours = class_colours(len(classes))
        for row in range(n):
            image = images[row]
            rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
            rgb = rgb.astype(np.uint8)
            truth = colour_mask(masks[row], len(classes), void)
            predicted = colour_mask(preds[row], len(classes))
            overlay = (0.5 * rgb + 0.5 * predicted).astype(np.uint8)
            for col, (title, picture) in enumerate(
                [("input", rgb), ("ground truth", truth), ("prediction", predicted),
                 ("overlay", overlay)]
            ):  # fmt: skip
                ax = fig.add_subplot(n, 4, row * 4 + col + 1)
                ax.imshow(picture, interpolation="nearest")
                ax.set_axis_off()
                if row == 0:
                    ax.set_title(title)
        from matplotlib.patches import Patch

        handles = [Patch(color=colours[i] / 255, label=name) for i, name in enumerate(classes)]
        handles.append(Patch(color=np.array(VOID_COLOUR) / 255, label="void"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    except BaseException:
        _close(fig)
        raise
    return save_figure(fig, path)


def per_class_iou_png(per_class: Mapping[str, Mapping[str, float | None]], path) -> Path:
    """Bars of IoU and Dice per class (a class with no pixels and no predictions: none)."""
    return _per_class_bars(per_class, ("iou", "dice"), "Per-class IoU and Dice (test)", path)


def runs_per_class_iou_png(
    iou: Mapping[str, Mapping[str, float | None]], runs: Sequence[str], path
) -> Path:
    """`compare`'s grouped bars: {class: {run: test IoU}}, one bar per run in each class."""
    return _per_class_bars(iou, runs, "Per-class test IoU by run", path)
