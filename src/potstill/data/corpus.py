"""The built-in ``python-docs`` corpus: English documentation, pinned and shipped with potstill.

The corpus ships as a compressed snapshot, ``potstill/assets/python-docs/corpus.jsonl.xz``
(one ``{"split": ..., "text": ...}`` row per text) with its ``manifest.json`` (sha256 of the
uncompressed content, texts and characters per split, the Python and package versions it
was built from). Every machine reads the same texts in the same splits, whatever is
installed there. On first use :func:`python_docs` unpacks it once into
``$POTSTILL_CACHE/python-docs/snapshot-<sha256[:16]>/{train,validation,test}.jsonl``
(default root ``~/.cache/potstill``) and checks the sha256; a damaged snapshot is one clear
error telling to reinstall.

The snapshot is made by ``scripts/snapshot_python_docs.py`` with :func:`build_python_docs`
and :func:`write_snapshot`. The builder reads text that every machine with potstill has: the
docstrings of the Python standard library and of a fixed list of potstill's dependencies,
plus ``pydoc_data.topics`` (the language reference pages that ``help("for")`` shows). About
20 million characters.

* Docstrings are read with :mod:`ast`, never by importing: importing torch or
  transformers' thousands of modules would take minutes, have side effects, and fail on
  optional extras.
* Each text is ``<qualified name>\\n\\n<docstring>`` (e.g. ``json.dumps``), whitespace
  normalized; texts under :data:`MIN_CHARS` characters are dropped, exact duplicates of
  a docstring are kept once (the first in sorted traversal order).
* The split is a function of the docstring alone (sha256 -> a bucket out of 1000), so a
  docstring lands in the same split whatever versions are installed, and the test split
  of one build is never in the train split of another.
* A build is cached under ``$POTSTILL_CACHE/python-docs/<fingerprint>/``; the fingerprint
  covers the (package, version) pairs, the Python version and :data:`BUILDER_VERSION`, so
  an upgrade rebuilds.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import lzma
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from ..atomic import atomic_write_bytes, disk_errors, fsync_dir, fsync_tree
from ..errors import DataError

__all__ = ["PYTHON_DOCS", "SPLITS", "DEPENDENCIES", "SNAPSHOT_DIR", "build_python_docs", "python_docs",
           "python_docs_split_path", "read_snapshot_manifest", "split_of", "write_snapshot"]

PYTHON_DOCS = "python-docs"
SPLITS = ("train", "validation", "test")
# Bump when the extraction or the text format changes: every cached corpus is rebuilt.
BUILDER_VERSION = 1
# Fixed on purpose: the corpus must not depend on whatever else happens to be installed.
DEPENDENCIES = ("transformers", "torch", "numpy", "datasets", "accelerate", "huggingface_hub", "tokenizers",
                "safetensors", "tqdm", "yaml", "pydantic")
MIN_CHARS = 80
# The shipped snapshot: corpus.jsonl.xz ({"split", "text"} rows) and manifest.json.
SNAPSHOT_DIR = Path(__file__).resolve().parents[1] / "assets" / PYTHON_DOCS
SNAPSHOT_FILE = "corpus.jsonl.xz"
SNAPSHOT_FORMAT = 1
_REINSTALL = "reinstall potstill (pip install --force-reinstall potstill, or pip install -e . in a checkout)"
# Buckets out of 1000: [0, 12) test, [12, 24) validation, the rest train (about 1.2% each,
# which is ~250k characters per held-out split on a full build).
_TEST_BUCKETS, _VALIDATION_BUCKETS = 12, 12
_DISTRIBUTIONS = {"yaml": "PyYAML"}  # import name -> distribution name, where they differ
# Stdlib folders that are tests, tools or vendored copies rather than library documentation.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
              "__pycache__", "pydoc_data"}
_SKIP_PATHS = {("venv", "scripts")}

log = logging.getLogger("potstill")


def split_of(docstring: str) -> str:
    """The split of a (normalized) docstring: a pure function of its text."""
    bucket = int.from_bytes(hashlib.sha256(docstring.encode("utf-8")).digest()[:8], "big") % 1000
    if bucket < _TEST_BUCKETS:
        return "test"
    return "validation" if bucket < _TEST_BUCKETS + _VALIDATION_BUCKETS else "train"


def normalize(text: str) -> str:
    """Tabs to spaces, no trailing spaces, at most one blank line in a row, stripped.

    Indentation inside a docstring is kept: it carries code examples and parameter lists.
    """
    lines = [line.rstrip() for line in text.expandtabs(4).replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _default_root(cache_root: str | Path | None) -> Path:
    return Path(cache_root or os.environ.get("POTSTILL_CACHE") or "~/.cache/potstill").expanduser()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(package, package))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sources(packages: Sequence[str] | None) -> list[tuple[str, str, Path, list[Path]]]:
    """(name, version, base dir, roots) for each source; uninstalled packages are skipped.

    Module names are paths relative to ``base``; ``roots`` are the dirs or files to walk.
    ``find_spec`` on a top-level name locates a package without executing it.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    python = f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    if packages is None:
        out = [("stdlib", python, stdlib, [stdlib])]
        names = DEPENDENCIES
    else:
        out, names = [], packages
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        if spec.submodule_search_locations:
            roots = sorted(Path(p) for p in spec.submodule_search_locations)
        elif spec.origin and spec.origin.endswith(".py"):
            roots = [Path(spec.origin)]
        else:
            continue  # a compiled extension module: no source to read
        in_stdlib = roots[0].parent == stdlib
        out.append((name, python if in_stdlib else _version(name), roots[0].parent, roots))
    return out


def _python_files(root: Path, stdlib: bool) -> list[Path]:
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        # Sorted in place so that os.walk visits folders in a fixed order.
        dirnames[:] = sorted(d for d in dirnames if not (
            d in _SKIP_DIRS or d.startswith(".") or (stdlib and (rel[-1:] + (d,)) in _SKIP_PATHS)))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _docstrings(path: Path, module: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for the module, its classes, functions and methods."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, OSError):
        return  # Python 2 leftovers, templates with placeholders, unreadable files
    stack = [(module, tree)]
    while stack:
        qualname, node = stack.pop(0)
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield qualname, doc
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((f"{qualname}.{child.name}", child))


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics  # a plain dict of strings: importing it runs nothing else
    except ImportError:
        return {}
    return topics


def _collect(packages: Sequence[str] | None, max_files: int | None, progress: bool):
    """Yield (split, text) for every kept text, in a deterministic order."""
    from tqdm.auto import tqdm

    sources = _sources(packages)
    jobs = []
    for name, _, base, roots in sources:
        files = [f for root in roots for f in _python_files(root, stdlib=name == "stdlib")]
        jobs += [(f, base) for f in (files[:max_files] if max_files else files)]
    seen: set[bytes] = set()

    def keep(header: str, doc: str):
        doc = normalize(doc)
        text = f"{header}\n\n{doc}" if header else doc
        digest = hashlib.sha256(doc.encode("utf-8")).digest()
        if len(text) < MIN_CHARS or digest in seen:
            return None
        seen.add(digest)
        return split_of(doc), text

    if packages is None:
        for topic, doc in sorted(_pydoc_topics().items()):
            if (row := keep("", doc)) is not None:
                yield row
    for path, base in tqdm(jobs, desc="python-docs", unit="file", disable=not progress, mininterval=1.0):
        for qualname, doc in _docstrings(path, _module_name(path, base)):
            if (row := keep(qualname, doc)) is not None:
                yield row


def _fingerprint(packages: Sequence[str] | None, max_files: int | None) -> str:
    state = {"builder": BUILDER_VERSION, "python": sys.version.split()[0], "max_files": max_files,
             "packages": "default" if packages is None else list(packages), "min_chars": MIN_CHARS,
             "sources": [(name, version) for name, version, _, _ in _sources(packages)],
             "pydoc_topics": packages is None}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def build_python_docs(cache_root: str | Path | None = None, progress: bool = True, *,
                      packages: Sequence[str] | None = None, max_files: int | None = None) -> Path:
    """Build (or reuse) the corpus; return the folder holding ``{train,validation,test}.jsonl``.

    ``packages`` and ``max_files`` restrict the build (tests, quick looks): with
    ``packages`` only those importable top-level names are read (stdlib packages such as
    ``"json"`` included; no pydoc topics), with ``max_files`` at most that many files each.
    A restricted build has its own fingerprint, so it never stands in for the full corpus.
    """
    root = _default_root(cache_root) / PYTHON_DOCS
    final = root / _fingerprint(packages, max_files)
    if (final / "manifest.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))  # same filesystem: the rename is atomic
    try:
        counts = {s: {"texts": 0, "chars": 0} for s in SPLITS}
        handles = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        try:
            for split, text in _collect(packages, max_files, progress):
                handles[split].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                counts[split]["texts"] += 1
                counts[split]["chars"] += len(text)
        finally:
            for handle in handles.values():
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
        manifest = {"name": PYTHON_DOCS, "builder_version": BUILDER_VERSION, "python": sys.version.split()[0],
                    "sources": {n: v for n, v, _, _ in _sources(packages)}, "max_files": max_files,
                    "splits": counts, "build_seconds": round(time.perf_counter() - start, 1)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(c["chars"] for c in counts.values())
    log.info("python-docs: %s texts, %.1fM chars (train %d, validation %d, test %d texts) in %.0fs -> %s",
             f"{sum(c['texts'] for c in counts.values()):,}", total / 1e6, counts["train"]["texts"],
             counts["validation"]["texts"], counts["test"]["texts"], manifest["build_seconds"], final)
    return final


# ----------------------------------------------------------------------------------------
# The shipped snapshot


def write_snapshot(folder: str | Path, out_dir: str | Path) -> dict:
    """Write the built corpus in ``folder`` as ``out_dir/{corpus.jsonl.xz, manifest.json}``.

    Rows are ``{"split": ..., "text": ...}``, train then validation then test, each split
    in its file's order, so unpacking gives back byte-identical split files. The manifest
    records the sha256 and size of the uncompressed content, the texts and characters per
    split and the build's sources; both files are written atomically. Returns the manifest.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    built = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    lines, counts = [], {s: {"texts": 0, "chars": 0} for s in SPLITS}
    for split in SPLITS:
        with open(folder / f"{split}.jsonl", encoding="utf-8") as fh:
            for line in fh:
                text = json.loads(line)["text"]
                lines.append(json.dumps({"split": split, "text": text}, ensure_ascii=False) + "\n")
                counts[split]["texts"] += 1
                counts[split]["chars"] += len(text)
    data = "".join(lines).encode("utf-8")
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)
    manifest = {"name": PYTHON_DOCS, "format": SNAPSHOT_FORMAT, "file": SNAPSHOT_FILE,
                "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "xz_bytes": len(packed),
                "splits": counts, "builder_version": built.get("builder_version"), "python": built.get("python"),
                "sources": built.get("sources"), "min_chars": MIN_CHARS, "build_fingerprint": folder.name,
                "command": "python scripts/snapshot_python_docs.py"}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / SNAPSHOT_FILE, packed)
    atomic_write_bytes(out_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def read_snapshot_manifest(snapshot: str | Path | None = None) -> dict:
    """The manifest of the shipped snapshot (or of the one in ``snapshot``), checked for its fields."""
    folder = Path(snapshot) if snapshot is not None else SNAPSHOT_DIR
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        ok = (manifest.get("format") == SNAPSHOT_FORMAT and isinstance(manifest.get("sha256"), str)
              and len(manifest["sha256"]) == 64 and set(manifest.get("splits", {})) == set(SPLITS))
    except FileNotFoundError:
        raise DataError(f"python-docs: the corpus snapshot is missing ({path} not found): {_REINSTALL}") from None
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"python-docs: the corpus snapshot manifest {path} is unreadable "
                        f"({type(err).__name__}): {_REINSTALL}") from None
    if not ok:
        raise DataError(f"python-docs: the corpus snapshot manifest {path} is not one this potstill "
                        f"(format {SNAPSHOT_FORMAT}) reads: {_REINSTALL}")
    return manifest


def snapshot_texts(split: str, limit: int) -> list[str]:
    """The first ``limit`` texts of ``split`` in the shipped snapshot, read straight from the
    packed file (nothing unpacked): e.g. to train a tokenizer on python-docs text."""
    import lzma

    texts: list[str] = []
    with lzma.open(SNAPSHOT_DIR / SNAPSHOT_FILE, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["split"] == split:
                texts.append(row["text"])
                if len(texts) >= limit:
                    break
    return texts


def _unpack(packed: Path, manifest: dict, tmp: Path, progress: bool) -> None:
    """Decompress ``packed`` into ``tmp/{split}.jsonl``; raise one line if it is damaged."""
    from tqdm.auto import tqdm

    digest, size = hashlib.sha256(), 0
    counts = {s: {"texts": 0, "chars": 0} for s in SPLITS}
    total = sum(c["texts"] for c in manifest["splits"].values())
    handles = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
    try:
        with lzma.open(packed, "rb") as fh, tqdm(total=total, desc="python-docs (unpacking)", unit="text",
                                                 disable=not progress, mininterval=1.0) as bar:
            for number, line in enumerate(fh, 1):
                digest.update(line)
                size += len(line)
                try:
                    row = json.loads(line)
                    split, text = row["split"], row["text"]
                    handles[split].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                except (ValueError, KeyError, TypeError):
                    raise _Damaged(f"row {number} is not a {{split, text}} row") from None
                counts[split]["texts"] += 1
                counts[split]["chars"] += len(text)
                bar.update()
    except (lzma.LZMAError, EOFError) as err:
        raise _Damaged(f"{type(err).__name__}: {err}") from None
    finally:
        for handle in handles.values():
            handle.close()
    if digest.hexdigest() != manifest["sha256"]:
        raise _Damaged(f"sha256 of its content is {digest.hexdigest()[:16]}..., the manifest says "
                       f"{manifest['sha256'][:16]}...")
    if counts != manifest["splits"]:
        raise _Damaged(f"texts per split {({s: c['texts'] for s, c in counts.items()})} differ from the manifest's")


class _Damaged(Exception):
    """Internal: why a snapshot is damaged; turned into one DataError line by :func:`python_docs`."""


def python_docs(cache_root: str | Path | None = None, progress: bool = True, *,
                snapshot: str | Path | None = None) -> Path:
    """The folder holding ``{train,validation,test}.jsonl`` of the shipped corpus, unpacked on first use.

    Unpacks ``corpus.jsonl.xz`` into a temporary folder beside the final one, checks the
    sha256 and the counts against the manifest, then renames it into place: a concurrent
    process (another rank) either finds the complete folder or unpacks its own copy and
    loses the rename harmlessly. Nothing here depends on the installed package versions.
    ``snapshot``: a folder with another snapshot (tests); default :data:`SNAPSHOT_DIR`.
    """
    folder = Path(snapshot) if snapshot is not None else SNAPSHOT_DIR
    manifest = read_snapshot_manifest(folder)
    root = _default_root(cache_root) / PYTHON_DOCS
    final = root / f"snapshot-{manifest['sha256'][:16]}"
    if (final / "manifest.json").is_file():
        return final
    packed = folder / manifest.get("file", SNAPSHOT_FILE)
    if not packed.is_file():
        raise DataError(f"python-docs: the corpus snapshot is missing ({packed} not found): {_REINSTALL}")
    start = time.perf_counter()
    total = sum(c["texts"] for c in manifest["splits"].values())
    log.info("python-docs: unpacking the bundled corpus (%s texts, %.1f MB) -> %s", f"{total:,}",
             manifest.get("bytes", 0) / 1e6, final)
    damaged = None
    advice = "free space, or set POTSTILL_CACHE to a writable folder"
    with disk_errors(f"unpacking the python-docs corpus to {root}", advice=advice, where=root):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))  # same filesystem: the rename is atomic
        try:
            _unpack(packed, manifest, tmp, progress)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            fsync_tree(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "manifest.json").is_file():  # not a concurrent process that won the race
                    raise
            fsync_dir(root)
        except _Damaged as err:
            damaged = str(err)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if damaged is not None:
        raise DataError(f"python-docs: the corpus snapshot {packed} is damaged ({damaged}): {_REINSTALL}")
    log.info("python-docs: unpacked in %.1fs", time.perf_counter() - start)
    return final


def python_docs_split_path(split: str, cache_root: str | Path | None = None, progress: bool = True) -> Path:
    """The jsonl file of one split of the shipped corpus, unpacked first if needed."""
    if split not in SPLITS:
        raise ValueError(f"unknown python-docs split {split!r}: use one of {', '.join(SPLITS)}")
    return python_docs(cache_root, progress) / f"{split}.jsonl"
