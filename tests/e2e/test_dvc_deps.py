"""dvc.yaml as DVC sees it: an archive rebuilt in place is fetched again, and editing a
module a stage runs marks that stage (and only the stages that run it) changed.

Real `dvc repro` and `dvc status` in a temporary git repo, on a 3-class archive of
8x8 images, so the whole pipeline takes seconds.
"""

from __future__ import annotations

import json

import pytest
from conftest import QUICK_RUN, class_files, copy_project, make_tar, png_bytes, sh

pytestmark = pytest.mark.slow

CLASSES = ("ant", "bee", "cow")


def changed_stages(repo) -> dict[str, str]:
    """`dvc status --json`: stage name -> what changed, for every stage that changed."""
    done = sh(["dvc", "status", "--json"], repo)
    return {name.split(":")[-1]: json.dumps(what) for name, what in json.loads(done.stdout).items()}


def stages_with_changed_dep(repo, path: str) -> set[str]:
    """The stages whose changed deps include `path` or a folder holding it."""
    done = sh(["dvc", "status", "--json"], repo)
    found = set()
    for name, changes in json.loads(done.stdout).items():
        for change in changes:
            deps = change.get("changed deps", {}) if isinstance(change, dict) else {}
            if any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps):
                found.add(name.split(":")[-1])
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project on a local archive, reproduced through register and committed."""
    base = tmp_path_factory.mktemp("deps")
    archive = make_tar(base / "pets.tar.gz", class_files(classes=CLASSES, per_class=8))
    params = {
        **QUICK_RUN,
        "fetch.source": "archive",
        "fetch.url": str(archive),
        "prepare.image_size": 8,
        "train.batch_size": 8,
        "register.model_name": "deps-classifier",
    }
    repo = copy_project(base / "project", params)
    sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "reproduced"], repo)
    assert changed_stages(repo) == {}
    return repo, archive


def test_an_archive_rebuilt_in_place_is_fetched_again(project):
    repo, archive = project
    before = json.loads((repo / "data/raw/source.json").read_text())
    files = class_files(classes=CLASSES, per_class=8)
    files["ant/0.png"] = png_bytes(250)  # a relabelled image: same path, new pixels
    files["bee/8.png"] = png_bytes(77)  # a new labelled image
    make_tar(archive, files)
    changed = changed_stages(repo)
    assert set(changed) == {"fetch"} and str(archive) in changed["fetch"]
    sh(["dvc", "repro", "prepare"], repo)
    after = json.loads((repo / "data/raw/source.json").read_text())
    assert after["sha256"] != before["sha256"] and after["num_images"] == before["num_images"] + 1
    card = json.loads((repo / "data/prepared/data_card.json").read_text())
    assert sum(card["totals"].values()) == after["num_images"]
    assert "train" in changed_stages(repo)  # the new data reaches training next
    sh(["git", "checkout", "-q", "--", "."], repo)


@pytest.mark.parametrize(
    ("module", "stages"),
    [
        ("pipeline/training/losses.py", {"train"}),
        ("pipeline/models/layers.py", {"train", "evaluate"}),
        ("pipeline/scoring/metrics.py", {"evaluate"}),
        ("pipeline/tracking/model_registry.py", {"register"}),
        ("pipeline/config.py", {"fetch", "prepare", "train", "evaluate", "register"}),
    ],
)
def test_editing_a_module_changes_exactly_the_stages_that_run_it(project, module, stages):
    repo, _ = project
    sh(["dvc", "repro", "prepare"], repo)  # the archive test may have left fetch changed
    path = repo / module
    original = path.read_text()
    try:
        path.write_text(original + "\n# edited\n")
        assert stages_with_changed_dep(repo, module) == stages
    finally:
        path.write_text(original)
