"""The artifact fuzzer (issue 18): damage each file a digits `dvc repro` left, and run
every command that reads it.

The project is built once by a real `dvc repro` (tiny params) and registered. Each case
then takes a fresh copy of it, damages one file (cut to half its size, random bytes of
its size, deleted, or read-only with the command run as user `nobody`), and runs one
command in-process through `pipeline.__main__.main`. The command must either succeed
with a correct result (the file was not needed, or was rebuilt), or exit non-zero with
exactly one `error:` line on stderr that names the file, no traceback (an exception
escaping `main`), and every other file of the project byte-identical.

Which files: every file under data/, plots/ and metrics/ (for data/raw: source.json and
one image of its one kind of folder, a class folder), mlflow.db, and one file of each
kind under mlartifacts/ (the logged model's MLmodel, Keras file, data card, environment
files and code; the training run's own artifacts). Which commands: the stages whose
dvc.yaml deps hold the file, and the commands that read the tracking store and the tools
(`READS`, the one table besides dvc.yaml); `test_commands_read_no_artifact_beyond_the_table`
watches each command's file opens (an audit hook) and fails when a command reads a file
this table does not give it, so the table cannot fall behind the code.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import QUICK_RUN, ROOT, copy_project, pipeline_env, sh

pytestmark = pytest.mark.slow

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
MODEL_NAME = PARAMS["register"]["model_name"]
EXPERIMENT = PARAMS["mlflow"]["experiment"]
SAMPLES = "samples"  # a few of the digits, as a user's folder to predict

# Every command that reads an artifact, as a user types it (predict's outputs under out/).
COMMANDS = {
    "prepare": ["prepare"],
    "train": ["train"],
    "evaluate": ["evaluate"],
    "register": ["register"],
    "promote": ["promote"],
    "predict": ["predict", SAMPLES, "--output", "out/predictions.csv"],
    "predict-model": [
        "predict",
        SAMPLES,
        "--output",
        "out/registered.csv",
        "--model",
        f"models:/{MODEL_NAME}@challenger",
    ],
    "compare": ["compare", "--experiment", EXPERIMENT, "--out", "out/compare"],
    "check": ["check"],
}
# What commands read besides their dvc.yaml deps: the tracking store (and the logged model
# in its artifact folder), and the tools' inputs.
LOGGED_MODEL = "mlartifacts/models"
READS = {
    "train": ["mlflow.db"],
    "evaluate": ["mlflow.db"],
    "register": ["mlflow.db", LOGGED_MODEL],
    "promote": ["mlflow.db", LOGGED_MODEL],
    "predict": ["data/model/model.keras", "data/prepared/data_card.json"],
    "predict-model": ["mlflow.db", LOGGED_MODEL],
    "compare": ["mlflow.db"],
}
# The kinds of file a repro leaves (first match wins); one file of a kind stands for all.
KINDS = {
    "raw-source": ("data/raw/source.json",),
    "raw-image": ("data/raw/*.png",),
    "card": ("data/prepared/data_card.json",),
    "images": ("data/prepared/*_images.npy",),
    "labels": ("data/prepared/*_labels.npy",),
    "model": ("data/model/model.keras",),
    "summary": ("data/model/summary.txt",),
    "run-file": ("data/model/mlflow_run.json",),
    "history": ("plots/history.csv",),
    "plot-images": ("plots/images/*",),
    "plot-tables": ("plots/tables/*",),
    "eval": ("metrics/eval.json",),
    "per-class": ("metrics/per_class.json",),
    "registered": ("metrics/registered.json",),
    "store": ("mlflow.db",),
    "logged-mlmodel": (f"{LOGGED_MODEL}/*/artifacts/MLmodel",),
    "logged-keras": (f"{LOGGED_MODEL}/*/artifacts/artifacts/model.keras",),
    "logged-card": (f"{LOGGED_MODEL}/*/artifacts/artifacts/data_card.json",),
    "logged-env": (f"{LOGGED_MODEL}/*/artifacts/*.yaml", f"{LOGGED_MODEL}/*/requirements.txt"),
    "logged-code": (f"{LOGGED_MODEL}/*/artifacts/served_model.py", f"{LOGGED_MODEL}/*/code/*"),
    "run-artifacts": ("mlartifacts/*/artifacts/*",),
}
SCOPE = ("data/", "plots/", "metrics/", "mlartifacts/")
STORE = "mlflow.db"
LOCKS = "mlflow.db*.lock"  # the store's lock files, beside it: not data, made by any use
CORRUPTIONS = ("truncated", "random-bytes", "deleted", "read-only")


def kind_of(rel: str) -> str | None:
    return next(
        (k for k, pats in KINDS.items() if any(fnmatch.fnmatch(rel, p) for p in pats)), None
    )


def covers(dep: str, rel: str) -> bool:
    return rel == dep or rel.startswith(dep.rstrip("/") + "/")


def declared_reads() -> dict[str, list[str]]:
    """Per command, the paths it reads: its stage's dvc.yaml deps (data and metrics, not
    code or params), plus READS."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    reads = {name: list(READS.get(name, [])) for name in COMMANDS}
    for stage, spec in stages.items():
        for dep in spec.get("deps", []):
            dep = dep if isinstance(dep, str) else next(iter(dep))
            if stage in reads and not dep.startswith("pipeline") and "${" not in dep:
                reads[stage].append(dep)
    return reads


def downstream(kind: str) -> list[str]:
    """The commands that read files of `kind` (its first pattern, `*` as a name)."""
    example = KINDS[kind][0].replace("*", "x")
    return [
        name for name, deps in declared_reads().items() if any(covers(d, example) for d in deps)
    ]


# Pairs whose fix belongs to the tracking store's owner (issue 18 classes 4 and 6).
PENDING: dict[tuple[str, str, str], str] = {}


def cases():
    for kind in KINDS:
        for command in downstream(kind):
            for corruption in CORRUPTIONS:
                marks = ()
                if (reason := PENDING.get((kind, corruption, command))) is not None:
                    marks = pytest.mark.xfail(strict=True, reason=f"tracking fix pending: {reason}")
                yield pytest.param(
                    kind, corruption, command, id=f"{kind}-{corruption}-{command}", marks=marks
                )


# --------------------------------------------------------------------------- the project


class Base:
    """The repro'd project (`root`, never run in) and what its commands did in a copy."""

    def __init__(self, root: Path, scratch: Path):
        self.root, self.scratch, self.count = root, scratch, 0
        in_git = tracked(root)
        self.files = sorted(
            rel
            for p in root.rglob("*")
            if p.is_file()
            and ((rel := p.relative_to(root).as_posix()).startswith(SCOPE) or rel == STORE)
            and not p.name.startswith(".")
            and rel not in in_git
        )
        self.reads: dict[str, set[str]] = {}
        self.outputs: dict[str, bytes] = {}

    def copy(self) -> Path:
        """A fresh copy: hard links, as the stages replace their outputs whole, but for the
        tracking store (SQLite writes in place, MLflow overwrites a re-logged artifact):
        a real copy whose absolute paths (artifact locations) are the copy's."""
        self.count += 1
        work = self.scratch / f"case{self.count}"
        work.mkdir()
        # not DVC's cache (copies of the outputs no command reads): thousands of links
        skip = {"mlflow.db", "mlartifacts", ".dvc"}
        linked = [p for p in self.root.iterdir() if p.name not in skip]
        linked_dvc = [p for p in (self.root / ".dvc").iterdir() if p.name != "cache"]
        subprocess.run(["cp", "-al", *map(str, linked), str(work)], check=True)
        (work / ".dvc").mkdir()
        subprocess.run(["cp", "-al", *map(str, linked_dvc), str(work / ".dvc")], check=True)
        shutil.copy2(self.root / "mlflow.db", work / "mlflow.db")
        shutil.copytree(self.root / "mlartifacts", work / "mlartifacts")
        retarget(work / "mlflow.db", str(self.root), str(work))
        return work

    def file_of(self, kind: str, command: str) -> str:
        """The file of `kind` that `command` read, else the first of the kind."""
        files = [f for f in self.files if kind_of(f) == kind]
        read = [f for f in files if f in self.reads.get(command, set())]
        return (read or files)[0]


def tracked(root: Path) -> set[str]:
    done = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    return set(done.stdout.split())


def retarget(db: Path, old: str, new: str) -> None:
    """Every text cell of the SQLite store naming `old` (a path) names `new` instead."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f"PRAGMA table_info('{table}')"):
                if kind.upper().startswith(("VARCHAR", "TEXT")):
                    con.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE "{column}" LIKE ?',
                        (old, new, f"%{old}%"),
                    )
        con.commit()


@pytest.fixture(scope="module")
def base(tmp_path_factory, request) -> Base:
    """A digits project after `dvc repro` with tiny params, and the files each command read
    when nothing was damaged (and its outputs, to compare against)."""
    root = tmp_path_factory.mktemp("fuzz") / "project"
    root.mkdir()
    copy_project(root, QUICK_RUN)
    sh(["dvc", "repro"], root)
    samples = root / SAMPLES
    samples.mkdir()
    for image in sorted((root / "data/raw").rglob("*.png"))[:200:25]:
        shutil.copy2(image, samples / f"{image.parent.name}_{image.name}")
    # Cases run in a folder user nobody can reach (pytest's own is root's alone).
    scratch = Path(tempfile.mkdtemp(prefix="artifact-fuzz-"))
    scratch.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    project = Base(root, scratch)
    for name, argv in COMMANDS.items():
        work = project.copy()
        with watching_opens(work) as opened:
            rc, _, err, trace = invoke(work, argv)
        assert trace is None and rc == 0, f"{name}: {err}{trace}"
        project.reads[name] = {f for f in project.files if f in opened}
        if name in JUDGED_BY:
            project.outputs[name] = (work / JUDGED_BY[name]).read_bytes()
    return project


# The output a command's success on damaged input is judged by: the undamaged run's.
JUDGED_BY = {
    "evaluate": "metrics/eval.json",
    "predict": "out/predictions.csv",
    "predict-model": "out/registered.csv",
}


_WATCHED: list[tuple[Path, set[str], set[str]]] = []


def _audit(event: str, args) -> None:
    if not _WATCHED or event not in ("open", "sqlite3.connect", "os.rename"):
        return
    root, opened, written = _WATCHED[-1]

    def rel(path) -> str | None:
        with contextlib.suppress(ValueError, TypeError):
            return Path(os.path.abspath(path)).relative_to(root).as_posix()
        return None

    if event == "os.rename":  # os.replace too: a file written through a temporary name
        written.add(rel(args[1]))
        return
    path = args[0]
    if event == "open":
        mode, flags = args[1], args[2] or 0
        if not isinstance(path, str | Path):
            return
        if mode[0] in "wxa" if mode else flags & (os.O_WRONLY | os.O_CREAT):
            written.add(rel(path))
            return
    if (name := rel(path)) is not None and name not in written:  # not its own output
        opened.add(name)


sys.addaudithook(_audit)


@contextlib.contextmanager
def watching_opens(root: Path):
    """The files under `root` that are opened for reading (or as a SQLite database)."""
    opened: set[str] = set()
    _WATCHED.append((root, opened, set()))
    try:
        yield opened
    finally:
        _WATCHED.pop()


# --------------------------------------------------------------------------- running


NOBODY = pwd.getpwnam("nobody")


@contextlib.contextmanager
def as_nobody(work: Path):
    """This process acting as user `nobody` (effective ids, no groups) on a project it owns."""
    for path in [work, *work.rglob("*")]:
        os.lchown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(NOBODY.pw_gid)
    os.seteuid(NOBODY.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def invoke(work: Path, argv: list[str], *, nobody: bool = False):
    """(exit code, stdout, stderr, traceback or None) of `python -m pipeline ARGV` run
    in-process in `work`."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

    from pipeline.__main__ import main

    out, err, trace, rc = io.StringIO(), io.StringIO(), None, None
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it
    # MLflow keeps each run's artifact folder per run id for the process: every copy has
    # the same run ids, and must log into its own mlartifacts/.
    mlflow_tracking_utils._artifact_repos_cache.clear()
    before = os.getcwd()
    os.chdir(work)
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            as_nobody(work) if nobody else contextlib.nullcontext(),
        ):
            rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    except BaseException:  # noqa: BLE001 - an exception escaping main is the traceback a user sees
        trace = traceback.format_exc()
    finally:
        os.chdir(before)
        while mlflow.active_run():
            with contextlib.suppress(Exception):
                mlflow.end_run()
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return rc, out.getvalue(), err.getvalue(), trace


PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")  # tqdm bars: MLflow's downloads, predict's


def error_lines(stderr: str) -> list[str]:
    """stderr's lines, a progress bar's redraws (`\\r`) reduced to their last, bars dropped."""
    lines = [line.split("\r")[-1].strip() for line in stderr.split("\n")]
    return [line for line in lines if line and not PROGRESS.search(line)]


def corrupt(path: Path, corruption: str, rng: np.random.Generator) -> None:
    """Damage `path` (a hard link: it gets a file of its own first)."""
    data = path.read_bytes()
    path.unlink()
    if corruption == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif corruption == "random-bytes":
        path.write_bytes(rng.bytes(len(data)))
    elif corruption == "read-only":
        path.write_bytes(data)
        path.chmod(0o444)


def state(work: Path) -> dict[str, tuple]:
    """Every file's (size, mode, inode, mtime) and every folder of the project, not .git or
    bytecode caches (running any command may touch those)."""
    found = {}
    for path in work.rglob("*"):
        rel = path.relative_to(work)
        if rel.parts[0] == ".git" or "__pycache__" in rel.parts or fnmatch.fnmatch(rel, LOCKS):
            continue
        st = path.lstat()
        found[rel.as_posix()] = (
            None if path.is_dir() else (st.st_size, st.st_mode, st.st_ino, st.st_mtime_ns)
        )
    return found


def changed(work: Path, before: dict, after: dict, base: Path, target: str, damaged: bytes | None):
    """The files whose bytes differ (or that appeared or went) between `before` and `after`."""
    differ = []
    for rel in sorted(set(before) | set(after)):
        if before.get(rel) == after.get(rel):
            continue
        if rel not in before or rel not in after or before[rel] is None or after[rel] is None:
            differ.append(rel)
            continue
        was = damaged if rel == target else (base / rel).read_bytes()
        if (work / rel).read_bytes() != was:
            differ.append(rel)
    return differ


def check_result(command: str, work: Path, base: Base) -> None:
    """A command that succeeded on a damaged project must have done its job right."""
    if command == "prepare":
        card = json.loads((work / "data/prepared/data_card.json").read_text())
        present = len(list((work / "data/raw").rglob("*.png")))
        assert sum(card["totals"].values()) == present
    elif command == "train":
        from pipeline.models.saved import load_trained_model

        assert load_trained_model(work / "data/model").output_shape[-1] == 10
    elif command == "register":
        assert json.loads((work / "metrics/registered.json").read_text())["version"] == "2"
    elif command == "compare":
        assert (work / "out/compare/report.md").is_file()
    if command in JUDGED_BY:
        rel = JUDGED_BY[command]
        assert (work / rel).read_bytes() == base.outputs[command], f"{rel}: not as undamaged"


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("kind,corruption,command", list(cases()))
def test_damaged_artifact(base, request, kind, corruption, command):
    if corruption == "read-only" and os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    work = base.copy()
    request.addfinalizer(lambda: subprocess.run(["rm", "-rf", str(work)], check=False))
    target = base.file_of(kind, command)
    path = work / target
    corrupt(path, corruption, np.random.default_rng(len(target)))
    damaged = path.read_bytes() if path.exists() else None
    before = state(work)
    rc, _, err, trace = invoke(work, COMMANDS[command], nobody=corruption == "read-only")
    assert trace is None, f"{command} on {corruption} {target}: traceback\n{trace}"
    if rc == 0:
        check_result(command, work, base)
        return
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{target}: {lines}"
    assert Path(target).name in lines[0], f"{lines[0]!r} does not name {target}"
    assert changed(work, before, state(work), base.root, target, damaged) == []


def test_every_file_of_the_repro_is_of_a_known_kind(base):
    """The KINDS table covers what a repro leaves, and every command that reads it."""
    assert [f for f in base.files if kind_of(f) is None] == []
    unread = sorted({kind_of(f) for f in base.files} - {k for k in KINDS if downstream(k)})
    assert unread == ["per-class", "plot-images", "plot-tables", "registered", "run-artifacts"]


def test_commands_read_no_artifact_beyond_the_table(base):
    """Each command, undamaged, opened only files its dvc.yaml deps or READS give it."""
    reads = declared_reads()
    beyond = {
        name: sorted(f for f in opened if not any(covers(d, f) for d in reads[name]))
        for name, opened in base.reads.items()
    }
    assert beyond == {name: [] for name in COMMANDS}


def test_a_damaged_model_file_in_a_real_process(base):
    """The in-process runs above, once as a real `python -m pipeline`: exit 2, one stderr
    line, no traceback (TensorFlow's start-up lines kept off it too). (Not as user nobody:
    the interpreter may live where only root reaches, as pyenv's does under /root.)"""
    work = base.copy()
    corrupt(work / "data/model/model.keras", "random-bytes", np.random.default_rng(0))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "evaluate"],
        cwd=work,
        capture_output=True,
        text=True,
        env={k: v for k, v in pipeline_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"},
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "error: data/model/model.keras: is not a .keras file (not a whole zip archive); rebuild "
        "it with `dvc repro -f train` (or `dvc checkout data/model/model.keras` to restore the "
        "committed one)"
    ]


def test_the_repro_itself_was_left_as_it_was(base):
    """No case wrote through a hard link into the project all cases are copied from."""
    assert sh(["dvc", "status"], base.root).stdout.strip().endswith("up to date.")
