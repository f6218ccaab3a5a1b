"""`python -m pipeline explain`: what a trained classifier looks at, as PNGs and index.json.

The model is `data/model` with the `data/prepared` card, or with `--model` a logged or
registered one (`models:/NAME@champion`), loaded as `predict` loads it. The input is a
folder of images (decoded and resized as `predict` does) or a split of data/prepared.
Everything is checked before anything is drawn (methods, layer, class, input), and the
output folder appears complete or not at all (built beside it, then renamed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, DataError
from pipeline.layout import IMAGE_SUFFIXES, MODEL_DIR, PREPARED_DIR, SPLITS

# methods drawn per image, and drawn once for the model
ATTRIBUTIONS = ("gradcam", "gradcampp", "saliency", "smoothgrad")
PER_IMAGE = (*ATTRIBUTIONS, "features", "attention")
PER_MODEL = ("filters", "maximize")
METHODS = (*PER_IMAGE, *PER_MODEL)
SPLIT_LIMIT = 16  # images of a split unless --limit says otherwise
FEATURE_CHANNELS = 16  # the most active channels of a feature-map grid
MAXIMIZE_CHANNELS = 8
INDEX = "index.json"


@dataclass(frozen=True)
class Inputs:
    images: np.ndarray  # uint8 (N, H, W, C) at the model's size
    names: list[str]  # relative file names, or SPLIT_00012 for a split
    labels: list[int] | None  # a split's true classes


def parse_methods(text: str) -> list[str]:
    """`gradcam,saliency` -> the methods, in the order given; unknown ones refused."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(
            f"--method {', '.join(unknown) or repr(text)}: unknown; choose from {','.join(METHODS)}"
        )
    return list(dict.fromkeys(methods))


def run(
    input_: str,
    out: Path,
    *,
    methods: list[str],
    model_uri: str | None = None,
    layer: str | None = None,
    class_name: str | None = None,
    limit: int | None = None,
    model_dir: Path = MODEL_DIR,
    prepared_dir: Path = PREPARED_DIR,
) -> dict:
    """Explain the images of `input_` (a folder, or a split name) into `out`; the index."""
    from pipeline.atomic import atomic_dir, write_json
    from pipeline.tracking.logged_models import model_and_card

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: give at least 1")
    _check_out(out)
    source = _input_source(input_, prepared_dir)
    model, card = model_and_card(model_uri, model_dir, prepared_dir, key="explain --model")
    classes = list(card["classes"])
    target = _class_index(class_name, classes)
    plan = _plan(model, card, methods, layer)
    inputs = _read_inputs(source, input_, card, prepared_dir, limit)
    with atomic_dir(out) as tmp:
        index = _explain(model, classes, inputs, methods, plan, target, tmp)
        index["model"] = model_uri or str(model_dir)
        index["input"] = input_
        write_json(tmp / INDEX, index, sort_keys=False)
    return index


def _check_out(out: Path) -> None:
    """`out` is new, empty, or an earlier explain output (replaced as a whole)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INDEX).exists())):
        raise ConfigError(
            f"--out {out}: exists and is not an earlier explain output (no {INDEX}); "
            "give a new or empty folder"
        )


def _input_source(input_: str, prepared_dir: Path) -> str:
    """'folder' or 'split'; a DataError when it is neither."""
    path = Path(input_)
    if path.is_dir():
        return "folder"
    if input_ in SPLITS:
        return "split"
    raise DataError(
        f"--input {input_}: neither a folder of images nor a split of {prepared_dir} "
        f"({', '.join(SPLITS)})"
    )


def _class_index(name: str | None, classes: list[str]) -> int | None:
    if name is None:
        return None
    if name not in classes:
        shown = ", ".join(classes[:20]) + (" …" if len(classes) > 20 else "")
        raise ConfigError(f"--class {name!r}: not a class of this model ({shown})")
    return classes.index(name)


def _plan(model, card: dict, methods: list[str], layer: str | None) -> dict[str, str | None]:
    """The layer each method uses, every refusal raised here, before any drawing."""
    from pipeline.explain import attention, graph
    from pipeline.explain.features import first_conv

    segmentation = card.get("task") == "segmentation" or len(model.outputs[0].shape) != 2
    wanted = [m for m in methods if m in ATTRIBUTIONS]
    if segmentation and (wanted or "attention" in methods):
        raise ConfigError(
            f"--method {','.join(wanted or ['attention'])}: {model.name} is a segmentation "
            "model; class attributions need a classifier (features, filters and maximize "
            "work on any model)"
        )
    plan: dict[str, str | None] = {}
    for method in methods:
        if method in ATTRIBUTIONS and method.startswith("gradcam"):
            chosen = graph.find_layer(model, layer)
            graph.split_at(model, chosen)  # refuses a layer a skip connection passes by
            plan[method] = chosen.name
        elif method in ("saliency", "smoothgrad"):
            plan[method] = None  # the input itself
        elif method == "features":
            chosen = graph.find_layer(model, layer) if layer else _features_default(model)
            plan[method] = chosen.name
        elif method == "maximize":
            plan[method] = graph.find_layer(model, layer).name
        elif method == "filters":
            plan[method] = first_conv(model).name
        elif method == "attention":
            plan[method] = attention.attention_layers(model)[-1].name
    return plan


def _features_default(model):
    """The first stage's end: the finest map past the stem, the most legible."""
    from pipeline.explain import graph

    ends = graph.stage_ends(model)
    return ends[0] if ends else graph.last_spatial_layer(model)


def _read_inputs(source: str, input_: str, card: dict, prepared_dir: Path, limit) -> Inputs:
    from pipeline.data.decode import load_image

    height, width, channels = card["image_shape"]
    if source == "split":
        from pipeline.data.loader import load_split

        images, labels = load_split(prepared_dir, input_)
        count = min(len(images), limit or SPLIT_LIMIT)
        if count == 0:
            raise DataError(f"--input {input_}: the split of {prepared_dir} is empty")
        segmentation = card.get("task") == "segmentation"
        return Inputs(
            np.asarray(images[:count]),
            [f"{input_}_{i:05d}" for i in range(count)],
            None if segmentation else [int(v) for v in labels[:count]],
        )
    folder = Path(input_)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"--input {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    paths = paths[:limit] if limit else paths
    images = np.stack([load_image(p, (height, width), channels, stage="explain") for p in paths])
    return Inputs(images, [p.relative_to(folder).as_posix() for p in paths], None)


def _explain(model, classes, inputs: Inputs, methods, plan, target, out: Path) -> dict:
    from pipeline.explain import attention, attribution, features, gradients
    from pipeline.explain.figures import overlay_grid, tile_grid

    x = inputs.images.astype(np.float32)
    classifier = len(model.outputs[0].shape) == 2
    probs = gradients.predict(model, x) if classifier else None
    predicted = probs.argmax(axis=1) if classifier else None
    explained = predicted if target is None else np.full(len(x), target)
    maps: dict[str, np.ndarray] = {}
    for method in methods:
        if method in ("gradcam", "gradcampp"):
            maps[method] = attribution.gradcam(
                model, x, class_index=explained, layer=plan[method], plus=method == "gradcampp"
            )
        elif method == "saliency":
            maps[method] = attribution.saliency(model, x, class_index=explained)
        elif method == "smoothgrad":
            maps[method] = attribution.smoothgrad(model, x, class_index=explained)
        elif method == "attention":
            maps[method] = attention.rollout(model, x)
    stems = [Path(name).with_suffix("").as_posix() for name in inputs.names]
    if len(set(stems)) < len(stems):  # a.png and a.jpg: keep the suffixes apart
        stems = list(inputs.names)
    entries = []
    for i, name in enumerate(inputs.names):
        entry: dict = {"file": name}
        if classifier:
            entry["class"] = classes[int(predicted[i])]
            entry["probability"] = round(float(probs[i, predicted[i]]), 6)
            entry["explained_class"] = classes[int(explained[i])]
        if inputs.labels is not None:
            entry["label"] = classes[inputs.labels[i]]
        entry["png"], entry["layer"] = {}, {}
        title = f"{entry['class']} {entry['probability']:.2f}" if classifier else name
        for method in methods:
            if method not in PER_IMAGE:
                continue
            png = Path(method) / f"{stems[i]}.png"
            if method == "features":
                found = features.feature_maps(model, x[i : i + 1], plan[method])[0]
                strongest = np.argsort(-found.mean(axis=(0, 1)))[:FEATURE_CHANNELS]
                tile_grid(
                    np.moveaxis(found[..., strongest], -1, 0),
                    [f"ch {c}" for c in strongest],
                    out / png,
                )
            else:
                overlay_grid(inputs.images[i : i + 1], maps[method][i : i + 1], [title], out / png)
            entry["png"][method] = png.as_posix()
            entry["layer"][method] = plan[method]
        entries.append(entry)
    index: dict = {"classes": classes, "methods": methods, "images": entries, "model_figures": {}}
    if "filters" in methods:
        filters, name = features.first_layer_filters(model)
        titles = [str(k) for k in range(len(filters))]
        tile_grid(filters, titles, out / "filters.png", cmap="gray", limits=(0, 1))
        index["model_figures"]["filters"] = {"png": "filters.png", "layer": name}
    if "maximize" in methods:
        width = int(model.get_layer(plan["maximize"]).output.shape[-1])
        channels = list(range(min(MAXIMIZE_CHANNELS, width)))
        found = features.maximize(model, plan["maximize"], channels)
        tile_grid(found, [f"ch {c}" for c in channels], out / "maximize.png", cmap="gray")
        index["model_figures"]["maximize"] = {
            "png": "maximize.png",
            "layer": plan["maximize"],
            "channels": channels,
        }
    return index
