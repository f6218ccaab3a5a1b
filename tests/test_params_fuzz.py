"""Params fuzzer: seeded mutations of the shipped params.yaml, each run through `check`
and the stages that read it, in-process (`pipeline.__main__.main`).

The mutations come from the shipped file and from the config dataclasses' fields and
bounds (a new param is fuzzed without editing this file): types swapped, values at and
past every range edge, NaN/inf, huge integers, YAML 1.2 spellings, duplicated keys and
sections, deleted, empty and misspelled sections, unknown and non-name keys, other
encodings, truncated and empty files. For every one, either

- `check` accepts it, DVC's own YAML reader (ruamel.yaml) reads the same values, and the
  stage runs: a real `train` bounded to one optimizer step for model/train/augment/
  mlflow/task mutations (identical configs trained once), a real `fetch` or `prepare` on
  a tiny dataset for theirs; a stage may still refuse for the data (a batch larger than
  the training split) with one `error:` line and nothing written; or
- `check` and every stage that reads the mutated section refuse it with exactly one
  `error:` line, exit 2, no traceback, the same line where the section itself does not
  parse, and every project file byte-identical (no mlflow.db, no data/checkpoints).

The one bound on training: a Keras callback passed to `fit_model`'s `extra_callbacks`
stops `fit` after its first batch (`model.stop_training`, which Keras checks after
every step); everything else (MLflow run, logged model, saved files) is the real stage.

Set PARAMS_FUZZ_LOG=FILE to append one JSON line per mutation (its outcome) to FILE.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import shutil
import typing
from pathlib import Path
from typing import Literal

import pytest
from conftest import PARAMS, class_files, make_tar

from pipeline import config
from pipeline.__main__ import main
from pipeline.errors import ConfigError
from pipeline.versions import drift_warning

SHIPPED = PARAMS.read_text(encoding="utf-8")
SEED = 18  # issue 18; the few random choices below draw from it
# Which stages read each section (dvc.yaml's params); register's gate is read by promote.
READERS = {
    "fetch": ["fetch"],
    "prepare": ["prepare"],
    "model": ["train"],
    "train": ["train"],
    "augment": ["train"],
    "mlflow": ["train"],
    "task": ["train"],
    "evaluate": ["evaluate"],
    "register": ["register", "promote"],
    "*": ["fetch", "prepare", "train", "evaluate", "register", "promote"],
}


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    section: str  # the section it changes, "*" for the whole file
    data: bytes
    # (section, key, YAML literal) of a one-value change: accepted ones are combined
    edit: tuple[str, str, str] | None = None


# --------------------------------------------------------------------------- text edits


def _section_span(text: str, section: str) -> tuple[int, int]:
    """Start and end (offsets) of `section:` and its indented lines."""
    found = re.search(rf"^{re.escape(section)}:.*\n(?:(?:[ \t].*|\s*)\n)*", text, re.M)
    assert found, section
    return found.start(), found.end()


def set_value(text: str, section: str, key: str | None, literal: str) -> str:
    """`section.key: literal` (or `section: literal` when key is None); added if absent."""
    if key is None:
        return re.sub(rf"^{section}:.*$", f"{section}: {literal}", text, count=1, flags=re.M)
    start, end = _section_span(text, section)
    body = text[start:end]
    line = re.compile(rf"^  {re.escape(key)}:.*$", re.M)
    if line.search(body):
        body = line.sub(lambda _: f"  {key}: {literal}", body, count=1)
    else:
        body = body.rstrip("\n") + f"\n  {key}: {literal}\n"
    return text[:start] + body + text[end:]


def add_line_after(text: str, section: str, key: str, line: str) -> str:
    start, end = _section_span(text, section)
    body = text[start:end]
    found = re.search(rf"^  {re.escape(key)}:.*\n", body, re.M)
    at = start + (found.end() if found else end - start)
    return text[:at] + line + "\n" + text[at:]


def delete_section(text: str, section: str) -> str:
    if section == "task":
        return re.sub(r"^task:.*\n", "", text, flags=re.M)
    start, end = _section_span(text, section)
    return text[:start] + text[end:]


def literal(value) -> str:
    """`value` as a YAML flow scalar (JSON, which YAML 1.2 reads, but for NaN/inf)."""
    if isinstance(value, float) and value != value:
        return ".nan"
    if value in (float("inf"), float("-inf")) and isinstance(value, float):
        return ".inf" if value > 0 else "-.inf"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


# --------------------------------------------------------------------------- mutations


def field_values(hint, bounds: dict, default) -> list[tuple[str, str]]:
    """(label, YAML literal) for one field: its type swapped, its range edges, odd numbers."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        out = [(f"={a}", literal(a)) for a in allowed if a != default]
        out += [("bogus", '"bogus"'), ("null", "null"), ("list", literal(list(allowed[:1])))]
        if isinstance(allowed[0], str):
            out += [("upper", literal(allowed[0].upper())), ("int", "1")]
        else:
            out += [("float", literal(float(allowed[0]))), ("text", '"one"')]
        return out
    if origin is tuple:
        item = typing.get_args(hint)[0]
        out = [("empty", "[]"), ("nested", "[[1]]"), ("scalar", "7"), ("text", '"6, 12"')]
        out += [("float", "[1.5]"), ("nan", "[.nan]")]
        out += [(f"[{label}]", f"[{lit}]") for label, lit in number_values(item, bounds, 1)]
        return out
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        choices = [a for a in typing.get_args(hint) if a is not type(None)]
        out = []
        for choice in choices:
            if typing.get_origin(choice) is tuple:
                item = typing.get_args(choice)[0]
                edges = number_values(item, bounds, default if isinstance(default, int) else 1)
                out += [(f"[{label},{label}]", f"[{lit}, {lit}]") for label, lit in edges]
                out += [("empty", "[]"), ("three", "[16, 16, 16]")]
            else:
                out += field_values(choice, bounds, default)
        return out
    if hint is bool:
        return [("yes", "yes"), ("on", "on"), ("int", "1"), ("quoted", '"true"'), ("null", "null")]
    if hint in (int, float):
        return number_values(hint, bounds, default) + [
            ("text", '"ten"'),
            ("bool", "true"),
            ("null", "null"),
            ("list", "[1]"),
            ("map", "{a: 1}"),
        ]
    if hint is str:
        return [
            ("int", "1"),
            ("float", "1.5"),
            ("bool", "true"),
            ("null", "null"),
            ("list", '["a"]'),
            ("empty", '""'),
            ("nul", r'"a\0b"'),
            ("tab", r'"a\tb"'),
            ("newline", r'"a\nb"'),
            ("long", literal("x" * 600)),
            ("unicode", literal("café")),
            ("date", "2026-12-02"),
            ("slash", '"a/b"'),
        ]
    raise AssertionError(f"no mutations for {hint!r}: teach field_values this type")


def number_values(hint, bounds: dict, default) -> list[tuple[str, str]]:
    """Each bound at and past its edge, plus NaN/inf, huge and YAML 1.2 spellings."""
    out = []
    for kind, bound in bounds.items():
        step = 1 if hint is int else 1e-3 * max(1.0, abs(bound))
        edge = int(bound) if hint is int else float(bound)
        inside = {"ge": 0, "le": 0, "gt": step, "lt": -step}[kind]
        outside = {"ge": -step, "le": step, "gt": 0, "lt": 0}[kind]
        for label, value in ((f"{kind}-edge", edge + inside), (f"{kind}-past", edge + outside)):
            out.append((label, literal(int(value) if hint is int else float(value))))
    out += [("huge", "1" + "0" * 400), ("2**64", str(2**64)), ("-2**63", str(-(2**63)))]
    if hint is int:
        out += [("float", "1.5"), ("exp", "1e3"), ("hex", hex(abs(default)))]
        out += [("2**32", str(2**32)), ("2**63", str(2**63))]
    else:
        out += [("nan", ".nan"), ("inf", ".inf"), ("-inf", "-.inf"), ("1e400", "1e400")]
        out += [("exp", f"{default:e}"), ("int", str(int(default)))]
    return out


def field_mutations(text: str) -> list[Mutation]:
    """Every field of every section: each of its values, and the key duplicated."""
    out = []
    for section, cls in config.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            bounds = f.metadata.get("bounds", {})
            for label, lit in field_values(hints[f.name], bounds, f.default):
                edited = set_value(text, section, f.name, lit)
                name = f"{section}.{f.name}:{label}"
                out.append(Mutation(name, section, edited.encode(), (section, f.name, lit)))
            again = add_line_after(text, section, f.name, f"  {f.name}: {literal(f.default)}")
            out.append(Mutation(f"{section}.{f.name}:duplicate", section, again.encode()))
    for lit in ('"segmentation"', '"detection"', "null", "1", '["classification"]', "yes"):
        out.append(Mutation(f"task:{lit}", "task", set_value(text, "task", None, lit).encode()))
    return out


def structure_mutations(text: str, rng: random.Random) -> list[Mutation]:
    """Sections deleted, emptied, duplicated, misspelled; odd keys; encodings; cut files."""
    out = []
    for section in ["task", *config.SECTIONS]:
        out.append(Mutation(f"{section}:deleted", section, delete_section(text, section).encode()))
        if section == "task":
            continue
        first = dataclasses.fields(config.SECTIONS[section])[0].name
        start, end = _section_span(text, section)
        for label, body in (("null", f"{section}:\n"), ("empty", f"{section}: {{}}\n")):
            out.append(
                Mutation(f"{section}:{label}", section, (text[:start] + body + text[end:]).encode())
            )
        for label, body in (("list", f"{section}: [1]\n"), ("scalar", f"{section}: 3\n")):
            out.append(
                Mutation(f"{section}:{label}", section, (text[:start] + body + text[end:]).encode())
            )
        default = literal(getattr(config.SECTIONS[section](), first))
        again = f"{text}\n{section}:\n  {first}: {default}\n"
        out.append(Mutation(f"{section}:duplicate-section", "*", again.encode()))
        i = rng.randrange(len(section) - 1)
        typo = section[:i] + section[i + 1] + section[i] + section[i + 2 :]
        out.append(
            Mutation(
                f"{section}:misspelled",
                "*",
                (text[:start] + typo + text[start + len(section) :]).encode(),
            )
        )
        out.append(
            Mutation(
                f"{section}:unknown-key",
                section,
                set_value(text, section, first + "x", "1").encode(),
            )
        )
        for label, key in (
            ("int-key", "1"),
            ("bool-key", "true"),
            ("null-key", "null"),
            ("float-key", "0.5"),
        ):
            line = f"  {key}: 1"
            out.append(
                Mutation(
                    f"{section}:{label}",
                    section,
                    add_line_after(text, section, first, line).encode(),
                )
            )
        quoted = add_line_after(text, section, first, f'  "{first}": 1')
        out.append(Mutation(f"{section}:quoted-duplicate", section, quoted.encode()))
    whole = {
        "empty-file": b"",
        "whitespace-only": b"  \n\n",
        "comments-only": b"# params\n# nothing else\n",
        "top-level-list": b"- train\n- model\n",
        "top-level-scalar": b"params\n",
        "two-documents": (text + "---\n" + text).encode(),
        "unknown-section": (text + "\nextras:\n  a: 1\n").encode(),
        "null-top-key": (text + "\nnull: 1\n").encode(),
        "int-top-key": (text + "\n1: 1\n").encode(),
        "complex-key": (text + "\n? [a, b]\n: 1\n").encode(),
        "recursive-alias": (text + "\nextras: &a [*a]\n").encode(),
        "tab-indent": text.replace("\n  epochs:", "\n\tepochs:").encode(),
        "unclosed-bracket": text.replace("[15, 25]", "[15, 25").encode(),
        "utf8-bom": b"\xef\xbb\xbf" + text.encode(),
        "crlf": text.replace("\n", "\r\n").encode(),
        "utf16": text.encode("utf-16"),
        "utf16-be": b"\xfe\xff" + text.encode("utf-16-be"),
        "utf16-no-bom": text.encode("utf-16-le"),
        "utf32": text.encode("utf-32"),
        "latin1": text.replace("digits-cnn", "digits-café").encode("latin-1"),
        "cp1252-quotes": text.replace('grid: ""', "grid: \u201cgrid\u201d").encode("cp1252"),
        "nul-byte": text.encode() + b"\x00",
        "bell-character": text.replace('grid: ""', 'grid: "a\x07b"').encode(),
        "del-character": text.replace('grid: ""', 'grid: "a\x7fb"').encode(),
    }
    out += [Mutation(name, "*", data) for name, data in whole.items()]
    for share in (0.1, 0.25, 0.5, 0.75, 0.9):
        cut = int(len(text) * share)
        out.append(Mutation(f"cut-at-{share}", "*", text[:cut].encode()))
        line_end = text.index("\n", cut) + 1
        out.append(Mutation(f"cut-at-{share}-line", "*", text[:line_end].encode()))
    return out


def all_mutations() -> list[Mutation]:
    rng = random.Random(SEED)
    found = field_mutations(SHIPPED) + structure_mutations(SHIPPED, rng)
    names = [m.name for m in found]
    assert len(names) == len(set(names)), "mutation names must be unique"
    return found


MUTATIONS = all_mutations()


# --------------------------------------------------------------------------- the contract


def digest(project: Path) -> dict[str, str]:
    """Every file and folder of the project, with its content's hash."""
    state = {}
    for path in sorted(project.rglob("*")):
        rel = path.relative_to(project).as_posix()
        state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def run_main(args: list[str], capsys) -> tuple[int, list[str]]:
    """`python -m pipeline ARGS` in-process: the exit code and its `error:` lines. An
    exception escaping main fails the test: that is a traceback the user would see."""
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, [line for line in captured.err.splitlines() if line.startswith("error:")]


def stage_command(stage: str) -> list[str]:
    return ["promote", "--version", "1"] if stage == "promote" else [stage]


# The sections each stage loads (`pipeline.__main__`'s cmd_<stage>).
STAGE_SECTIONS = {
    "fetch": ["fetch"],
    "prepare": ["prepare"],
    "train": ["model", "train", "mlflow", "augment", "task"],
    "evaluate": ["evaluate"],
    "register": ["register", "task"],
    "promote": ["register", "task"],
}


def own_error(mutation: Mutation, path: Path, sections: list[str] | None = None) -> str | None:
    """The error of reading just `sections` (default: the mutated one; every one for a
    whole-file mutation) as a stage does; None: they parse on their own."""
    if sections is None:
        sections = [*config.SECTIONS, "task"] if mutation.section == "*" else [mutation.section]
    try:
        params = config.read_params(path)
        for section in sections:
            if section == "task":
                config.load_task(path, params)
            else:
                config.load(section, path, params)
    except ConfigError as exc:
        return f"error: {exc}"
    return None


def dvc_reads(path: Path):
    """params.yaml as DVC reads it (dvc.utils.serialize.parse_yaml: ruamel, YAML 1.2)."""
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def one_step():
    """A Keras callback that stops `fit` after its first optimizer step."""
    import keras

    class OneStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.stop_training = True

    return OneStep()


@pytest.fixture(autouse=True)
def drift_checked_once(monkeypatch):
    """Each stage command compares the venv with requirements.lock (0.7 s, the same answer
    all session): once here, not 1,500 times."""
    import pipeline.__main__ as cli

    monkeypatch.setattr(cli, "drift_warning", DRIFT)


DRIFT = functools.cache(drift_warning)


@pytest.fixture(scope="module")
def projects(tmp_path_factory, digits_prepared):
    """Project folders: `refuse` (prepared digits, where nothing may change), `train`
    (prepared digits, its own MLflow store), `data` (a tiny raw folder for prepare: 2
    classes of 8 PNGs) and `fetch` (empty)."""
    base = tmp_path_factory.mktemp("fuzz")
    for name in ("refuse", "train"):
        shutil.copytree(digits_prepared, base / name / "data" / "prepared")
        (base / name / "params.yaml").write_text(SHIPPED)
    data = base / "data"
    (data / "data").mkdir(parents=True)
    archive = make_tar(data / "tiny.tar.gz", class_files(classes=("cat", "dog"), per_class=8))
    from pipeline.config import FetchConfig
    from pipeline.stages import fetch

    fetch.run(FetchConfig(source="archive", url=str(archive)), data / "data" / "raw")
    (base / "fetch").mkdir()
    return {name: base / name for name in ("refuse", "train", "data", "fetch")}


# fetch and prepare configs a stage ran with, and its result: each distinct one runs once
RAN: dict[object, tuple[int, list[str]]] = {}


@pytest.fixture
def one_step_train(monkeypatch):
    """train.run's fit bounded to one optimizer step; the precision policy reset after."""
    import keras

    from pipeline.stages import train

    real = train.fit_model
    monkeypatch.setattr(train, "fit_model", functools.partial(real, extra_callbacks=(one_step(),)))
    yield
    keras.mixed_precision.set_global_policy("float32")


def record(mutation: Mutation, outcome: str) -> None:
    log = os.environ.get("PARAMS_FUZZ_LOG")
    if log:
        with open(log, "a") as out:
            out.write(json.dumps({"mutation": mutation.name, "outcome": outcome}) + "\n")


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_mutated_params(mutation, projects, capsys, monkeypatch):
    """`check` accepts the file (and DVC reads the same values) or refuses it in one line,
    exit 2, as does every stage reading the mutated section, with nothing written."""
    refuse = projects["refuse"]
    params = refuse / "params.yaml"
    params.write_bytes(mutation.data)
    monkeypatch.chdir(refuse)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{refuse / 'mlflow.db'}")
    before = digest(refuse)
    code, errors = run_main(["--params", str(params), "check"], capsys)
    try:
        dvc = dvc_reads(params)
    except Exception:  # DVC's reader refuses the file (duplicates, not UTF-8, not YAML)
        dvc = ConfigError
    if code == 0:
        assert errors == []
        assert dvc is not ConfigError, "check accepted a file DVC refuses"
        assert dvc == config.read_params(params), "check read other values than DVC"
        record(mutation, accepted(mutation, projects, capsys, monkeypatch))
        return
    assert code == 2 and len(errors) == 1, errors
    expected = own_error(mutation, params)
    assert errors == [expected] or expected is None
    for stage in READERS[mutation.section]:
        stage_expected = own_error(mutation, params, STAGE_SECTIONS[stage])
        if mutation.section == "*" and stage_expected is None:
            continue  # e.g. a cut file that still holds this stage's sections: it runs
        stage_code, stage_errors = run_main(
            ["--params", str(params), *stage_command(stage)], capsys
        )
        assert stage_code == 2 and len(stage_errors) == 1, (stage, stage_errors)
        if stage_expected is not None:
            assert stage_errors == [stage_expected], stage
        assert digest(refuse) == before, f"{stage} changed the project"
    record(mutation, "refused")


def accepted(mutation: Mutation, projects, capsys, monkeypatch) -> str:
    """Run the stage an accepted fetch or prepare mutation is for (each distinct config
    once); train's are run by test_accepted_configs_train, combined."""
    stages = READERS[mutation.section]
    if stages not in (["fetch"], ["prepare"]):
        return "accepted"  # evaluate, register: check's word (their stages need a model)
    (stage,) = stages
    project = projects["data" if stage == "prepare" else "fetch"]
    path = project / "params.yaml"
    path.write_bytes(mutation.data)
    key = config.load(stage, path)
    if key in RAN:
        return "accepted, ran before"
    monkeypatch.chdir(project)
    before = digest(project)
    RAN[key] = result = run_main(["--params", str(path), stage], capsys)
    return stage_outcome(result, before, project)


def stage_outcome(result: tuple[int, list[str]], before: dict, project: Path) -> str:
    code, errors = result
    if code == 0:
        assert errors == []
        return "accepted, ran"
    # refused for the data (e.g. train.batch_size past the training split): one line,
    # nothing written
    assert code == 2 and len(errors) == 1, errors
    assert digest(project) == before, "a stage that refused changed the project"
    return "accepted, refused for the data: " + errors[0]


def test_fuzzer_mutates_every_param():
    """At least 300 mutated files, and every field of every section among them."""
    assert len(MUTATIONS) >= 300
    mutated = {m.name.split(":")[0] for m in MUTATIONS}
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}" in mutated
    print(f"params fuzzer: {len(MUTATIONS)} mutated params files")


# --------------------------------------------------------------------------- training

TRAIN_SECTIONS = ("model", "train", "augment", "mlflow", "task")


def train_key(path: Path) -> tuple:
    """What train runs with: two files with the same key train the same."""
    params = config.read_params(path)
    return (
        *(config.load(s, path, params) for s in ("model", "train", "augment", "mlflow")),
        config.load_task(path, params),
    )


def checks(text: str, path: Path) -> bool:
    from pipeline.tools import check

    path.write_text(text, encoding="utf-8")
    try:
        check.run(path)
    except ConfigError:
        return False
    return True


def build(members: list[Mutation]) -> str:
    """The shipped file with every member's edit (or the one whole-file mutation)."""
    if members[0].edit is None:
        return members[0].data.decode("utf-8-sig")
    text = SHIPPED
    for mutation in members:
        text = set_value(text, *mutation.edit)
    return text


def combine(accepted: list[Mutation], path: Path) -> list[list[Mutation]]:
    """Accepted one-value mutations packed into as few files as `check` accepts, each
    changing a key at most once; files that train what one before did are dropped."""
    combos: list[list[Mutation]] = []
    for mutation in accepted:
        for members in combos:
            if mutation.edit is None or members[0].edit is None:
                continue
            if any(m.edit[:2] == mutation.edit[:2] for m in members):
                continue
            if checks(build([*members, mutation]), path):
                members.append(mutation)
                break
        else:
            combos.append([mutation])
    seen, distinct = set(), []
    for members in combos:
        path.write_text(build(members), encoding="utf-8")
        key = train_key(path)
        if key not in seen:
            seen.add(key)
            distinct.append(members)
    return distinct


@pytest.mark.slow
def test_accepted_configs_train(projects, capsys, monkeypatch, one_step_train):
    """Every model/train/augment/mlflow/task mutation `check` accepts trains: a real
    `train`, one optimizer step, with the accepted values packed into a few files."""
    project = projects["train"]
    path = project / "params.yaml"
    path.write_text(SHIPPED)
    shipped_key = train_key(path)
    accepted = []
    for mutation in MUTATIONS:
        if mutation.section not in (*TRAIN_SECTIONS, "*"):
            continue
        try:
            text = mutation.data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not checks(text, path):
            continue
        if mutation.edit is None and train_key(path) == shipped_key:
            continue  # e.g. a CRLF or BOM file: the shipped config again
        accepted.append(mutation)
    random.Random(SEED).shuffle(accepted)
    combos = combine(accepted, project / "combine.yaml")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    results = [r for members in combos for r in train_combo(members, path, capsys)]
    trained = sum(outcome == "ran" for _, outcome in results)
    print(
        f"params fuzzer: {len(accepted)} accepted train-section mutations, "
        f"{len(results)} files: {trained} trained one step, "
        f"{len(results) - trained} refused for the data"
    )
    for members, outcome in results:
        for mutation in members:
            record(mutation, f"accepted, train {outcome} (combined)")
    assert trained >= 1


def train_combo(members: list[Mutation], path: Path, capsys) -> list[tuple[list, str]]:
    """Train the combined file; when the data refuses it (before any run starts), take out
    the members whose keys the error names, train the rest, and each of those alone."""
    outcome, error = train_once(members, path, capsys)
    if outcome == "ran" or len(members) == 1:
        return [(members, outcome)]
    named = [m for m in members if m.edit and f"{m.edit[0]}.{m.edit[1]}" in error]
    if not named or len(named) == len(members):  # no key named: halve
        half = len(members) // 2
        named, members = members[:half], members[half:]
        return train_combo(named, path, capsys) + train_combo(members, path, capsys)
    rest = [m for m in members if m not in named]
    return train_combo(rest, path, capsys) + [
        result for m in named for result in train_combo([m], path, capsys)
    ]


def train_once(members: list[Mutation], path: Path, capsys) -> tuple[str, str]:
    """("ran", "") or ("refused for the data", its error line: one line, exit 2, nothing
    written); anything else (a traceback, another exit code, several lines) fails the
    test, naming the mutations."""
    names = [m.name for m in members]
    path.write_text(build(members), encoding="utf-8")
    before = digest(path.parent)
    try:
        code, errors = run_main(["--params", str(path), "train"], capsys)
    except Exception as exc:
        raise AssertionError(f"train raised on {names}") from exc
    if code == 0 and not errors:
        return "ran", ""
    assert code == 2 and len(errors) == 1, (names, code, errors)
    assert digest(path.parent) == before, f"train refused {names} but changed the project"
    return "refused for the data", errors[0]
