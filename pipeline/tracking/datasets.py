"""Dataset lineage: what a run trained on, was checked on, or scored, as MLflow datasets
(`mlflow.log_input`), so the run page's Datasets panel names each one.

A dataset here is a name, a source (the masked fetch URL or path; for the built-in
sources the code that makes them) and a digest (the sha256 of the decoded images and
labels that `prepare` writes per split, so the same images give the same digest in
training and in scoring). No pixels are sent to the store.
"""

from __future__ import annotations

import warnings

from pipeline.layout import SPLITS
from pipeline.tracking.store import connect

# MLflow's dataset contexts: training's splits, and new data scored by `score`
CONTEXTS = {"train": "training", "val": "validation", "test": "test", "scored": "scored"}


def dataset(name: str, source: str, digest: str):
    """An MLflow dataset of `source` (a path, http(s) URL, or built-in source's code)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    connect()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways"
            resolved = resolve_dataset_source(source)
    except Exception:  # MLflow raises its own for a source it cannot place: code then
        resolved = CodeDatasetSource(tags={"source": source})
    schema = Schema([ColSpec("binary", "image"), ColSpec("long", "label")])
    # MLflow keeps 36 characters of a digest
    return MetaDataset(resolved, name=name, digest=digest[:36], schema=schema)


def training_inputs(card: dict) -> list[tuple[object, str]]:
    """(dataset, context) for each split of a data card, as the training run logs them."""
    source = card.get("source", {})
    name = _name(source)
    totals = card.get("totals", {})
    return [
        (dataset(f"{name}/{split}", source.get("url", "?"), digest), split)
        for split, digest in card.get("sha256", {}).items()
        if split in SPLITS and totals.get(split, 1)
    ]


def log_inputs(inputs: list[tuple[object, str]]) -> None:
    """Log each (dataset, context) to the active run; the context is the split's name
    (train, val, test) or `scored`."""
    mlflow = connect()
    for data, context in inputs:
        mlflow.log_input(data, context=CONTEXTS.get(context, context))


def _name(source: dict) -> str:
    """A short name for the data: the built-in source's, else the archive's file name."""
    if source.get("source") in (None, "archive"):
        from pipeline.data.archive import archive_name

        url = source.get("url", "data")
        name = archive_name(url)
        for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip"):
            name = name.removesuffix(suffix)
        return name or "data"
    return str(source["source"])
