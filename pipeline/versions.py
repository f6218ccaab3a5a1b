"""Installed library versions against `pipeline/requirements.lock`.

Every stage in dvc.yaml depends on the lock file, so DVC reruns a stage when the
versions recorded there change. It cannot see a package upgraded by hand in the
venv: each stage says so in one warning line, and `make lock` records what is
installed.
"""

from __future__ import annotations

import re
from pathlib import Path

LOCK = Path(__file__).with_name("requirements.lock")
SHOWN = 3  # differing packages named in the warning line


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: Path = LOCK) -> dict[str, str]:
    """{package: version} pinned in `lock` (`name==version` lines; comments skipped)."""
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_normal(name)] = version.strip()
    return pins


def drift(lock: Path = LOCK) -> list[tuple[str, str, str]]:
    """(package, installed, locked) for every locked package installed at another version;
    packages not installed (an extra this venv lacks) are not drift."""
    from importlib.metadata import distributions

    if not lock.exists():
        return []
    installed = {_normal(d.metadata["Name"] or ""): d.version for d in distributions()}
    return sorted(
        (name, installed[name], version)
        for name, version in locked(lock).items()
        if name in installed and installed[name] != version
    )


def drift_warning(stage: str, lock: Path = LOCK) -> str | None:
    """The one warning line a stage prints when the venv is not what the lock records."""
    found = drift(lock)
    if not found:
        return None
    shown = ", ".join(f"{n} {have} (locked {want})" for n, have, want in found[:SHOWN])
    more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    return (
        f"warning: {stage}: installed versions differ from {lock.name}: {shown}{more}; "
        "DVC reruns stages only when the lock file changes (`make lock` records the venv)"
    )
