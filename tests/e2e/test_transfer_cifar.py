"""Transfer from PyTorch weights end to end: real CIFAR-10 images through fetch, a timm
ResNet-18 state dict as `model.pretrained`, progressive fine-tuning in `dvc exp run`,
the MLflow run's param and tag, the registered model, and the served model applying the
weights' ImageNet scaling (checked against PyTorch on the fine-tuned weights)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_project, sh

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (importlib.util.find_spec("torch") and importlib.util.find_spec("timm")),
        reason="needs torch and timm (`make test` installs them: torch==2.13.0, timm --no-deps)",
    ),
]

CIFAR = Path(__file__).resolve().parents[3] / "shared/datasets/cifar10-train.tar.gz"
PER_CLASS = 30
MODEL_NAME = "cifar-transfer"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype="float32")
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype="float32")


def cifar_subset(dest: Path, per_class: int) -> Path:
    """The first `per_class` images of each class of the real CIFAR-10 archive, repacked
    in its own layout (classes.txt, train/<class>/*.jpg): what fetch reads."""
    kept: dict[str, int] = {}
    with tarfile.open(CIFAR) as src, tarfile.open(dest, "w:gz") as out:
        for member in src:
            parts = member.name.split("/")
            if member.isfile() and parts[-1] == "classes.txt":
                out.addfile(member, src.extractfile(member))
            elif (
                member.isfile()
                and len(parts) >= 3
                and parts[-3] == "train"
                and kept.get(parts[-2], 0) < per_class
            ):
                kept[parts[-2]] = kept.get(parts[-2], 0) + 1
                out.addfile(member, io.BytesIO(src.extractfile(member).read()))
            if len(kept) == 10 and all(n >= per_class for n in kept.values()):
                break
    return dest


def timm_resnet18(num_classes: int):
    from pipeline.tools.bench.torchvision_stand_in import install

    install()
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Path]:
    if not CIFAR.is_file():
        pytest.skip(f"{CIFAR} not present")
    import torch

    base = tmp_path_factory.mktemp("pretrained")
    archive = cifar_subset(base / "cifar-subset.tar.gz", PER_CLASS)
    torch.manual_seed(0)
    weights = base / "resnet18-timm.pth"  # an "ImageNet" checkpoint: 1000 classes
    torch.save(timm_resnet18(1000).state_dict(), weights)
    repo = copy_project(
        base / "project",
        {
            "fetch.source": "archive",
            "fetch.url": str(archive),
            "prepare.image_size": 32,
            "prepare.channels": 3,
            "model.arch": "resnet18",
            "model.small_input": False,  # the ImageNet stem the weights were made for
            "model.dropout": 0.0,
            "train.epochs": 3,
            "train.batch_size": 32,
            "train.warmup_epochs": 0,
            "train.learning_rate": 0.001,
            "register.model_name": MODEL_NAME,
            "mlflow.experiment": "cifar-transfer",
        },
    )
    sh(
        [
            "dvc",
            "exp",
            "run",
            "-n",
            "from-timm",
            "-S",
            f"model.pretrained={weights}",
            "-S",
            "train.finetune=progressive",
            "-S",
            "train.unfreeze_groups=2",
            "-S",
            "train.backbone_lr_scale=0.1",
        ],
        repo,
    )
    return repo, weights


def the_run(repo: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar-transfer")
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def test_run_logs_the_weights_their_digest_and_the_fresh_head(project):
    repo, weights = project
    run = the_run(repo)
    assert run.data.params["model.pretrained"] == str(weights)
    assert run.data.tags["pretrained_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert run.data.params["model.input_scaling"] == "imagenet"
    # 1000 ImageNet classes against CIFAR's 10: only the head starts fresh
    assert run.data.params["pretrained_fresh_head"] == "True"
    # every layer of ResNet-18 but the head: its 20 convolutions and 20 batch norms
    assert int(run.data.params["transferred_layers"]) == 40
    assert run.data.params["train.finetune"] == "progressive"
    assert "test_top1" in run.data.metrics


def test_served_model_scales_pixels_as_the_weights_ask(project):
    """The registered model's pyfunc on raw pixels equals PyTorch on ImageNet-normalized
    pixels with the fine-tuned weights exported back: the scaling travels with the model."""
    import mlflow
    import pandas as pd
    import torch

    from pipeline.models.saved import load_keras_file
    from pipeline.models.torch_weights import state_dict_of

    repo, _ = project
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@challenger")
    images = np.load(repo / "data/prepared/test_images.npy")[:8]
    answer = served.predict(pd.DataFrame({"array": [image.tolist() for image in images]}))
    classes = json.loads((repo / "data/prepared/data_card.json").read_text())["classes"]
    served_probs = np.array([[row[name] for name in classes] for row in answer["probabilities"]])

    keras_model = load_keras_file(repo / "data/model/model.keras")
    peer = timm_resnet18(len(classes))
    exported = state_dict_of(keras_model, "resnet18")
    state = peer.state_dict()
    assert set(exported) <= set(state)  # torchvision names; PyTorch's step counters aside
    state.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in exported.items()})
    peer.load_state_dict(state)
    normalized = (images.astype("float32") / 255 - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        logits = peer(torch.from_numpy(normalized.transpose(0, 3, 1, 2).copy()))
    torch_probs = torch.softmax(logits, dim=1).numpy()
    np.testing.assert_allclose(served_probs, torch_probs, atol=1e-4)
