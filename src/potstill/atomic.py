"""Atomic writes: a file or folder is either complete under its final name, or absent.

Write to a temporary name in the same directory, fsync, rename, fsync the directory.
Used by checkpoints, run logs, the tokenized-data cache and the quickstart's outputs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename inside it). A no-op where directories
    cannot be opened (e.g. Windows) or do not support fsync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        return
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def publish_dir(tmp: Path, final: Path) -> None:
    """Make a fully written temporary folder visible under its final name, atomically."""
    fsync_tree(tmp)
    if final.exists():
        # Only happens when re-saving the same step (e.g. final == last periodic step).
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
