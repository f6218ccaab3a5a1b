"""The lock file matches this venv, and a package upgraded by hand is named in one line."""

from __future__ import annotations

from pipeline import versions


def test_the_venv_is_what_the_lock_records():
    """`make test` installs with the lock as constraints: nothing may differ."""
    assert versions.drift() == []
    assert versions.drift_warning("train") is None
    assert {"keras", "tensorflow", "mlflow", "dvc"} <= set(versions.locked())


def test_a_version_other_than_the_lock_is_named(tmp_path):
    lock = tmp_path / "requirements.lock"
    pins = versions.locked()
    pins["keras"] = "0.0.1"
    pins["not-installed-here"] = "1.0"
    lock.write_text("# header\n" + "".join(f"{n}=={v}\n" for n, v in pins.items()))
    assert [name for name, _, _ in versions.drift(lock)] == ["keras"]
    line = versions.drift_warning("train", lock)
    assert line.startswith("warning: train: ") and "keras" in line and "(locked 0.0.1)" in line
    assert "\n" not in line
