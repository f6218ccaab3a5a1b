"""Bad input through the command a user runs: `python -m pipeline fetch|prepare|check` as a
subprocess in a temporary project that already holds a good `data/raw` and `data/prepared`.

Each case must exit 2 with exactly one stderr line, `error: ...`, naming the bad file or
key, print no traceback, and leave the project's files byte for byte as they were (the
earlier outputs included, no temporary files left). fetch and prepare import no
TensorFlow, so each run takes about a second.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    Server,
    archive_project,
    class_files,
    edit_params,
    garbled_jpeg,
    make_tar,
    mask_files,
    png_bytes,
    run_cli,
    sh,
    symlink,
    truncated_jpeg,
)

from pipeline.config import FetchConfig
from pipeline.stages import fetch

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> Path:
    """A project whose `fetch` and `prepare` ran through the CLI: 3 classes of 8 images."""
    project, _ = archive_project(tmp_path_factory.mktemp("produced"), CLASSES)
    sh([sys.executable, "-m", "pipeline", "fetch"], project)
    sh([sys.executable, "-m", "pipeline", "prepare"], project)
    return project


def serve_archive(project: Path, server: Server, files: dict, extra=(), params=None) -> str:
    """A tar.gz of `files` on the local HTTP server, set as fetch.url; returns the URL."""
    make_tar(server.root / "pets.tar.gz", files, extra)
    url = f"{server.url}/pets.tar.gz"
    edit_params(project, {"fetch.url": url, **(params or {})})
    return url


def project_state(project: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) of the project, hidden ones included; not
    .git or Python's bytecode caches, which running any command may touch."""
    state: dict[str, bytes | None] = {}
    for path in sorted(project.rglob("*")):
        rel = path.relative_to(project)
        if rel.parts[0] == ".git" or "__pycache__" in rel.parts:
            continue
        state[rel.as_posix()] = None if path.is_dir() else path.read_bytes()
    return state


# --------------------------------------------------------------------------- the cases
# Each sets up one mistake in `project` and returns what the error line must contain.


def params_not_yaml(project: Path, server: Server) -> list[str]:
    (project / "params.yaml").write_text("prepare:\n  image_size: [8, 8\n")
    return ["params.yaml: not valid YAML at line"]


def unknown_key(project: Path, server: Server) -> list[str]:
    edit_params(project, {"prepare.on_corupt": "skip"})
    return ["params.yaml: unknown key prepare.on_corupt; allowed:", "on_corrupt"]


def wrong_type(project: Path, server: Server) -> list[str]:
    edit_params(project, {"fetch.timeout_s": "soon"})
    return ["params.yaml: fetch.timeout_s must be a number, got 'soon'"]


def on_corrupt_unknown(project: Path, server: Server) -> list[str]:
    edit_params(project, {"prepare.on_corrupt": "ignore"})
    return ["params.yaml: prepare.on_corrupt must be one of 'fail', 'skip', got 'ignore'"]


def member_with_dotdot(project: Path, server: Server) -> list[str]:
    url = serve_archive(project, server, class_files() | {"../evil.png": png_bytes()})
    return [f"refusing archive member '../evil.png' in {url} (path outside the destination)"]


def member_with_absolute_path(project: Path, server: Server) -> list[str]:
    target = project.parent / "absolute-evil.png"
    url = serve_archive(project, server, class_files() | {str(target): png_bytes()})
    return [f"refusing archive member '{target}' in {url} (absolute path)"]


def symlink_escaping(project: Path, server: Server) -> list[str]:
    url = serve_archive(project, server, class_files(), [symlink("cat/link", "../../../x")])
    return [f"refusing archive member 'cat/link' in {url} (link pointing outside"]


def checksum_mismatch(project: Path, server: Server) -> list[str]:
    url = serve_archive(project, server, class_files(), params={"fetch.sha256": "0" * 64})
    return [f"checksum mismatch for {url}: expected {'0' * 64}, got "]


def http_404(project: Path, server: Server) -> list[str]:
    url = f"{server.url}/missing.tar.gz"
    edit_params(project, {"fetch.url": url})
    return [f"fetch: {url} answered HTTP 404"]


def never_answers(project: Path, server: Server) -> list[str]:
    url = f"{server.url}/slow/pets.tar.gz"  # the server holds the request, sending nothing
    edit_params(project, {"fetch.url": url, "fetch.timeout_s": 1})
    return [f"fetch: {url} did not answer within 1s (fetch.timeout_s)"]


def archive_with_empty_class(project: Path, server: Server) -> list[str]:
    url = serve_archive(project, server, class_files() | {"bird/notes.txt": b"none yet"})
    return [f"fetch: class folder bird/ (in {url}) has no images"]


def empty_class_folder(project: Path, server: Server) -> list[str]:
    (project / "data/raw/bird").mkdir()
    return ["prepare: class folder data/raw/bird has no images", "remove the folder"]


def single_class(project: Path, server: Server) -> list[str]:
    for name in CLASSES[1:]:
        shutil.rmtree(project / "data/raw" / name)
    return ["prepare: data/raw has one class folder (cat); a classifier needs at least 2"]


def truncated_jpeg_among_pngs(project: Path, server: Server) -> list[str]:
    (project / "data/raw/dog/photo.jpg").write_bytes(truncated_jpeg())
    return ["prepare: cannot decode image data/raw/dog/photo.jpg: ", "prepare.on_corrupt: skip"]


def garbled_jpeg_among_pngs(project: Path, server: Server) -> list[str]:
    (project / "data/raw/owl/photo.jpg").write_bytes(garbled_jpeg())
    return ["prepare: cannot decode image data/raw/owl/photo.jpg: ", "prepare.on_corrupt: skip"]


def mask_value_above_the_classes(project: Path, server: Server) -> list[str]:
    files = mask_files() | {"val/masks/001.png": png_bytes(7)}  # 3 classes: 0, 1, 2
    make_tar(project.parent / "scenes.tar", files)
    cfg = FetchConfig(source="archive", url=str(project.parent / "scenes.tar"))
    fetch.run(cfg, project / "data/raw")  # a segmentation data/raw, as `fetch` writes it
    return ["prepare: mask data/raw/val/masks/001.png has value 7, but there are 3 classes"]


def prepare_before_fetch(project: Path, server: Server) -> list[str]:
    shutil.rmtree(project / "data/raw")
    return ["prepare: data/raw/source.json not found; run `python -m pipeline fetch` first"]


CASES: dict[str, tuple[str, Callable[[Path, Server], list[str]]]] = {
    "params-not-yaml": ("check", params_not_yaml),
    "unknown-key": ("prepare", unknown_key),
    "wrong-type": ("fetch", wrong_type),
    "on-corrupt-unknown": ("check", on_corrupt_unknown),
    "archive-dotdot": ("fetch", member_with_dotdot),
    "archive-absolute-path": ("fetch", member_with_absolute_path),
    "archive-symlink-escape": ("fetch", symlink_escaping),
    "checksum-mismatch": ("fetch", checksum_mismatch),
    "http-404": ("fetch", http_404),
    "url-never-answers": ("fetch", never_answers),
    "archive-empty-class": ("fetch", archive_with_empty_class),
    "empty-class-folder": ("prepare", empty_class_folder),
    "single-class": ("prepare", single_class),
    "truncated-jpeg": ("prepare", truncated_jpeg_among_pngs),
    "garbled-jpeg": ("prepare", garbled_jpeg_among_pngs),
    "mask-value-above-classes": ("prepare", mask_value_above_the_classes),
    "prepare-before-fetch": ("prepare", prepare_before_fetch),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_keeps_what_was_produced(
    case: str, produced: Path, tmp_path: Path, server: Server
) -> None:
    project = tmp_path / "project"
    shutil.copytree(produced, project, symlinks=True)
    command, make_mistake = CASES[case]
    expected = make_mistake(project, server)
    before = project_state(project)
    outside = sorted(p.name for p in tmp_path.iterdir())

    result = run_cli([command], project)

    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0], f"{part!r} missing from {lines[0]!r}"
    assert project_state(project) == before  # data/raw, data/prepared: not a byte changed
    assert sorted(p.name for p in tmp_path.iterdir()) == outside  # nothing written beside it


def test_corrupt_jpegs_are_skipped_counted_and_named_when_asked(
    produced: Path, tmp_path: Path
) -> None:
    """The other answer to a corrupt file: `prepare.on_corrupt: skip`. The good images are
    prepared exactly as before the damaged ones arrived."""
    project = tmp_path / "project"
    shutil.copytree(produced, project, symlinks=True)
    (project / "data/raw/dog/photo.jpg").write_bytes(truncated_jpeg())
    (project / "data/raw/owl/photo.jpg").write_bytes(garbled_jpeg())
    edit_params(project, {"prepare.on_corrupt": "skip"})
    card_file = project / "data/prepared/data_card.json"
    earlier = json.loads(card_file.read_text())

    result = run_cli(["prepare"], project)

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: prepare: skipped 2 corrupt file(s) (prepare.on_corrupt: skip): "
        "data/raw/dog/photo.jpg, data/raw/owl/photo.jpg; "
        "all in data/prepared/data_card.json (skipped_files)"
    ]
    card = json.loads(card_file.read_text())
    assert card["skipped_corrupt"] == 2
    assert card["skipped_files"] == ["dog/photo.jpg", "owl/photo.jpg"]
    assert card["prepare"]["on_corrupt"] == "skip"
    assert card["totals"] == earlier["totals"]
    assert card["data_hash"] == earlier["data_hash"]  # the same arrays as without them
