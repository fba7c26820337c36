"""What potstill wrote, and may therefore replace: ownership marks and path relations.

potstill never deletes or overwrites what it did not create. Every folder it creates for
its own output (a run directory, a teacher cache, a packed export) holds a small mark file,
``.potstill-owned`` (JSON: which kind of output, which potstill version, when), written
when the folder is first made. A command that is asked to replace an existing folder does
so only when the folder carries the mark of the same kind; otherwise it refuses in one
line. Files (e.g. ``potstill generate``'s output) are recognized by a sidecar the command
writes beside them instead.

    mark_owned(folder, "run")          # on creating a run directory
    owner_kind(folder)  -> "run" | None
    require_owned(folder, "cache", what="cache.dir")   # raises RunDirError if not ours
    is_within(path, folder)            # path is folder or lies below it (symlinks resolved)
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from .atomic import atomic_write_text
from .errors import PotstillError, RunDirError
from .version import __version__

MARK_FILE = ".potstill-owned"
KINDS = ("run", "cache", "export", "report")


def mark_owned(folder: str | os.PathLike, kind: str) -> None:
    """Record that potstill created ``folder`` for output of ``kind`` (idempotent)."""
    if kind not in KINDS:
        raise ValueError(f"unknown ownership kind {kind!r}; one of {KINDS}")
    folder = Path(folder)
    if owner_kind(folder) == kind:
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MARK_FILE, json.dumps(
        {"kind": kind, "potstill_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


def read_json_object(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is absent, unreadable, not JSON or not an
    object: how potstill recognizes a file it wrote (a mark, a manifest, a summary) without trusting it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owner_kind(folder: str | os.PathLike) -> str | None:
    """The kind potstill marked ``folder`` with, or None (not ours, unreadable or absent)."""
    kind = (read_json_object(Path(folder) / MARK_FILE) or {}).get("kind")
    return kind if kind in KINDS else None


def require_owned(folder: str | os.PathLike, kind: str, *, what: str) -> None:
    """Raise one line unless ``folder`` carries potstill's mark of ``kind``.

    ``what`` names the setting or argument that pointed there (e.g. ``"cache.dir"``)."""
    found = owner_kind(folder)
    if found == kind:
        return
    article = "an" if kind[0] in "aeiou" else "a"
    why = "was not written by potstill" if found is None else f"holds a potstill {found}, not {article} {kind}"
    raise RunDirError(f"{what} {folder} {why}: potstill replaces only its own output; choose another {what} "
                      "or move the folder away yourself")


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` is ``folder`` or lies below it, after resolving symlinks and ``..``."""
    try:
        p, f = Path(path).resolve(), Path(folder).resolve()
    except (OSError, RuntimeError):
        return False
    return p == f or f in p.parents


def local_paths(value: Any) -> list[Path]:
    """The local filesystem paths a config value names (a string, a glob such as
    ``data/*.jsonl``, or a list of them) that exist.

    Hub ids and objects give nothing: only what is on disk can be overwritten."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            continue
        if glob.has_magic(str(item)):
            out.extend(Path(p) for p in glob.glob(str(item), recursive=True))
            continue
        p = Path(item)
        try:
            if p.exists():
                out.append(p)
        except OSError:
            continue
    return out


def input_paths(cfg: Any, keys: Sequence[str]) -> list[tuple[str, Path]]:
    """(key, local path) for each dotted config ``key`` (``"data.source"``) that names files on disk."""
    found = []
    for key in keys:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        found += [(key, path) for path in local_paths(value)]
    return found


def check_writable(path: str | os.PathLike, what: str, error: type[PotstillError] = RunDirError) -> None:
    """One line (``error``) unless potstill can create or write ``path`` (a folder): the nearest
    existing folder on the way must be a folder this process may write in. ``what`` names the setting."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == path else f": {existing}"
        raise error(f"{what} {path}{where} is a file, not a folder: choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{what} {path}: cannot write in {existing} (read-only or no permission): choose another "
                          f"{what} or fix its permissions")
