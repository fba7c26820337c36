"""Real small and read-only file systems for the full-disk and read-only tests (tmpfs mounts).

Mounting needs root or a user namespace: where neither is possible the tests that use these
skip with that reason (CI runs as root, like the development machine)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A fresh tmpfs of ``size`` (e.g. "4m") at ``path`` for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    proc = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    """Change a mounted tmpfs's options, e.g. "ro", "rw" or "size=8m"."""
    proc = _mount("-o", f"remount,{options}", str(path))
    assert proc.returncode == 0, proc.stderr


def free_bytes(path: Path) -> int:
    import os

    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Write a filler file so that only about ``leave`` bytes stay free on ``path``'s file system."""
    filler = path / "filler.bin"
    size = max(free_bytes(path) - leave, 0)
    with open(filler, "wb") as fh:
        fh.write(b"\0" * size)
    return filler
