"""Linear probes: has a layer captured the object's identity?

The network is frozen; each stage's last map (`graph.stage_ends`) is average-pooled over
space into one vector per image, and a logistic regression (scikit-learn, on standardised
features) is fitted on the train split and scored on val and test. Accuracy rising from
stage to stage shows where the class becomes linearly readable. Beside the stages: the
penultimate vector (what the classifier's own last Dense reads) when it is not just the
last stage pooled, a chance row (always the most frequent train class) and the model's
own top-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
MAX_TRAIN = 5000
BATCH = 256
COLUMNS = ("layer", "kind", "resolution", "features", "train_top1", "val_top1", "test_top1")


@dataclass(frozen=True)
class Probe:
    """One row of the table: where the features come from, and the probe's accuracy."""

    layer: str
    kind: str  # "stage N", "penultimate", "chance", "model"
    resolution: str  # the map's height x width before pooling ("" for vectors)
    features: int
    train_top1: float
    val_top1: float
    test_top1: float

    def as_row(self) -> dict:
        return {c: getattr(self, c) for c in COLUMNS}


def probe_layers(model) -> list[tuple[str, object, str]]:
    """(kind, layer, resolution) of what is probed: each stage's end, then the vector the
    last Dense layer reads if it is more than the last stage average-pooled.

    A resolution reached by pooling alone (simple_cnn's max-pool after its last stage)
    learns nothing of its own: it is labelled "stage N pooled", not counted as a stage.
    """
    from pipeline.explain import graph

    learning = _resolutions_with_weights(model)
    found, stage = [], 0
    for layer in graph.stage_ends(model):
        height, width = layer.output.shape[1:3]
        if (height, width) in learning or not stage:
            stage += 1
            kind = f"stage {stage}"
        else:
            kind = f"stage {stage} pooled"
        found.append((kind, layer, f"{height}x{width}"))
    penultimate = _penultimate(model)
    if penultimate is not None and not _pools(penultimate, found[-1][1] if found else None):
        found.append(("penultimate", penultimate, ""))
    if not found:
        raise ConfigError(f"probe: {model.name} has no spatial stage nor dense head to probe")
    return found


def _resolutions_with_weights(model) -> set[tuple]:
    """The (height, width) of every map some layer with weights writes."""
    found = set()
    for layer in model.layers:
        shape = getattr(getattr(layer, "output", None), "shape", ())
        if len(shape) == 4 and layer.weights:
            found.add(tuple(shape[1:3]))
    return found


def _penultimate(model):
    """The layer whose (batch, features) output the last Dense layer reads, or None."""
    dense = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    if not dense:
        return None
    parent = _only_parent(dense[-1])
    if parent is None or len(getattr(parent.output, "shape", ())) != 2:
        return None
    return parent


def _pools(layer, stage_end) -> bool:
    """Whether `layer` is a global average pooling of `stage_end`, maybe behind dropout
    (the identity at inference): the same vector as the stage's pooled row."""
    while type(layer).__name__ in ("Dropout", "SpatialDropout1D", "Identity"):
        layer = _only_parent(layer)
    if stage_end is None or type(layer).__name__ != "GlobalAveragePooling2D":
        return False
    return _only_parent(layer) is stage_end


def _only_parent(layer):
    parents = [p.operation for node in layer._inbound_nodes for p in node.parent_nodes]
    return parents[0] if len(parents) == 1 else None


def pooled_features(model, images: np.ndarray, *, batch_size: int = BATCH):
    """(features per probed layer: list of (N, D) float32, the model's outputs (N, K)),
    the images fed raw (0..255) in batches, in inference mode."""
    import keras

    from pipeline.explain.gradients import predict

    probed = probe_layers(model)
    outputs = []
    for _, layer, resolution in probed:
        out = layer.output
        if resolution:
            out = keras.layers.GlobalAveragePooling2D(name=f"probe_pool_{layer.name}")(out)
        outputs.append(out)
    tap = keras.Model(model.inputs[0], [*outputs, model.output], name=f"{model.name}_probe")
    chunks: list[list[np.ndarray]] = [[] for _ in range(len(outputs) + 1)]
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
        for chunk, value in zip(chunks, predict(tap, batch), strict=True):
            chunk.append(np.asarray(value, dtype=np.float32))
    arrays = [np.concatenate(c) for c in chunks]
    return arrays[:-1], arrays[-1]


def load_splits(prepared_dir: Path, card: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images and labels of train, val and test; a split the prepared data lacks is a
    DataError naming it."""
    from pipeline.data.loader import load_split
    from pipeline.layout import images_file

    found = {}
    for split in SPLITS:
        path = images_file(prepared_dir, split)
        if not card.get("totals", {}).get(split) or not path.is_file():
            raise DataError(
                f"probe: {prepared_dir} has no {split} split ({path.name} missing or empty): "
                "the probe fits on train and scores val and test; rebuild with `dvc repro prepare`"
            )
        found[split] = load_split(prepared_dir, split)
    return found


def run_probes(
    model,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    max_train: int = MAX_TRAIN,
    seed: int = 42,
    batch_size: int = BATCH,
) -> list[Probe]:
    """The probe table: one row per probed layer, then chance, then the model itself.

    At most `max_train` train images (a seeded random subset) fit the probes; val and test
    are scored whole.
    """
    if max_train < 1:
        raise ConfigError(f"probe --max-train {max_train}: give a positive number of images")
    train_images, train_labels = splits["train"]
    if len(train_images) > max_train:
        pick = np.sort(np.random.default_rng(seed).permutation(len(train_images))[:max_train])
        train_images, train_labels = train_images[pick], train_labels[pick]
    labels = {"train": np.asarray(train_labels), "val": None, "test": None}
    features, outputs = {}, {}
    features["train"], outputs["train"] = pooled_features(
        model, train_images, batch_size=batch_size
    )
    for split in ("val", "test"):
        images, labels[split] = splits[split]
        labels[split] = np.asarray(labels[split])
        features[split], outputs[split] = pooled_features(model, images, batch_size=batch_size)

    rows = []
    for i, (kind, layer, resolution) in enumerate(probe_layers(model)):
        classifier = fit_probe(features["train"][i], labels["train"], seed=seed)
        top1 = {s: float(np.mean(classifier.predict(features[s][i]) == labels[s])) for s in SPLITS}
        width = features["train"][i].shape[1]
        rows.append(Probe(layer.name, kind, resolution, width, **_named(top1)))
    counts = np.bincount(labels["train"])
    common = int(counts.argmax())
    chance = {s: float(np.mean(labels[s] == common)) for s in SPLITS}
    rows.append(Probe("most frequent class", "chance", "", 0, **_named(chance)))
    own = {s: float(np.mean(outputs[s].argmax(axis=1) == labels[s])) for s in SPLITS}
    rows.append(Probe(model.name, "model", "", 0, **_named(own)))
    return rows


def _named(top1: dict[str, float]) -> dict[str, float]:
    return {f"{split}_top1": value for split, value in top1.items()}


def fit_probe(features: np.ndarray, labels: np.ndarray, *, seed: int):
    """Standardise, then a multinomial logistic regression (seeded; lbfgs)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed)
    )
    with warnings.catch_warnings():
        # an unconverged fit at 1000 iterations is still a usable probe
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(features, labels)
    return classifier


def write_table(rows: list[Probe], out_dir: Path, *, title: str) -> list[Path]:
    """probe.csv, probe.md and probe.png (accuracy per stage) in `out_dir`."""
    import csv

    from pipeline.atomic import atomic_file, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "probe.csv"
    with atomic_file(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row.as_row(), **_formatted(row)})
    md_path = out_dir / "probe.md"
    write_text(md_path, markdown(rows, title=title))
    return [csv_path, md_path, chart(rows, out_dir / "probe.png", title=title)]


def _formatted(row: Probe) -> dict[str, str]:
    return {f"{s}_top1": f"{getattr(row, f'{s}_top1'):.4f}" for s in SPLITS}


def markdown(rows: list[Probe], *, title: str) -> str:
    lines = [
        f"# Linear probes: {title}",
        "",
        "| layer | what | map | features | train top-1 | val top-1 | test top-1 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        cells = _formatted(row)
        features = str(row.features) if row.features else ""
        lines.append(
            f"| `{row.layer}` | {row.kind} | {row.resolution} | {features} | "
            f"{cells['train_top1']} | {cells['val_top1']} | {cells['test_top1']} |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: list[Probe], path: Path, *, title: str) -> Path:
    """Val and test accuracy per probed layer, chance and the model as lines."""
    from pipeline.scoring.plots import new_figure, save_figure

    probed = [r for r in rows if r.kind not in ("chance", "model")]
    x = np.arange(len(probed))
    fig = new_figure(max(4.0, 1.2 * len(probed) + 2), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, [r.val_top1 for r in probed], "o-", label="probe, val")
    ax.plot(x, [r.test_top1 for r in probed], "s-", label="probe, test")
    for row, style in ((rows[-1], "--"), (rows[-2], ":")):
        ax.axhline(row.test_top1, linestyle=style, color="grey", label=f"{row.kind}, test")
    ax.set_xticks(x, [f"{r.kind}\n{r.resolution}" for r in probed], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("top-1")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def metrics(rows: list[Probe]) -> dict[str, float]:
    """MLflow metrics: probe_{val,test}_top1_<layer> per probed layer and for chance."""
    found = {}
    for row in rows:
        if row.kind == "model":
            continue
        name = "chance" if row.kind == "chance" else row.layer
        for split in ("val", "test"):
            found[f"probe_{split}_top1_{name}"] = getattr(row, f"{split}_top1")
    return found
