"""A DVC remote round trip, as a teammate would do it (docs/dvc.md).

In one repo: `dvc repro` (one tiny training), commit what DVC asks to, add a local-folder
remote, `dvc push`, tag the model artifact. In a fresh `git clone`: nothing but git files
until `dvc pull`; after it the DVC outputs are byte-identical to the pushed ones, `dvc status`
is clean, `dvc repro` runs no stage and changes no file, `dvc metrics show` gives the pushed
figures, and `dvc artifacts get` downloads the model artifact from the remote.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import QUICK_RUN, copy_project, sh

pytestmark = pytest.mark.slow

OUTPUTS = ("data/raw", "data/prepared", "data/model")  # the cached outs: what is pushed
GIT_TRACKED = ("metrics/eval.json", "metrics/per_class.json", "plots/history.csv", "dvc.lock")
STAGES = ("fetch", "prepare", "train", "evaluate", "register")
VERSION = "v1.0.0"
# Python writes __pycache__ into the pipeline/ folders dvc.yaml depends on unless told not
# to; a user's shell does not tell it, so neither does this test ("" is unset for Python).
USER_ENV = {"PYTHONDONTWRITEBYTECODE": ""}


def run(args: list[str], cwd: Path):
    return sh(args, cwd, **USER_ENV)


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by path relative to it."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def workspace(repo: Path) -> dict[str, str]:
    """Every file of a project checkout but git's and DVC's own (.git, .dvc/cache, .dvc/tmp)."""
    return {
        path: digest
        for path, digest in digests(repo).items()
        if not path.startswith((".git/", ".dvc/cache/", ".dvc/tmp/"))
    }


def status(repo: Path) -> dict:
    return json.loads(run(["dvc", "status", "--json"], repo).stdout)


def lock_outs(repo: Path) -> dict[str, str]:
    """dvc.lock's md5 of each cached output (a `.dir` manifest for folders)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"] in OUTPUTS
    }


def artifact_name(repo: Path) -> str:
    """The model artifact's name as DVC resolves dvc.yaml: register.model_name."""
    return yaml.safe_load((repo / "params.yaml").read_text())["register"]["model_name"]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> tuple[Path, Path]:
    """A project after `dvc repro`, committed, pushed to a local-folder default remote and
    with its model artifact registered (a GTO git tag); returns (repo, remote folder)."""
    base = tmp_path_factory.mktemp("dvc-remote")
    (base / "origin").mkdir()
    repo = copy_project(base / "origin", QUICK_RUN)
    reproduced = run(["dvc", "repro"], repo).stdout
    assert "git add dvc.lock" in reproduced  # DVC asks for its lock; metrics and plots too:
    run(["git", "add", *GIT_TRACKED, "metrics", "plots"], repo)
    run(["git", "commit", "-qm", "trained"], repo)
    assert run(["git", "status", "--porcelain"], repo).stdout == ""  # nothing left untracked

    remote = base / "remote"
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], repo)
    run(["git", "add", ".dvc/config"], repo)
    run(["git", "commit", "-qm", "remote"], repo)
    run(["dvc", "push"], repo)
    run(["gto", "register", artifact_name(repo), "--version", VERSION], repo)
    return repo, remote


def test_push_sends_every_cached_output_to_the_remote(pushed):
    repo, remote = pushed
    outs = lock_outs(repo)
    assert set(outs) == set(OUTPUTS)
    for path, md5 in outs.items():  # each folder's manifest is on the remote
        assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file(), path
    assert "in sync" in run(["dvc", "status", "--cloud"], repo).stdout


def test_clone_restores_outputs_metrics_and_a_no_op_repro_after_pull(pushed, tmp_path):
    repo, _ = pushed
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)

    # Before the pull: git's files only, and DVC says the outputs are missing.
    for path in OUTPUTS:
        assert not (clone / path).exists(), path
    missing = status(clone)
    assert missing, "dvc status is clean in a clone that has not pulled"
    for stage, out in zip(STAGES, OUTPUTS, strict=False):  # fetch, prepare, train
        assert {"changed outs": {out: "not in cache"}} in missing[stage], missing
    code = {  # git restores the code: a dep hashed with files git never ships differs here
        dep
        for entries in missing.values()
        for entry in entries
        for dep, change in entry.get("changed deps", {}).items()
        if change == "modified"
    }
    assert not code, f"{code} differ in a fresh clone: is __pycache__ in .dvcignore?"

    run(["dvc", "pull"], clone)
    for path in OUTPUTS:  # byte-identical to what was pushed
        assert digests(clone / path) == digests(repo / path), path
        assert digests(clone / path), path
    assert status(clone) == {}
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone).stdout

    before = workspace(clone)
    repro = run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in repro, repro
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro, repro
    assert "Data and pipelines are up to date" in repro
    assert workspace(clone) == before  # no file written, none deleted
    assert not (clone / "mlflow.db").exists()  # no stage ran, so no MLflow run either

    for name in ("metrics/eval.json", "metrics/per_class.json"):
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], clone).stdout)
    pushed_metrics = json.loads((repo / "metrics/eval.json").read_text())
    (workspace_metrics,) = shown.values()  # one revision: the workspace (key "" in DVC 3)
    assert workspace_metrics["data"]["metrics/eval.json"]["data"] == pushed_metrics
    assert pushed_metrics["test_top1"] > 0


def test_artifacts_get_downloads_the_model_from_the_remote(pushed, tmp_path):
    """`dvc artifacts get` from a clone that never pulled: the model must come from the remote."""
    repo, _ = pushed
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / ".dvc" / "cache").exists()
    name = artifact_name(repo)
    got = tmp_path / "model"
    run(["dvc", "artifacts", "get", str(clone), name, "--rev", VERSION, "-o", str(got)], tmp_path)
    assert digests(got) == digests(repo / "data/model")
    assert (got / "model.keras").stat().st_size > 1000
