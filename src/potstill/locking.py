"""One process per output: an exclusive ``flock`` on a lock file that says who holds it.

The OS releases a ``flock`` when its process dies (even by ``kill -9``), so a stale lock file
never blocks a later run. Used for run directories (``<run>/.potstill.lock``) and for
``potstill generate`` outputs (``<output>.lock``).

    lock = FileLock(path).acquire(busy=lambda holder: RunDirError(f"... in use by {holder} ..."))
    ...
    lock.release()
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Callable

from .errors import PotstillError


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path``; the file holds "pid N on HOST".

    ``remove_on_release``: delete the file when released (a lock beside a user's output should
    not stay behind). Deleting a lock file is only safe with the inode check in :meth:`acquire`:
    a process that opened the file just before it was removed then finds it holds a lock on a
    removed file, and opens the new one instead, so two holders never coexist."""

    def __init__(self, path: str | os.PathLike, *, remove_on_release: bool = False):
        self.path = Path(path)
        self.remove_on_release = remove_on_release
        self._fh = None

    def acquire(self, *, busy: Callable[[str], PotstillError]) -> "FileLock":
        """Take the lock, or raise ``busy(holder)`` (holder: "pid N on HOST") if another process has it.
        File-system errors (a read-only or full disk) pass through to the caller."""
        while True:
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open until release
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise busy(holder) from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fh.fileno()), current):
                break
            fh.close()  # the file was removed (and maybe re-created) by the holder we waited on
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        if self.remove_on_release:
            try:
                self.path.unlink()
            except OSError:
                pass
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None
