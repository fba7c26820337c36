"""The README stays true: its config reference matches the code, its test command is CI's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "tools" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # Both markers, once each: without them the table is not regenerated and the comparison proves nothing.
    assert readme.count(module.START) == 1 and readme.count(module.END) == 1, "the config reference lost a marker"
    assert module.rendered(readme) == readme, "run: python tools/update_readme.py"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = 'python -m pytest -q -m "not gpu"'
    assert command in readme
    assert command.replace("python ", "python3 ") in ci
