"""dvc.yaml as DVC sees it: an archive rebuilt in place is fetched again, and editing a
module a stage runs marks that stage (and only the stages that run it) changed.

Real `dvc repro` and `dvc status` in a temporary git repo, on a 3-class archive of
8x8 images, so the whole pipeline takes seconds.
"""

from __future__ import annotations

import json

import pytest
from conftest import QUICK_RUN, archive_project, class_files, make_tar, png_bytes, sh

pytestmark = pytest.mark.slow

CLASSES = ("ant", "bee", "cow")


def changed_stages(repo) -> dict[str, list]:
    """`dvc status --json`: stage name -> what changed, for every stage that changed."""
    done = sh(["dvc", "status", "--json"], repo)
    return {name.split(":")[-1]: what for name, what in json.loads(done.stdout).items()}


def changed_deps(changes: list) -> set[str]:
    """The dependency paths among one stage's `dvc status` changes."""
    return {dep for c in changes if isinstance(c, dict) for dep in c.get("changed deps", {})}


def stages_with_changed_dep(repo, path: str) -> set[str]:
    """The stages whose changed deps include `path` or a folder holding it."""
    return {
        stage
        for stage, changes in changed_stages(repo).items()
        if any(path == d or path.startswith(d.rstrip("/") + "/") for d in changed_deps(changes))
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project on a local archive, reproduced through register and committed."""
    params = {**QUICK_RUN, "train.batch_size": 8, "register.model_name": "deps-classifier"}
    repo, archive = archive_project(tmp_path_factory.mktemp("deps"), CLASSES, params)
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
    assert set(changed) == {"fetch"} and str(archive) in changed_deps(changed["fetch"])
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
        ("pipeline/models/layers.py", {"train", "evaluate", "register"}),
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
