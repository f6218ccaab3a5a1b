"""The package's shape: no import cycle, rooms that import only downwards, and dvc.yaml
deps that cover every module a stage's command runs (so `dvc repro` never serves stale
results). Imports are read with ast, those inside functions included, and so are
strings naming a module (importlib, `python -m` subprocesses)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
STAGES = ("fetch", "prepare", "train", "evaluate", "register")


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _target(name: str) -> str | None:
    """The package module `name` (or its longest importable prefix) refers to."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


def imports_in(tree: ast.AST, module: str) -> set[str]:
    """Package modules that `tree` imports anywhere, or names in a string."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and node.value in modules():
            names = [node.value]
        found |= {t for n in names if n.startswith("pipeline") and (t := _target(n))}
    return found - {module}


@cache
def graph() -> dict[str, frozenset[str]]:
    return {
        name: frozenset(imports_in(ast.parse(path.read_text()), name))
        for name, path in modules().items()
    }


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph()[name]
    return seen


def runs_code(name: str) -> bool:
    """False for a package `__init__` that is only a docstring: it cannot change an output."""
    body = ast.parse(modules()[name].read_text()).body
    return not all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stage_modules(stage: str) -> set[str]:
    """What `python -m pipeline STAGE` runs: the CLI's module-level imports, those of its
    `cmd_STAGE`, and everything they import in turn; parent packages with code too."""
    tree = ast.parse(modules()["pipeline.__main__"].read_text())
    top = {n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)}
    command = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == f"cmd_{stage}"
    )
    start = {"pipeline"}
    for node in [*top, command]:
        start |= imports_in(node, "pipeline.__main__")
    found = closure(start) | {"pipeline.__main__"}
    for name in list(found):
        parts = name.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return {name for name in found if runs_code(name)}


def find_cycle() -> list[str] | None:
    """One import cycle of the package, as the modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph()[name]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(modules()):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_a_stage_or_a_tool():
    """Stages and tools are commands over the library; only the CLI calls them (a tool's
    own modules may import each other, e.g. the benchmark harness and its worker)."""
    for name, deps in graph().items():
        for dep in deps:
            room = dep.split(".")[:3]
            if room[:2] in (["pipeline", "stages"], ["pipeline", "tools"]) and len(room) == 3:
                own = name.split(".")[:3] == room
                assert name == "pipeline.__main__" or own, f"{name} imports {dep}"


def test_the_served_model_ships_exactly_what_it_imports():
    """The logged model carries SERVED_FILES: the served model's whole import closure (and
    the packages around it), nothing of the trainer."""
    from pipeline.serving.image_model import SERVED_FILES

    needed = closure({"pipeline.serving.served_model"})
    for name in list(needed):
        parts = name.split(".")
        needed |= {".".join(parts[:i]) for i in range(1, len(parts))}
    files = {modules()[m].relative_to(PACKAGE).as_posix() for m in needed}
    assert files == set(SERVED_FILES)
    assert not {m for m in needed if m.startswith(("pipeline.training", "pipeline.tracking"))}


def test_only_tracking_and_serving_import_mlflow():
    for name, path in modules().items():
        if name.startswith(("pipeline.tracking", "pipeline.serving")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert "mlflow" not in roots, f"{name} imports mlflow"


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_every_module_the_stage_runs(stage):
    deps = [
        d if isinstance(d, str) else next(iter(d))
        for d in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    ]
    needed = {modules()[m].relative_to(ROOT).as_posix() for m in stage_modules(stage)}
    missing = sorted(p for p in needed if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} lacks deps {missing}"
    code_deps = [d for d in deps if d.startswith("pipeline") and not d.endswith(".lock")]
    for dep in code_deps:  # a dep no module of the stage lies under reruns it for nothing
        assert (ROOT / dep).exists(), f"dvc.yaml stage {stage}: {dep} does not exist"
        assert any(covered(p, [dep]) for p in needed), f"stage {stage} does not run {dep}"


def test_importing_the_package_and_its_cli_loads_no_framework():
    """`import pipeline` (and the CLI, config, fetch and prepare) start no TensorFlow, JAX,
    Keras, MLflow or DVC: a GPU machine with JAX only, and `check`, stay light."""
    import subprocess
    import sys

    code = (
        "import sys, pipeline, pipeline.__main__, pipeline.config, pipeline.stages.fetch, "
        "pipeline.stages.prepare; heavy = {'tensorflow', 'keras', 'jax', 'mlflow', 'dvc'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
