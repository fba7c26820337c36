"""The example configs in examples/ are valid configs (every key known, every value in range)."""

from __future__ import annotations

from pathlib import Path

import pytest

from potstill.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_validates(path):
    cfg = load_config(path)
    assert cfg.teacher.name_or_path and cfg.output.dir
