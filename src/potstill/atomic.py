"""Atomic writes: a file or folder is either complete under its final name, or absent.

Write to a temporary name in the same directory, fsync, rename, fsync the directory.
Used by checkpoints, run logs, the tokenized-data cache and the quickstart's outputs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from .errors import RunDirError


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, rename, fsync the directory.
    On any failure (a full disk, a kill) the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


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


# ----------------------------------------------------------------------------------------
# File-system failures as one line


# errno -> what it means for the user: full disks, read-only mounts, permissions, paths that are files.
DISK_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for the file system",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder, not a file",
    errno.EEXIST: "the path exists and is not a folder",
    errno.ENAMETOOLONG: "the file name is too long",
}


def disk_problem(err: BaseException, where: Path | None = None) -> str | None:
    """A short reason for a file-system error a user can fix (full, read-only, ...), else None.

    Libraries wrap the OSError: torch.save raises a RuntimeError whose context is the OSError
    (or, writing to a path, one with no trace of it at all), safetensors a SafetensorError
    saying "os error 28". So the exception chain and the message are searched, and as a last
    resort the file system at ``where`` is asked whether it is full or read-only."""
    seen = set()
    chain: BaseException | None = err
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in DISK_PROBLEMS:
            return DISK_PROBLEMS[chain.errno] + (f" ({chain.filename})" if chain.filename else "")
        match = re.search(r"os error (\d+)", str(chain))
        if match and int(match.group(1)) in DISK_PROBLEMS:
            return DISK_PROBLEMS[int(match.group(1))] + (f" ({where})" if where else "")
        chain = chain.__cause__ or chain.__context__
    if where is not None:
        return _file_system_state(where)
    return None


def _file_system_state(where: Path) -> str | None:
    """"full" or "read-only" for the file system holding ``where`` (its nearest existing parent)."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return DISK_PROBLEMS[errno.EROFS] + f" ({probe})"
    if st.f_bavail * st.f_frsize < 1 << 20:
        return DISK_PROBLEMS[errno.ENOSPC] + f" ({probe})"
    return None


@contextlib.contextmanager
def disk_errors(what: str, *, advice: "str | Callable[[], str]", cleanup: Path | None = None,
                where: Path | None = None):
    """Turn a fixable file-system error inside the block into one :class:`RunDirError` line.

    ``what`` says what was being written ("writing checkpoint step 40 to runs/x"); ``advice``
    what to do ("free space, then resume with train.resume=auto"), or a function that says it
    when the error happens (e.g. naming the newest checkpoint then). ``cleanup`` (a temporary
    file or folder of the failed write) is removed first, so no half-written state is left.
    ``where`` (default: ``cleanup``) is where the writes go, to recognize a full disk behind a
    library's own error. Other errors pass through unchanged."""
    try:
        yield
    except Exception as err:
        if isinstance(err, RunDirError):
            raise
        reason = disk_problem(err, where or cleanup)
        if reason is None:
            raise
        if cleanup is not None:
            with contextlib.suppress(OSError):
                if cleanup.is_dir() and not cleanup.is_symlink():
                    shutil.rmtree(cleanup)
                elif cleanup.exists():
                    cleanup.unlink()
        raise RunDirError(f"{what}: {reason}; {advice() if callable(advice) else advice}") from None
