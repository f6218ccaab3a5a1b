"""Reading the files stages leave on disk, guarded: one reader per kind of file.

A missing, truncated, garbled, unreadable or wrongly shaped artifact (prepared arrays,
data card, model file, history, run file, eval metrics, source.json, checkpoints)
becomes a DataError of one line naming the file, what is wrong with it, and how to get
a good one back: the stage that writes it (`layout.OUTPUTS`) and `dvc checkout` (or
`git checkout` for outputs DVC does not cache). A traceback from numpy, json, h5py or
Keras would name neither the file nor the fix.

No framework is imported here at module level: `import pipeline` stays light, and
numpy, h5py and Keras are loaded by the readers that need them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import DataError
from pipeline.layout import producer


def _shown(path: Path) -> str:
    """`path` relative to the working directory (the project root) when it lies under it."""
    path = Path(path)
    if path.is_absolute():
        with contextlib.suppress(ValueError):
            return path.relative_to(Path.cwd()).as_posix()
    return path.as_posix()


def restore_hint(path: Path) -> str:
    """How to get a good `path` back: rebuild it with its stage, or restore the committed one."""
    found = producer(path)
    if found is None:
        return ""
    stage, cached = found
    restore = "dvc checkout" if cached else "git checkout"
    return (
        f"; rebuild it with `dvc repro -f {stage}` "
        f"(or `{restore} {_shown(path)}` to restore the committed one)"
    )


def damaged(path: Path, what: str, *, who: str = "") -> DataError:
    """The one-line error for an artifact that is there but unusable."""
    return DataError(f"{who + ': ' if who else ''}{_shown(path)}: {what}{restore_hint(path)}")


def missing(path: Path, *, who: str = "") -> DataError:
    """The one-line error for an artifact that is not there: its stage has not run."""
    found = producer(path)
    hint = f"; run `python -m pipeline {found[0]}` first" if found else ""
    if found:
        restore = "dvc checkout" if found[1] else "git checkout"
        hint += f" (or `{restore} {_shown(path)}` to restore the committed one)"
    return DataError(f"{who + ': ' if who else ''}{_shown(path)} not found{hint}")


@contextlib.contextmanager
def reading(path: Path, *, who: str = "") -> Iterator[None]:
    """File-system and decoding errors while reading `path` as one line naming it."""
    try:
        yield
    except DataError:
        raise
    except (FileNotFoundError, NotADirectoryError):
        raise missing(path, who=who) from None
    except IsADirectoryError:
        raise damaged(path, "is a folder, not a file", who=who) from None
    except PermissionError:
        raise damaged(
            path, f"cannot be read by this user ({os.strerror(13)}); fix its permissions", who=who
        ) from None
    except UnicodeDecodeError:
        raise damaged(path, "is not text (bytes that are not UTF-8)", who=who) from None
    except OSError as exc:
        raise damaged(path, f"cannot be read ({exc.strerror or exc})", who=who) from None


def read_bytes(path: Path, *, who: str = "") -> bytes:
    with reading(path, who=who):
        return Path(path).read_bytes()


def read_text(path: Path, *, who: str = "") -> str:
    """A UTF-8 text file."""
    with reading(path, who=who):
        return Path(path).read_text(encoding="utf-8")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list"}
_TYPE_NAMES |= {dict: "a mapping", bool: "true or false"}


def read_json(path: Path, keys: dict[str, type | tuple[type, ...]] = {}, *, who: str = "") -> dict:  # noqa: B006 - never mutated
    """A JSON object holding at least `keys`, each of its type (an int is not a bool)."""
    text = read_text(path, who=who)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        what = (
            "is empty"
            if not text.strip()
            else f"is not valid JSON ({exc.msg} at line {exc.lineno})"
        )
        raise damaged(path, what, who=who) from None
    if not isinstance(data, dict):
        raise damaged(path, f"holds a JSON {type(data).__name__}, not an object", who=who)
    for key, kind in keys.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        value = data.get(key)
        wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if key not in data or wrong:
            name = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            got = "nothing" if key not in data else repr(value)[:40]
            raise damaged(path, f"{key!r} must be {name}, got {got}", who=who)
    return data


def read_array(path: Path, *, kind: str, ndim: int, mmap: bool = False, who: str = ""):
    """A `.npy` array of `ndim` dimensions whose dtype is of `kind` ('u': unsigned, 'i':
    signed integers); memory-mapped with `mmap` (pages are read on use)."""
    import numpy as np

    with reading(path, who=who):
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise damaged(path, "is not a NumPy .npy file (no .npy header)", who=who)
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, EOFError) as exc:
            raise damaged(path, f"is cut short or garbled ({_first(exc)})", who=who) from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise damaged(path, "is not a NumPy array file", who=who)
    if array.dtype.kind != kind or array.ndim != ndim:
        want = {"u": "unsigned integers", "i": "integers"}.get(kind, kind)
        raise damaged(
            path,
            f"holds {array.dtype} of shape {array.shape}, expected {ndim}-D {want}",
            who=who,
        )
    return array


def read_csv(path: Path, *, columns: tuple[str, ...] = (), who: str = "") -> list[dict[str, float]]:
    """A CSV table of numbers with a header holding `columns`; every row as long as the header."""
    text = read_text(path, who=who)
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise damaged(path, "is empty", who=who)
    header, body = rows[0], rows[1:]
    lacking = [c for c in columns if c not in header]
    if lacking:
        raise damaged(path, f"has no column {lacking[0]!r} (a cut or garbled header)", who=who)
    table = []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise damaged(
                path, f"line {line} has {len(row)} fields, the header {len(header)}", who=who
            )
        try:
            table.append({k: float(v) for k, v in zip(header, row, strict=True)})
        except ValueError:
            raise damaged(
                path, f"line {line} holds something that is not a number", who=who
            ) from None
    return table


def read_keras_model(path: Path, *, who: str = ""):
    """A `.keras` file in Keras's safe mode (no code from the file runs); the caller has
    registered the custom layers it may hold. A file that carries Python code (a Lambda
    layer) is refused before any of it runs."""
    import zipfile

    import keras

    path = Path(path)
    with reading(path, who=who):
        with open(path, "rb") as f:  # the OSError of a missing or unreadable file
            whole = zipfile.is_zipfile(f)
        if not whole:
            raise damaged(path, "is not a .keras file (not a whole zip archive)", who=who)
        try:
            return keras.saving.load_model(path, compile=False, safe_mode=True)
        except OSError:
            raise
        except Exception as exc:  # zip, h5py and Keras's config errors: the file is not whole
            if "safe_mode" in str(exc):
                raise DataError(
                    f"{who + ': ' if who else ''}{_shown(path)}: refused: it holds Python code "
                    "(a Lambda layer), which Keras safe mode does not load; use a model this "
                    "project built"
                ) from None
            raise damaged(path, f"is not a readable Keras model ({_first(exc)})", who=who) from None


def _first(exc: BaseException) -> str:
    """The first sentence of an exception's message, for a one-line error."""
    return _first_sentence(str(exc)) or type(exc).__name__


def _first_sentence(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].split(". ")[0][:120] if lines else ""


# Run in an interpreter of its own: in long-lived processes that had Keras save and load
# weights (a resumed training, a test worker) h5py segfaulted at File.close, taking the
# process with it; in a process of its own it never did.
_READ_HDF5 = """
import sys, h5py
def read(name, item):
    if isinstance(item, h5py.Dataset):
        item[()]
try:
    with h5py.File(sys.argv[1], "r") as f:
        f.visititems(read)
except OSError as exc:
    print(exc or type(exc).__name__)
    sys.exit(3)
"""


def check_hdf5(path: Path, *, who: str = "") -> None:
    """Every dataset of the HDF5 file `path` (Keras weights) reads back whole."""
    import subprocess
    import sys

    with reading(path, who=who):
        open(path, "rb").close()  # noqa: SIM115 - the OSError of a missing or unreadable file
    done = subprocess.run(
        [sys.executable, "-c", _READ_HDF5, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 3:
        reason = _first_sentence(done.stdout)
        raise damaged(path, f"is not a whole HDF5 weights file ({reason})", who=who)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:120]
        raise damaged(path, f"could not be read back as HDF5 ({last})", who=who)


def check_card_fits_model(card: dict, card_path: Path, model, model_path: Path | str) -> None:
    """The data card and the model must be of one training: same classes and input shape."""
    outputs = int(model.output_shape[-1])
    if outputs != card["num_classes"]:
        raise DataError(
            f"{_shown(card_path)} has {card['num_classes']} classes but {_shown(model_path)} "
            f"outputs {outputs}: the model was trained on other data; rebuild it with "
            "`dvc repro -f train` (or `dvc checkout` to restore the committed pair)"
        )
    expected = [d for d in model.input_shape[1:]]
    if all(d is not None for d in expected) and list(card["image_shape"]) != expected:
        raise DataError(
            f"{_shown(card_path)} has images of shape {card['image_shape']} but "
            f"{_shown(model_path)} takes {expected}: the model was trained on other data; "
            "rebuild it with `dvc repro -f train` (or `dvc checkout` to restore the committed pair)"
        )
