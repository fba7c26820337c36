"""Raw rows from wherever the user keeps them, as a ``datasets.Dataset``.

A source is resolved in two steps so that a cache hit never parses the data:

* :func:`open_source` returns a :class:`RawSource` with a content ``fingerprint``
  (file bytes, in-memory rows, or a hub dataset's ``_fingerprint``) and a loader;
* :meth:`RawSource.rows` loads the rows once, on first use.

Accepted forms (``data.source`` and ``data.validation_source``):

* a file: ``.jsonl`` (one JSON object per line; blank lines skipped), ``.json`` (an array
  of rows, an object holding one array such as ``{"data": [...]}``, or JSON lines), ``.parquet``,
  ``.csv`` (header row; every value a string), ``.txt`` (one example per non-empty line;
  put multi-line documents in JSONL instead);
* a glob (``data/*.jsonl``), a folder (its supported files, sorted, not recursive);
* a hub dataset name: ``datasets.load_dataset(name, config_name, split=..., revision=...)``;
* a ``datasets.Dataset`` (or ``DatasetDict``: the split is picked), a list of strings
  (text rows), a list of dicts (rows), a list of conversations (``messages`` rows);
* a list of files/globs/folders/datasets, concatenated in order.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import glob as globlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
_GLOB_CHARS = "*?["
_SUPPORTED = "/".join(SUPPORTED_SUFFIXES)


@dataclass
class _Part:
    """Where a run of rows came from, for error messages."""

    name: str
    start: int
    n_rows: int
    lines: Sequence[int] | None = None  # 1-based line of each row, for line-based files


Loader = Callable[[int | None], "tuple[Any, list[_Part]]"]


class RawSource:
    """A resolved source: what it is, a fingerprint of its content, and a lazy loader."""

    def __init__(self, describe: str, fingerprint: str, loader: Loader, *, kind: str, limit: int | None = None):
        self.describe = describe
        self.kind = kind  # "files" | "hub" | "dataset_dict" | "memory" | "list"
        self.fingerprint = _sha256(f"{fingerprint}|limit={limit}")
        self._loader = loader
        self._limit = limit
        self._rows = None
        self._parts: list[_Part] = []

    def rows(self):
        """The rows as a ``datasets.Dataset`` (loaded on first call, then kept)."""
        if self._rows is None:
            self._rows, self._parts = self._loader(self._limit)
        return self._rows

    def where(self, i: int) -> str:
        """'file.jsonl:17 (row 16)' or 'in-memory list, row 3': the origin of row ``i``."""
        self.rows()
        k = bisect.bisect_right([p.start for p in self._parts], i) - 1
        if k < 0 or i >= self._parts[k].start + self._parts[k].n_rows:
            return f"{self.describe}, row {i}"
        part = self._parts[k]
        local = i - part.start
        if part.lines is not None:
            return f"{part.name}:{part.lines[local]} (row {i})"
        return f"{part.name}, row {local}" + (f" (row {i} overall)" if local != i else "")


def load_rows(source: Any, *, cfg, split: str | None = None):
    """The raw rows of ``source`` (before formatting) as a ``datasets.Dataset``.

    ``split`` picks the split of a hub dataset or ``DatasetDict`` (default ``cfg.split``);
    ``cfg.max_examples`` keeps the first N rows.
    """
    return open_source(source, cfg=cfg, split=split).rows()


def open_source(source: Any, *, cfg, split: str | None = None, what: str = "data.source") -> RawSource:
    split = split or cfg.split
    if source is None:
        raise DataError(f"{what} is not set: give a hub dataset name, a local file, folder or glob, or a list")
    return _open(source, cfg, split, what, limit=cfg.max_examples)


def _open(source: Any, cfg, split: str, what: str, limit: int | None) -> RawSource:
    import datasets

    if isinstance(source, datasets.Dataset):
        return _from_dataset(source, "in-memory datasets.Dataset", "memory", limit)
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"{what}: the DatasetDict has no split '{split}' (splits: {', '.join(source)}): "
                            "set data.split / data.validation_split to one of them")
        return _from_dataset(source[split], f"DatasetDict split '{split}'", "dataset_dict", limit)
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError(f"{what} is a streaming IterableDataset, which is not supported: "
                        "load it with streaming=False or save it to local files")
    if isinstance(source, (str, os.PathLike)):
        return _open_path_or_hub(os.fspath(source), cfg, split, what, limit)
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError(f"{what} is an empty list: give at least one file, dataset or example")
        if all(_is_source_item(x) for x in source):
            return _open_many(list(source), cfg, split, what, limit)
        rows = rows_from_list(list(source), cfg, f"{what} (in-memory list)")
        return _from_rows(rows, f"in-memory list of {len(rows)} rows", limit)
    raise DataError(f"{what} has unsupported type {type(source).__name__}: give a hub dataset name, a path, a glob, "
                    "a datasets.Dataset, or a list of strings, dicts or conversations")


def rows_from_list(items: list, cfg, name: str) -> list[dict]:
    """Strings -> text rows, dicts -> rows, conversations (lists of role/content dicts) -> messages rows."""
    if all(isinstance(x, str) for x in items):
        return [{cfg.text_field: x} for x in items]
    if all(isinstance(x, dict) for x in items):
        return items
    if all(isinstance(x, (list, tuple)) for x in items):
        for i, conv in enumerate(items):
            if not all(isinstance(m, dict) and "role" in m for m in conv):
                raise DataError(f"{name}: item {i} is a list but not a conversation: each message must be a "
                                "dict with 'role' and 'content'")
        return [{cfg.messages_field: list(conv)} for conv in items]
    kinds = sorted({type(x).__name__ for x in items})
    raise DataError(f"{name} mixes item types ({', '.join(kinds)}): give only strings (texts), only dicts (rows) "
                    "or only conversations (lists of role/content dicts)")


# ----------------------------------------------------------------------------------------
# Paths, globs, folders, hub names


def _has_glob(s: str) -> bool:
    return any(c in s for c in _GLOB_CHARS)


def _looks_local(s: str) -> bool:
    return (Path(s).suffix.lower() in SUPPORTED_SUFFIXES or s.startswith(("/", ".", "~")) or s.endswith("/")
            or "\\" in s)


def _is_source_item(x: Any) -> bool:
    import datasets

    if isinstance(x, (datasets.Dataset, datasets.DatasetDict, os.PathLike)):
        return True
    if not isinstance(x, str) or "\n" in x or len(x) > 1024:
        return False
    s = os.path.expanduser(x)
    return os.path.exists(s) or Path(s).suffix.lower() in SUPPORTED_SUFFIXES or (
        _has_glob(s) and bool(globlib.glob(s, recursive=True)))


def _open_path_or_hub(s: str, cfg, split: str, what: str, limit: int | None) -> RawSource:
    path = Path(os.path.expanduser(s))
    if _has_glob(s) and not path.exists():
        matches = sorted(globlib.glob(str(path), recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file() and Path(m).suffix.lower() in SUPPORTED_SUFFIXES]
        if not files:
            raise DataError(f"{what}: no {_SUPPORTED} files match the glob '{s}'"
                            + (f" ({len(matches)} other paths do)" if matches else "") + ": check the pattern")
        return _combine([_from_file(f, cfg) for f in files], f"'{s}' ({len(files)} files)", "files", limit)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"{what}: folder {path} holds no {_SUPPORTED} files: put data files in it or point at a file")
        return _combine([_from_file(f, cfg) for f in files], f"folder {path} ({len(files)} files)", "files", limit)
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"{what}: unsupported file type '{path.suffix}' for {path}: use {_SUPPORTED}")
        return _combine([_from_file(path, cfg)], str(path), "files", limit)
    if s in BUILTIN_SOURCES:
        return _from_builtin(s, cfg, split, what, limit)
    if _looks_local(s):
        raise DataError(f"{what}: data file not found: {path} (working directory {os.getcwd()}): check the path")
    return _from_hub(s, cfg, split, what, limit)


# Corpora that ship with potstill (a pinned snapshot, unpacked once into the cache; no download).
BUILTIN_SOURCES = ("python-docs",)


def _from_builtin(name: str, cfg, split: str, what: str, limit: int | None) -> RawSource:
    from .corpus import python_docs_split_path

    try:
        path = python_docs_split_path(split)
    except ValueError as err:
        raise DataError(f"{what}: built-in corpus '{name}': {err}") from None
    return _combine([_from_file(path, cfg)], f"built-in corpus '{name}' ({split} split)", "builtin", limit)


def _from_hub(name: str, cfg, split: str, what: str, limit: int | None) -> RawSource:
    import datasets

    try:
        ds = datasets.load_dataset(name, cfg.config_name, split=split, revision=cfg.revision)
    except Exception as err:  # noqa: BLE001 - any failure means: not loadable; say what to pass instead
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise DataError(
            f"{what}: dataset '{name}' was not found locally (no such file, folder or glob) nor on the Hugging Face "
            f"Hub ({reason}): pass a local {_SUPPORTED} file, a folder or glob, a datasets.Dataset, or a hub name "
            "that exists (check data.config_name, data.split, data.revision and network access)") from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{what}: load_dataset('{name}', split='{split}') returned {type(ds).__name__}, "
                        "not a Dataset: set data.split to a single split name")
    return _from_dataset(ds, f"hub dataset '{name}' (config {cfg.config_name}, split {split})", "hub", limit,
                         extra=f"{name}|{cfg.config_name}|{split}|{cfg.revision}")


def _from_dataset(ds, describe: str, kind: str, limit: int | None, extra: str = "") -> RawSource:
    if ds.cache_files:  # backed by arrow files (hub or load_dataset): datasets' own content fingerprint
        fp = _sha256(f"dataset|{extra}|{ds._fingerprint}")
    else:
        fp = hash_rows(ds)

    def load(lim):
        out = ds.select(range(min(lim, len(ds)))) if lim is not None and lim < len(ds) else ds
        return out, [_Part(describe, 0, len(out))]

    return RawSource(describe, fp, load, kind=kind, limit=limit)


def _from_rows(rows: list[dict], describe: str, limit: int | None) -> RawSource:
    fp = _sha256("rows|" + json.dumps(rows, sort_keys=True, default=repr, ensure_ascii=False))

    def load(lim):
        kept = rows if lim is None else rows[:lim]
        return _to_dataset(kept, describe), [_Part(describe, 0, len(kept))]

    return RawSource(describe, fp, load, kind="memory", limit=limit)


def _open_many(items: list, cfg, split: str, what: str, limit: int | None) -> RawSource:
    subs = [_open(x, cfg, split, f"{what}[{i}]", None) for i, x in enumerate(items)]
    return _combine(subs, " + ".join(s.describe for s in subs), "list", limit)


def _combine(subs: list[RawSource], describe: str, kind: str, limit: int | None) -> RawSource:
    """Sources back to back; ``limit`` rows in all, later sources not even read once it is reached."""
    if len(subs) == 1:
        return RawSource(describe, subs[0].fingerprint, subs[0]._loader, kind=kind, limit=limit)

    def load(lim):
        import datasets

        named, parts, start = [], [], 0
        for sub in subs:
            if lim is not None and start >= lim:
                break
            ds, sub_parts = sub._loader(None if lim is None else lim - start)
            named.append((sub.describe, ds))
            parts += [_Part(p.name, start + p.start, p.n_rows, p.lines) for p in sub_parts]
            start += len(ds)
        if len(named) == 1:
            return named[0][1], parts
        try:
            return datasets.concatenate_datasets([d for _, d in named]), parts
        except Exception:  # noqa: BLE001 - feature mismatch: try casting to the first one's features
            try:
                first = named[0][1]
                return datasets.concatenate_datasets([first] + [d.cast(first.features) for _, d in named[1:]]), parts
            except Exception:  # noqa: BLE001
                cols = "; ".join(f"{n}: {', '.join(d.column_names)}" for n, d in named)
                raise DataError(f"cannot combine sources with different columns or types ({cols}): "
                                "give sources with the same columns") from None

    return RawSource(describe, _sha256("list|" + "|".join(s.fingerprint for s in subs)), load, kind=kind, limit=limit)


# ----------------------------------------------------------------------------------------
# Files


def _from_file(path: Path, cfg) -> RawSource:
    """One file, fingerprinted by its bytes (not its name or mtime)."""
    h = hashlib.sha256(b"file|" + path.suffix.lower().encode())
    with _readable(path):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)

    def load(lim):
        with _readable(path):
            rows, lines = _read_file(path, cfg, lim)
        ds = _to_dataset(rows, str(path), lines) if isinstance(rows, list) else rows
        return ds, [_Part(str(path), 0, len(ds), lines)]

    return RawSource(str(path), h.hexdigest(), load, kind="files")


@contextlib.contextmanager
def _readable(path: Path):
    """A file that cannot be read (permissions, a vanished network mount, an I/O error on a bad
    disk) is one DataError line naming it, not an OSError traceback."""
    try:
        yield
    except OSError as err:
        raise DataError(f"cannot read the data file {path}: {err.strerror or err}: check the file and its "
                        "permissions") from None


def _read_file(path: Path, cfg, limit: int | None):
    """Rows of one file (a list of dicts, or a Dataset for parquet) and their line numbers (or None)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_lines(path, limit, _jsonl_row)
    if suffix == ".txt":
        return _read_lines(path, limit, lambda raw, where: {cfg.text_field: raw.decode("utf-8").rstrip("\r\n")}
                           if raw.strip() else None)
    if suffix == ".json":
        return _read_json(path, cfg, limit)
    if suffix == ".csv":
        return _read_csv(path, limit)
    return _read_parquet(path, limit), None


def _read_lines(path: Path, limit: int | None, parse: Callable[[bytes, str], dict | None], data: bytes | None = None):
    """One row per line (``parse`` returns None to skip a line), with 1-based line numbers."""
    rows, lines = [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(data.splitlines(keepends=True) if data is not None else fh, 1):
            if limit is not None and len(rows) >= limit:
                break
            raw = raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw  # UTF-8 byte order mark
            try:
                row = parse(raw, f"{path}:{lineno}")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({err.reason}): re-encode the file as UTF-8") from None
            if row is not None:
                rows.append(row)
                lines.append(lineno)
    return rows, lines


def _jsonl_row(raw: bytes, where: str) -> dict | None:
    if not raw.strip():
        return None
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as err:
        if not raw.endswith(b"\n"):  # only the last line lacks its newline: the file was cut short
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno}): the file ends in the middle "
                            "of this row (cut short while it was written?): complete or remove the last line") from None
        raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno}): fix or remove that line "
                        "(JSONL needs one JSON object per line)") from None
    if not isinstance(row, dict):
        raise DataError(f'{where}: expected a JSON object per line, got {type(row).__name__}: write each row as an '
                        'object, e.g. {"text": "..."}')
    return row


def _read_json(path: Path, cfg, limit: int | None):
    data = path.read_bytes()
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines saved as .json
            return _read_lines(path, limit, _jsonl_row, data)
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}): fix the file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}): re-encode the file as UTF-8") from None
    lists = [v for v in obj.values() if isinstance(v, list)] if isinstance(obj, dict) else []
    if len(lists) == 1:  # a wrapper: {"data": [...], "version": 1}
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: the top-level JSON {type(obj).__name__} is not a list of rows: give an array of "
                        'objects, an object with one array (e.g. {"data": [...]}), or JSON lines')
    rows = rows_from_list(obj, cfg, str(path)) if obj else []
    return (rows if limit is None else rows[:limit]), None


def _read_csv(path: Path, limit: int | None):
    rows, lines = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            while limit is None or len(rows) < limit:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err}): fix that line") from None
                if None in row:
                    raise DataError(f"{path}:{start}: row has more fields than the header "
                                    f"({', '.join(reader.fieldnames or [])}): quote fields that contain commas")
                rows.append(row)
                lines.append(start)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}): re-encode the file as UTF-8") from None
    return rows, lines


def _read_parquet(path: Path, limit: int | None):
    import datasets
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err}): "
                        "check the file or convert it to JSONL") from None
    if limit is not None:
        table = table.slice(0, limit)
    return datasets.Dataset(datasets.table.InMemoryTable(table))


def _to_dataset(rows: list[dict], name: str, lines: Sequence[int] | None = None):
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
        odd = _first_odd_type(rows)
        if odd is not None:
            i, key, got, expected = odd
            where = f"{name}:{lines[i]} (row {i})" if lines is not None else f"{name}, row {i}"
            raise DataError(f"{where}: inconsistent field types: '{key}' is a {got} where earlier rows hold a "
                            f"{expected}: give each field the same type in every row") from None
        raise DataError(f"{name}: rows have inconsistent field types ({err}): give each field the same type "
                        "in every row") from None


def _first_odd_type(rows: list[dict]) -> tuple[int, str, str, str] | None:
    """(row, field, its type, the type earlier rows gave it) of the first top-level field whose type
    differs from before (null aside; ints among floats are fine): the row Arrow could not store."""
    seen: dict[str, tuple[type, str]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            if value is None:
                continue
            kind = float if type(value) is int else type(value)
            first, first_name = seen.setdefault(key, (kind, type(value).__name__))
            if kind is not first:
                return i, str(key), type(value).__name__, first_name
    return None


# ----------------------------------------------------------------------------------------
# Fingerprints


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def hash_rows(ds, batch_size: int = 2048) -> str:
    """A content hash of an in-memory Dataset's rows (and features), independent of how it was built."""
    h = hashlib.sha256(b"rows|" + repr(ds.features).encode())
    for batch in ds.with_format(None).iter(batch_size=batch_size):
        h.update(json.dumps(batch, sort_keys=True, default=repr, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return h.hexdigest()
