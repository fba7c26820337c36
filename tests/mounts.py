"""Real small and read-only file systems for the full-disk and read-only tests (tmpfs mounts).

Mounting needs root or a user namespace: where neither is possible the tests that use these
skip with that reason (CI runs as root, like the development machine)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False):
    """A fresh tmpfs of ``size`` (e.g. "4m", "64k") at ``path`` for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    proc = _mount("-t", "tmpfs", "-o", options, "tmpfs", str(path))
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, kib: int, *, read_only: bool = False):
    """A real, separate file system of ``kib`` KiB at ``path``, so that "no space left" and
    "read-only file system" come from the kernel. Yields ``resize(kib)``, which frees space."""
    with tmpfs(path, f"{kib}k", read_only=read_only):
        yield lambda new_kib: remount(path, f"size={new_kib}k")


@contextlib.contextmanager
def read_only_folder(path: Path):
    """An empty folder nothing can be written in: a read-only file system as root (who ignores
    permissions), else a folder without write permission."""
    if os.geteuid() == 0:
        with small_disk(path, 64, read_only=True):
            yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def remount(path: Path, options: str) -> None:
    """Change a mounted tmpfs's options, e.g. "ro", "rw" or "size=8m"."""
    proc = _mount("-o", f"remount,{options}", str(path))
    assert proc.returncode == 0, proc.stderr


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Write a filler file so that only about ``leave`` bytes stay free on ``path``'s file system."""
    filler = path / "filler.bin"
    size = max(free_bytes(path) - leave, 0)
    with open(filler, "wb") as fh:
        fh.write(b"\0" * size)
    return filler
