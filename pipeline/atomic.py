"""Write a directory or file completely or not at all: build under a temporary name, rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `target`; on success it replaces `target`.

    On an exception the temporary directory is removed and an existing `target`
    is left as it was, so the next stage never reads a half-written output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def _swap_into_place(new: Path, target: Path) -> None:
    """Move an old `target` aside, rename `new` to `target`, then delete the old one.

    If the second rename fails, the old `target` is put back.
    """
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`.

    The temporary name ends like `path` (`.weights.h5`, `.png`), so writers that
    check the suffix accept it. On an exception (a full disk, a crash) it is
    removed and an existing `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, completely or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: object, *, sort_keys: bool = True) -> None:
    """Write JSON completely or not at all (keys sorted unless the order means
    something, like classes in label order)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
