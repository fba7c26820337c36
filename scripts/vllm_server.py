"""Start and stop a real vLLM OpenAI-compatible server on this CPU, for tests and benchmarks.

    python scripts/vllm_server.py --model src/potstill/assets/demo-teacher --port 8000

prints the URL once the server answers and keeps it running until Ctrl-C. From Python
(``tests/server/conftest.py``, ``bench/served.py``)::

    server = start_server(model_dir, name="demo-teacher")   # waits until /health answers
    ...
    server.stop()                                          # by its process id (group)

The server runs from the venv that ``scripts/setup_vllm_cpu.sh`` makes (set up here on first
use; ``POTSTILL_VLLM_PYTHON`` names another interpreter that has vLLM). The flags are the
ones a CPU needs: bfloat16, a short context, ``--gpu-memory-utilization 0.1`` (on CPU the
share of RAM for the KV cache; vLLM's default 0.92 fails).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETUP = HERE / "setup_vllm_cpu.sh"


def vllm_python() -> str:
    """The interpreter with vLLM: ``POTSTILL_VLLM_PYTHON``, else the venv the setup script makes."""
    given = os.environ.get("POTSTILL_VLLM_PYTHON")
    if given:
        return given
    out = subprocess.run(["bash", str(SETUP)], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running vLLM server: its base URL, served model name, process and log file."""

    url: str
    name: str
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (vLLM starts an engine process), SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start_server(model: str | Path, *, name: str = "teacher", port: int | None = None, max_model_len: int = 512,
                 max_logprobs: int = 64, log_dir: str | Path | None = None, extra: list[str] = (),
                 timeout: float = 300.0) -> Server:
    """Start vLLM serving ``model`` as ``name``; return once ``/health`` answers (or raise with the log's tail)."""
    python = vllm_python()
    port = port or free_port()
    log_path = Path(log_dir or "/tmp") / f"vllm-{port}.log"
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", str(max_model_len),
           "--max-logprobs", str(max_logprobs), "--gpu-memory-utilization", "0.1", *extra]
    env = dict(os.environ, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", name, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {process.returncode} while starting:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"vLLM did not answer on {server.url} within {timeout:.0f} s:\n{server.log_tail()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", default="teacher")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-logprobs", type=int, default=64)
    args, extra = parser.parse_known_args()
    server = start_server(args.model, name=args.name, port=args.port, max_model_len=args.max_model_len,
                          max_logprobs=args.max_logprobs, extra=extra)
    print(f"{server.url} serves {server.name} (pid {server.pid}, log {server.log}); Ctrl-C stops it", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
