"""End to end: real `dvc repro` in a temporary git repo, real MLflow store, real registry.

One project copy is shared by the tests in this module and they run in order,
as a user's session would: repro, repro again, change a param, run an
experiment, promote.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    copy_project,
    edit_params,
    free_port,
    missing_service,
    pipeline_env,
    run_cli,
    server_process,
    sh,
    wait_for_backup,
)
from PIL import Image

pytestmark = pytest.mark.slow

MODEL_NAME = "digits-classifier"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC repo holding this project, after one `dvc repro`."""
    repo = copy_project(tmp_path_factory.mktemp("project"))
    assert (repo / ".dvc" / "config").exists()  # the project ships its DVC setup
    sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "first run"], repo)
    return repo


def client(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs(repo: Path):
    c = client(repo)
    experiment = c.get_experiment_by_name("digits-cnn")
    return c.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def read_metrics(repo: Path) -> dict:
    return json.loads((repo / "metrics" / "eval.json").read_text())


def plotted(repo: Path) -> dict[str, int]:
    """`dvc plots show`'s plots (dvc.yaml's titles and image files) with their data points."""
    shown = json.loads(sh(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    return {
        title: sum(len(p.get("content", {}).get("data", {}).get("values", [None])) for p in plots)
        for title, plots in shown.items()
    }


def test_repro_trains_digits_to_98_percent(project):
    metrics = read_metrics(project)
    assert metrics["test_top1"] >= 0.98
    assert metrics["test_top5"] >= metrics["test_top1"]
    for name in ("confusion_matrix.png", "training_curves.png", "per_class.png"):
        assert (project / "plots" / "images" / name).stat().st_size > 1000
    card = json.loads((project / "data/prepared/data_card.json").read_text())
    assert card["totals"] == {"train": 1257, "val": 270, "test": 270}
    shown = plotted(project)  # what `dvc plots show` draws
    assert shown["Accuracy"] and shown["Learning rate"] and shown["Confusion matrix"] == 270


def test_mlflow_run_holds_params_curves_model_and_tags(project):
    (run,) = runs(project)
    c = client(project)
    assert run.info.status == "FINISHED"
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert run.data.params["model.arch"] == params["model"]["arch"]
    assert run.data.params["train.epochs"] == str(params["train"]["epochs"])
    assert int(run.data.params["model.params"]) > 0 and int(run.data.params["model.macs"]) > 0
    assert int(run.data.params["model.receptive_field"]) > 1
    assert run.data.tags["evaluate.batch_size"] == str(params["evaluate"]["batch_size"])
    epochs = params["train"]["epochs"]
    for metric in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "learning_rate"):
        history = c.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == list(range(epochs)), metric
    assert run.data.metrics["test_top1"] == pytest.approx(read_metrics(project)["test_top1"])

    head = sh(["git", "rev-parse", "HEAD~1"], project).stdout.strip()  # the commit it ran at
    assert run.data.tags["git_commit"] == head
    assert run.data.tags["git_dirty"] == "False"
    card = json.loads((project / "data/prepared/data_card.json").read_text())
    assert run.data.tags["data_hash"] == card["data_hash"]

    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert (project / "mlartifacts").is_dir() and not (project / "mlruns").exists()
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"model_summary.txt", "model_card.json", "plots", "metrics"} <= artifacts
    plots = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/training_curves.png"} <= plots
    run_file = json.loads((project / "data/model/mlflow_run.json").read_text())
    assert run_file["run_id"] == run.info.run_id


def test_challenger_loads_with_pyfunc_and_matches_eval(project):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    version = client(project).get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(version.version) == "1"
    assert version.tags["architecture"] == "simple_cnn"
    assert "test_top1" in version.tags and version.tags["git_commit"]
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@challenger")
    images = np.load(project / "data/prepared/test_images.npy")
    labels = np.load(project / "data/prepared/test_labels.npy")
    classes = json.loads((project / "data/prepared/data_card.json").read_text())["classes"]
    answer = model.predict(pd.DataFrame({"array": [image.tolist() for image in images]}))
    top1 = float((answer["class"].to_numpy() == np.array(classes)[labels]).mean())
    assert top1 == pytest.approx(read_metrics(project)["test_top1"])


def test_predict_classifies_a_folder_of_images(project):
    done = run_cli(["predict", "data/raw/3", "--out", "preds"], project)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = (project / "preds" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "file,class,probability,top5" and len(rows) == 1 + 183  # 183 threes
    assert sum(row.split(",")[1] == "3" for row in rows[1:]) > 0.95 * 183
    shutil.rmtree(project / "preds")


def test_predict_errors_name_the_folder_or_the_file(project, tmp_path):
    """Not a folder, a folder without images, a damaged image among good ones: one line
    naming it, exit 2, and the predictions already in the output file are kept."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(project / "data" / "raw" / "3" / sorted(os.listdir(project / "data/raw/3"))[0],
                images / "good.png")  # fmt: skip
    output = tmp_path / "earlier.csv"
    output.write_text("file,class,probability,top5\nold.png,3,0.99,3|5|8|9|1\n")
    before = output.read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cut = tmp_path / "cut.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(cut, quality=95)
    (images / "damaged.jpg").write_bytes(cut.read_bytes()[:300])
    for target, named in [
        (images / "good.png", "good.png is not a folder of images"),
        (empty, f") in {empty}"),
        (images, "damaged.jpg"),
    ]:
        done = run_cli(["predict", str(target), "--output", str(output)], project)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        (error,) = [line for line in done.stderr.splitlines() if "error:" in line]
        assert error.startswith("error: predict: ") and named in error
        assert output.read_text() == before


def test_second_repro_is_a_no_op(project):
    out = sh(["dvc", "repro"], project).stdout
    assert "Running stage" not in out
    assert len(runs(project)) == 1


def test_changing_epochs_reruns_train_and_later_stages_only(project):
    edit_params(project, {"train.epochs": 3})
    out = sh(["dvc", "repro"], project).stdout
    for stage in ("train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    for stage in ("fetch", "prepare"):
        assert f"Running stage '{stage}'" not in out
    assert len(runs(project)) == 2
    version = client(project).get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(version.version) == "2"
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "three epochs"], project)


def test_promote_gates_on_test_top1(project):
    c = client(project)
    top1 = {v: float(c.get_model_version(MODEL_NAME, v).tags["test_top1"]) for v in ("1", "2")}
    assert top1["2"] < top1["1"]  # 3 epochs against 30

    done = run_cli(["promote", "--version", "1"], project)
    assert done.returncode == 0, done.stderr
    assert c.get_model_version_by_alias(MODEL_NAME, "champion").version == 1

    refused = run_cli(["promote"], project)  # the challenger, v2, is worse
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "refusing" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert c.get_model_version_by_alias(MODEL_NAME, "champion").version == 1

    forced = run_cli(["promote", "--force"], project)
    assert forced.returncode == 0, forced.stderr
    assert f"{top1['1']:.4f}" in forced.stdout and f"{top1['2']:.4f}" in forced.stdout
    assert c.get_model_version_by_alias(MODEL_NAME, "champion").version == 2


def test_predict_with_a_registered_model(project):
    def predict(*args: str) -> list[dict[str, str]]:
        done = run_cli(["predict", *args], project)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "183/183" in done.stderr  # the progress bar
        with open(project / args[-1], newline="") as f:
            return list(csv.DictReader(f))

    best = predict(
        "--model", f"models:/{MODEL_NAME}/1", "--input", "data/raw/3", "--output", "v1.csv"
    )
    assert len(best) == 183 and sum(row["class"] == "3" for row in best) > 0.95 * 183
    for row in best:
        top5 = row["top5"].split("|")
        assert len(set(top5)) == 5 and top5[0] == row["class"]

    # the champion (v2 after the forced promotion) is the model this workspace trained last
    champion = predict(
        "--model", f"models:/{MODEL_NAME}@champion", "data/raw/3", "--output", "c.csv"
    )
    local = predict("data/raw/3", "--output", "local.csv")
    assert [row["class"] for row in champion] == [row["class"] for row in local]
    assert [row["probability"] for row in champion] != [row["probability"] for row in best]

    missing = run_cli(
        ["predict", "--model", "models:/no-such-model@champion", "data/raw/3"], project
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1 and "predict --model" in missing.stderr
    for name in ("v1.csv", "c.csv", "local.csv"):
        (project / name).unlink()


def test_served_champion_answers_images_like_the_model_in_process(project, tmp_path):
    """`mlflow models serve` on 127.0.0.1, queried as a client would: base64 PNGs and arrays."""
    import base64
    import urllib.error
    import urllib.request

    import mlflow
    import pandas as pd
    from PIL import Image

    store = f"sqlite:///{project / 'mlflow.db'}"
    uri = f"models:/{MODEL_NAME}@champion"
    port = free_port()
    serve = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    serve += ["--host", "127.0.0.1", "--port", str(port)]

    def invoke(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    files = sorted((project / "data/raw/3").glob("*.png"))[:40]
    encoded = [f.read_bytes() for f in files]
    mlflow.set_tracking_uri(store)
    local = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": encoded}))
    assert (local["class"] == "3").mean() > 0.9

    ready = f"http://127.0.0.1:{port}/ping"
    with server_process(serve, project, ready, tmp_path / "serve.log", MLFLOW_TRACKING_URI=store):
        b64 = [[base64.b64encode(data).decode("ascii")] for data in encoded]
        status, answer = invoke({"dataframe_split": {"columns": ["image"], "data": b64}})
        assert status == 200, answer
        served = pd.DataFrame(answer["predictions"])
        assert list(served["class"]) == list(local["class"])
        np.testing.assert_allclose(served["probability"], local["probability"], rtol=1e-5)
        assert [row[0] for row in served["top5"]] == list(served["class"])
        assert set(served["probabilities"][0]) == {str(d) for d in range(10)}

        arrays = [np.asarray(Image.open(f)).tolist() for f in files[:5]]
        status, answer = invoke({"dataframe_records": [{"array": a} for a in arrays]})
        assert status == 200, answer
        assert [row["class"] for row in answer["predictions"]] == list(local["class"][:5])

        junk = base64.b64encode(b"not an image").decode("ascii")
        status, answer = invoke({"dataframe_records": [{"image": junk}]})
        assert status == 400 and "not a decodable image" in answer["message"]


@contextlib.contextmanager
def chromium():
    """Debian's headless Chromium driven by Playwright (the project installs the browser)."""
    if not Path(CHROMIUM).exists():
        missing_service(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


def test_mlflow_ui_shows_runs_curves_plots_and_the_registered_model(project, tmp_path):
    """The MLflow UI over the project's store, in a real browser, as a user browses it.

    Screenshots go to tmp_path, or to $PIPELINE_UI_SCREENSHOTS (docs/mlflow-ui for the docs).
    """
    from playwright.sync_api import expect

    shots = Path(os.environ.get("PIPELINE_UI_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    first = runs(project)[0]
    experiment = first.info.experiment_id
    port = free_port()
    server = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}"]
    server += ["--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}/#"
    training = "workflowType=machine_learning"  # the UI's "Model training" view
    with (
        server_process(server, project, f"http://127.0.0.1:{port}/health", tmp_path / "ui.log"),
        chromium() as page,
    ):
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)

        page.goto(f"{base}/experiments/{experiment}?{training}")
        expect(page.get_by_text("digits-cnn").first).to_be_visible()
        expect(page.get_by_role("link", name="simple_cnn")).to_have_count(len(runs(project)))
        expect(page.get_by_text(f"{MODEL_NAME}").first).to_be_visible()
        assistant = page.get_by_role("button", name="Close")  # MLflow's chat panel: not ours
        if assistant.count():
            assistant.click()
        page.screenshot(path=shots / "runs.png")

        run_page = f"{base}/experiments/{experiment}/runs/{first.info.run_id}"
        page.goto(f"{run_page}?{training}")
        top1 = f"{first.data.metrics['test_top1']}"
        expect(page.get_by_role("cell", name="test_top1", exact=True)).to_be_visible()
        expect(page.get_by_role("cell", name=top1, exact=True)).to_be_visible()
        expect(page.get_by_role("cell", name="model.arch", exact=True)).to_be_visible()
        page.screenshot(path=shots / "run.png")

        page.goto(f"{run_page}/model-metrics?{training}")
        search = page.get_by_placeholder("Search metric charts")
        for metric in ("val_loss", "learning_rate", "train_accuracy", "val_accuracy"):
            search.fill(metric)
            # a line chart over epochs has this legend; a single value gets a bar
            expect(page.get_by_text(f"{first.info.run_name} ({metric})")).to_be_visible()
        search.fill("val_")
        page.screenshot(path=shots / "curves.png")

        page.goto(f"{run_page}/artifacts/plots/confusion_matrix.png?{training}")
        image = page.get_by_alt_text("plots/confusion_matrix.png")  # fetched as a blob
        expect(image).to_be_visible()
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 100", arg=image.element_handle()
        )
        page.screenshot(path=shots / "confusion_matrix.png")

        page.goto(f"{base}/models/{MODEL_NAME}?{training}")
        registry = client(project)
        for alias in ("champion", "challenger"):
            version = registry.get_model_version_by_alias(MODEL_NAME, alias).version
            row = page.get_by_role("row").filter(has_text=f"Version {version}")
            expect(row.get_by_text(f"@ {alias}")).to_be_visible()
        expect(page.get_by_text("Version 1", exact=True)).to_be_visible()
        page.screenshot(path=shots / "registered_model.png")


def test_dvc_exp_run_makes_a_second_comparable_run(project):
    sh(
        [
            "dvc",
            "exp",
            "run",
            "-n",
            "resnet-try",
            "-S",
            "model.arch=resnet18",
            "-S",
            "model.width_multiplier=0.25",
            "-S",
            "train.epochs=2",
            "-S",
            "train.warmup_epochs=0",
        ],
        project,
    )
    latest = runs(project)[-1]
    assert latest.data.tags["architecture"] == "resnet18"
    assert latest.data.tags["dvc_experiment"] == "resnet-try"
    assert "test_top1" in latest.data.metrics

    shown = json.loads(sh(["dvc", "exp", "show", "--json"], project).stdout)
    found = {}
    for baseline in shown:
        found[baseline.get("name") or baseline["rev"]] = baseline
        for exp in baseline.get("experiments") or []:
            found[exp.get("name")] = exp
    assert "resnet-try" in found
    exp_metrics = found["resnet-try"]["revs"][0]["data"]["metrics"]["metrics/eval.json"]["data"]
    assert exp_metrics["test_top1"] == pytest.approx(latest.data.metrics["test_top1"])


def test_temp_workspace_experiment_lands_in_the_repo_store(project):
    """Queued and --temp experiments run in a copy under .dvc/tmp/exps that DVC deletes."""
    before = len(runs(project))
    sh(
        [
            "dvc",
            "exp",
            "run",
            "--temp",
            "-n",
            "temp-try",
            "-S",
            "train.epochs=1",
            "-S",
            "train.warmup_epochs=0",
        ],
        project,
    )
    after = runs(project)
    assert len(after) == before + 1
    assert after[-1].data.tags["dvc_experiment"] == "temp-try"
    assert after[-1].info.artifact_uri.startswith((project / "mlartifacts").as_uri())


def test_killed_repro_resumes_and_ends_with_the_uninterrupted_metrics(project):
    """`kill -9` during training; the next `dvc repro` continues from the last finished
    epoch, in the same MLflow run, and ends with the metrics of an uninterrupted run."""
    import os
    import signal

    edit_params(
        project,
        {
            "model.arch": "simple_cnn",
            "model.width_multiplier": 0.5,
            "train.epochs": 5,
            "train.warmup_epochs": 1,
        },
    )
    sh(["dvc", "repro"], project)
    reference = read_metrics(project)
    reference_history = (project / "plots" / "history.csv").read_text()
    reference_model = (project / "data" / "model" / "model.keras").read_bytes()
    runs_before = len(runs(project))

    metadata = project / "data" / "checkpoints" / "backup_phase0" / "training_metadata.json"
    training = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "train"],
        cwd=project,
        env=pipeline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_backup(metadata, 2, training, 300)
    os.killpg(training.pid, signal.SIGKILL)
    assert training.wait() == -signal.SIGKILL, "training finished before it could be killed"
    # no model from the killed training: the last one stays (train's outputs persist)
    assert (project / "data" / "model" / "model.keras").read_bytes() == reference_model

    # dvc.lock records that model, so the forced training is forced again to finish
    resumed = sh(["dvc", "repro", "--force", "--single-item", "train"], project).stdout
    sh(["dvc", "repro"], project)  # evaluate and register the resumed model
    assert "Running stage 'train'" in resumed
    assert "Epoch 1/5" not in resumed and "Epoch 5/5" in resumed  # continued, not restarted
    assert read_metrics(project) == reference
    assert (project / "plots" / "history.csv").read_text() == reference_history

    after = runs(project)
    assert len(after) == runs_before + 1  # the killed run was continued, not duplicated
    run = after[-1]
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    assert run.data.metrics["test_top1"] == reference["test_top1"]
    steps = client(project).get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted({m.step for m in steps}) == [0, 1, 2, 3, 4]


def test_segmentation_experiment_runs_through_the_same_stages(project):
    """`task: segmentation` on the offline digit scenes: the README's command, small."""
    sh(
        [
            "dvc", "exp", "run", "-n", "scenes-unet",
            "-S", "task=segmentation",
            "-S", "fetch.source=digit_scenes",
            "-S", "prepare.image_size=[32,48]",
            "-S", "model.arch=unet",
            "-S", "model.width_multiplier=0.25",
            "-S", "train.epochs=2",
            "-S", "train.warmup_epochs=1",
            "-S", "train.loss=ce_dice",
            "-S", "augment.flip=true",
            "-S", "mlflow.experiment=scenes",
            "-S", "register.model_name=scenes-segmenter",
            "-S", "register.metric=test_miou",
        ],
        project,
    )  # fmt: skip
    metrics = read_metrics(project)
    assert {"test_miou", "test_mean_dice", "test_pixel_accuracy"} <= set(metrics)
    assert "test_top1" not in metrics
    shown = plotted(project)
    assert shown["Mean IoU"] and shown["Loss"] and shown["Per-class IoU"] == 11
    assert "plots/images/test_examples.png" in shown
    # evaluate's whole-split val mIoU is the one training logged for its last epoch
    last_epoch = (project / "plots" / "history.csv").read_text().splitlines()
    history = dict(zip(last_epoch[0].split(","), last_epoch[-1].split(","), strict=True))
    assert metrics["eval_val_miou"] == pytest.approx(float(history["val_miou"]), abs=1e-4)
    per_class = json.loads((project / "metrics" / "per_class.json").read_text())
    assert list(per_class)[0] == "background" and len(per_class) == 11

    c = client(project)
    (run,) = c.search_runs([c.get_experiment_by_name("scenes").experiment_id])
    assert run.data.tags["task"] == "segmentation"
    assert run.data.params["model.arch"] == "unet" and run.data.params["train.loss"] == "ce_dice"
    assert run.data.metrics["test_miou"] == pytest.approx(metrics["test_miou"])
    assert "val_miou" in run.data.metrics and "test_iou_background" in run.data.metrics
    plots = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/test_examples.png", "plots/per_class_iou.csv"} <= plots
    version = c.get_model_version_by_alias("scenes-segmenter", "challenger")
    assert float(version.tags["test_miou"]) == pytest.approx(metrics["test_miou"], rel=1e-5)

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/scenes-segmenter@challenger")
    pixels = np.zeros((2, 64, 96), dtype=np.uint8).tolist()  # twice the trained size
    answer = model.predict(pd.DataFrame({"array": pixels}))
    masks = np.asarray(answer["mask"].tolist())
    assert masks.shape == (2, 64, 96) and masks.max() < 11

    # Colour-coded masks for a folder, back at the images' own 64x64.
    done = run_cli(["predict", "data/raw/test/images", "--out", "scene-masks"], project)
    assert done.returncode == 0, done.stderr[-2000:]
    out = project / "scene-masks"
    assert len(list(out.glob("*_classes.png"))) == 200
    indices = np.asarray(Image.open(out / "0000_classes.png"))
    assert indices.shape == (64, 64) and indices.max() < 11
    assert np.asarray(Image.open(out / "0000.png")).shape == (64, 64, 3)
    legend = (out / "classes.csv").read_text().splitlines()
    assert legend[1].startswith("0,background,")
    shutil.rmtree(out)
    as_csv = run_cli(["predict", "data/raw/test/images", "--out", "masks.csv"], project)
    assert as_csv.returncode == 2 and "Traceback" not in as_csv.stderr
    (error,) = [line for line in as_csv.stderr.splitlines() if "error:" in line]
    assert error == "error: predict: masks.csv: a segmentation model writes masks into a folder"
    assert not (project / "masks.csv").exists()
