"""`python -m pipeline probe`: linear probes of a trained classifier, stage by stage.

The model is this project's last trained one (`data/model`) or, with `--model`, a logged
or registered one; the probes fit on the prepared train split (`data/prepared`, at most
`--max-train` images) and score val and test (`pipeline.explain.probe`). Writes
probe.csv, probe.md and probe.png into `--out` and logs them, with metrics
`probe_{val,test}_top1_<layer>`, to the model's MLflow run: data/model's training run
(its run file), or the run that logged the `--model`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError, DataError
from pipeline.explain.probe import MAX_TRAIN
from pipeline.layout import MODEL_DIR, PREPARED_DIR

OUT_DIR = Path("reports/probe")


def run(
    out: Path = OUT_DIR,
    *,
    model_uri: str | None = None,
    model_dir: Path = MODEL_DIR,
    prepared_dir: Path = PREPARED_DIR,
    max_train: int = MAX_TRAIN,
    seed: int = 42,
    log: bool = True,
) -> tuple[list, list[Path], str | None]:
    """Probe the model; return (rows, files written, the MLflow run logged to or None).

    Every input is checked before the probes run: the model and its card, the prepared
    splits, and (with `log`) the run to log to, so a refusal costs no fitting.
    """
    from pipeline.artifacts import check_card_fits_model
    from pipeline.data.data_card import read_card
    from pipeline.explain import probe
    from pipeline.layout import data_card_file
    from pipeline.tracking.logged_models import model_and_card

    if max_train < 1:
        raise ConfigError(f"probe --max-train {max_train}: give a positive number of images")
    model, card = model_and_card(model_uri, model_dir, prepared_dir, key="probe --model")
    which = model_uri or str(model_dir)
    if card.get("task") == "segmentation":
        raise ConfigError(
            f"probe: {which} is a segmentation model; linear probes need one class per image"
        )
    prepared = read_card(prepared_dir)
    if prepared.get("task") == "segmentation":
        raise DataError(f"probe: {prepared_dir} holds segmentation data; probes need classes")
    if model_uri:
        check_card_fits_model(prepared, data_card_file(prepared_dir), model, model_uri)
        if list(card["classes"]) != list(prepared["classes"]):
            raise DataError(
                f"probe: {model_uri} was trained on classes {card['classes'][:5]}..., "
                f"{data_card_file(prepared_dir)} has {prepared['classes'][:5]}...: "
                "give --prepared the data the model was trained on"
            )
    splits = probe.load_splits(prepared_dir, prepared)
    run_id = _run_to_log(model_uri, model_dir) if log else None

    rows = probe.run_probes(model, splits, max_train=max_train, seed=seed)
    used = min(max_train, len(splits["train"][0]))
    title = f"{model.name} ({which}), fitted on {used} train images of {prepared_dir}"
    files = probe.write_table(rows, out, title=title)
    if run_id:
        from pipeline.tracking import runs

        kept = f"the probe table is in {out}; rerun probe when the store answers"
        with runs.reopened_run(run_id, then=kept):
            runs.log_metrics(probe.metrics(rows))
            runs.log_artifacts(files, "probe")
    return rows, files, run_id


def _run_to_log(model_uri: str | None, model_dir: Path) -> str:
    from pipeline.tracking import runs

    then = "nothing probed; --no-log probes without logging"
    if model_uri:
        return runs.model_run_id(model_uri, then=then)
    return runs.read_run_file(model_dir, then=then)["run_id"]
