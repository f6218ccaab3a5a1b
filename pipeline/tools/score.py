"""`python -m pipeline score`: a trained model on new labelled data, judged as `evaluate`
judges the test split, and logged as an MLflow evaluation run of that model.

The data (a folder, or an archive's path or http(s) URL) is fetched and decoded as
`fetch` and `prepare` would, at the model's image size and channels, its classes
matched to the model's by name (`data.labelled`). The output folder gets `score.json`
(the metrics of `metrics/eval.json`, with what was scored), `per_class.json` and
evaluate's plots and tables; the evaluation run gets the same, its metrics linked to
the model and the dataset (`tracking.evaluations`). docs/scoring.md has the details.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError

SCORE_FILE = "score.json"


def run(
    data: str,
    out: Path,
    *,
    model_uri: str | None = None,
    split: str | None = None,
    sha256: str = "",
    tta: str = "none",
    batch_size: int = 256,
    allow_missing_classes: bool = False,
    timeout_s: float = 60,
    log: bool = True,
) -> tuple[dict, str | None]:
    """Score the model on `data`; write `out` (replaced whole); return (score.json's
    content, the evaluation run's id or None)."""
    from pipeline.atomic import atomic_dir, write_json
    from pipeline.data import labelled
    from pipeline.scoring import reports
    from pipeline.scoring.predictions import classify, segment
    from pipeline.tracking import evaluations, logged_models, runs

    key = "score --model"
    if model_uri is None:
        model_uri = runs.read_run_file()["model_uri"]
    model, card = logged_models.load_logged_model(model_uri, key=key)
    segmentation = card.get("task") == "segmentation"
    if segmentation and tta == "flip_translate":
        raise ConfigError(
            "score --tta flip_translate is for classifiers; a segmentation model takes flip or none"
        )
    ref = evaluations.resolve(model_uri, key=key, then="nothing was scored") if log else None
    scored = labelled.load(
        data,
        card,
        split=split,
        sha256=sha256,
        timeout_s=timeout_s,
        allow_missing_classes=allow_missing_classes,
    )
    with atomic_dir(out) as tmp:
        if segmentation:
            cm, examples = segment(model, scored.images, scored.labels, batch_size, card, tta)
            report, per_class, files, extra = reports.segmentation(cm, examples, card, tmp)
        else:
            probs = classify(model, scored.images, batch_size, tta)
            report, per_class, files = reports.classification(
                probs, scored.labels, card["classes"], tmp, present=scored.classes
            )
            extra = {}
        summary = {
            **report,
            "model_uri": model_uri,
            "data": scored.source,
            "split": scored.split,
            "num_images": int(len(scored.images)),
            "data_sha256": scored.digest,
            "archive_sha256": scored.archive_sha256,
            "classes_scored": scored.classes,
            "tta": tta,
        }
        write_json(tmp / SCORE_FILE, summary)
        write_json(tmp / "per_class.json", per_class, sort_keys=False)
    files = [out / path.relative_to(tmp) for path in files]
    run_id = None
    if log:
        headline = "test_miou" if segmentation else "test_top1"
        settings = {"score.data": scored.source, "score.split": scored.split, "score.tta": tta}
        run_id = evaluations.log_scoring(
            ref,
            scored,
            report | extra,
            [*files, out / SCORE_FILE, out / "per_class.json"],
            settings=settings,
            metric=headline,
        )
    return summary, run_id
