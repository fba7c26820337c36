"""The python-docs corpus: the shipped snapshot, and the builder run on a few real packages."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import lzma
import os
import re
import subprocess
import sys
import textwrap

import pytest

from potstill.data import corpus
from potstill.errors import DataError

SMALL = ["json", "tqdm"]  # a stdlib package and a dependency: a few dozen files, well under a second


def _rows(folder, split):
    return [json.loads(line)["text"] for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def _all(folder):
    return {split: _rows(folder, split) for split in corpus.SPLITS}


def _body(text):
    return text.split("\n\n", 1)[1]


def test_build_writes_three_splits_and_manifest(tmp_path):
    folder = corpus.build_python_docs(tmp_path, progress=False, packages=SMALL)
    assert folder.parent == tmp_path / corpus.PYTHON_DOCS
    rows = _all(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["sources"]) == set(SMALL)
    for split in corpus.SPLITS:
        assert manifest["splits"][split]["texts"] == len(rows[split])
        assert manifest["splits"][split]["chars"] == sum(map(len, rows[split]))
    assert len(rows["train"]) > 50
    assert all(len(t) >= corpus.MIN_CHARS for texts in rows.values() for t in texts)
    assert any(t.startswith("json.dumps\n\nSerialize") for t in rows["train"] + rows["validation"] + rows["test"])
    assert not list(folder.parent.glob(".tmp-*"))  # the temporary folder was renamed away


def test_two_builds_are_identical(tmp_path):
    a = corpus.build_python_docs(tmp_path / "a", progress=False, packages=SMALL)
    b = corpus.build_python_docs(tmp_path / "b", progress=False, packages=SMALL)
    assert a.name == b.name
    for split in corpus.SPLITS:
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()


def test_splits_are_disjoint_and_assigned_by_text(tmp_path):
    rows = _all(corpus.build_python_docs(tmp_path, progress=False, packages=SMALL))
    bodies = {split: {_body(t) for t in texts} for split, texts in rows.items()}
    assert not bodies["train"] & bodies["validation"]
    assert not bodies["train"] & bodies["test"]
    assert not bodies["validation"] & bodies["test"]
    for split, texts in bodies.items():
        assert all(corpus.split_of(t) == split for t in texts)


def test_duplicates_are_kept_once(tmp_path):
    once = _all(corpus.build_python_docs(tmp_path, progress=False, packages=["json"]))
    twice = _all(corpus.build_python_docs(tmp_path, progress=False, packages=["json", "json"]))
    assert once == twice  # the second pass over the same files adds nothing
    bodies = [_body(t) for texts in once.values() for t in texts]
    assert len(bodies) == len(set(bodies))


def test_split_of_a_text_does_not_depend_on_what_else_is_installed(tmp_path):
    alone = _all(corpus.build_python_docs(tmp_path, progress=False, packages=["json"]))
    mixed = _all(corpus.build_python_docs(tmp_path, progress=False, packages=["tqdm", "json"]))
    for split, texts in alone.items():
        assert set(texts) <= set(mixed[split])
    assert corpus.split_of("some docstring") == corpus.split_of("some docstring")
    counts = {s: 0 for s in corpus.SPLITS}
    for i in range(20000):
        counts[corpus.split_of(f"text {i}")] += 1
    assert 150 < counts["test"] < 350 and 150 < counts["validation"] < 350  # ~1.2% each


def test_cache_is_reused(tmp_path, monkeypatch):
    first = corpus.build_python_docs(tmp_path, progress=False, packages=SMALL, max_files=3)
    stamp = (first / "train.jsonl").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(corpus, "_collect", fail)
    assert corpus.build_python_docs(tmp_path, progress=False, packages=SMALL, max_files=3) == first
    assert (first / "train.jsonl").stat().st_mtime_ns == stamp


def test_restrictions_change_the_fingerprint(tmp_path):
    full = corpus.build_python_docs(tmp_path, progress=False, packages=["json"])
    few = corpus.build_python_docs(tmp_path, progress=False, packages=["json"], max_files=1)
    assert full != few
    assert sum(map(len, _all(few).values())) < sum(map(len, _all(full).values()))


def test_cache_root_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "env-root"))
    folder = corpus.build_python_docs(progress=False, packages=["json"], max_files=1)
    assert folder.parent == tmp_path / "env-root" / corpus.PYTHON_DOCS


def test_bad_split_name(tmp_path):
    with pytest.raises(ValueError, match="unknown python-docs split 'dev'.*train, validation, test"):
        corpus.python_docs_split_path("dev", tmp_path)


def test_normalize():
    assert corpus.normalize("  a  \r\n\tb\n\n\n\nc  \n") == "a\n    b\n\nc"


# ----------------------------------------------------------------------------------------
# The shipped snapshot: what every machine reads


def _snapshot_rows(folder=corpus.SNAPSHOT_DIR):
    with lzma.open(folder / corpus.SNAPSHOT_FILE, "rb") as fh:
        data = fh.read()
    return data, [json.loads(line) for line in data.splitlines()]


def _docstring(text):
    """The part of a text its split is computed from: after the ``qualified.name`` header, if any."""
    match = re.match(r"[A-Za-z_][\w.]*\n\n(.*)\Z", text, re.S)
    return match.group(1) if match else text  # pydoc topics have no header


@pytest.fixture(scope="module")
def shipped():
    return _snapshot_rows()


def test_snapshot_manifest_matches_its_content(shipped):
    data, rows = shipped
    manifest = corpus.read_snapshot_manifest()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["bytes"] == len(data)
    size = (corpus.SNAPSHOT_DIR / corpus.SNAPSHOT_FILE).stat().st_size
    assert manifest["xz_bytes"] == size <= 4_000_000
    for split in corpus.SPLITS:
        texts = [r["text"] for r in rows if r["split"] == split]
        assert manifest["splits"][split] == {"texts": len(texts), "chars": sum(map(len, texts))}
    assert {r["split"] for r in rows} == set(corpus.SPLITS) and all(set(r) == {"split", "text"} for r in rows)
    assert manifest["sources"]["stdlib"].startswith("cpython-3.") and "transformers" in manifest["sources"]
    assert len(rows) > 30_000 and all(len(r["text"]) >= corpus.MIN_CHARS for r in rows)


def test_snapshot_splits_are_disjoint_and_assigned_by_text(shipped):
    _, rows = shipped
    docs = {split: set() for split in corpus.SPLITS}
    for row in rows:
        doc = _docstring(row["text"])
        assert corpus.split_of(doc) == row["split"], row["text"][:80]
        assert doc not in docs[row["split"]]  # duplicates were kept once
        docs[row["split"]].add(doc)
    assert not docs["train"] & docs["validation"] and not docs["train"] & docs["test"]
    assert not docs["validation"] & docs["test"]
    assert any(r["text"].startswith("json.dumps\n\nSerialize") for r in rows)


def test_loaded_corpus_is_the_snapshot(shipped, tmp_path, monkeypatch):
    _, rows = shipped
    folder = corpus.python_docs(tmp_path, progress=False)
    manifest = corpus.read_snapshot_manifest()
    assert folder == tmp_path / corpus.PYTHON_DOCS / f"snapshot-{manifest['sha256'][:16]}"
    for split in corpus.SPLITS:
        assert _rows(folder, split) == [r["text"] for r in rows if r["split"] == split]
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert not list(folder.parent.glob(".tmp-*"))
    assert corpus.python_docs_split_path("test", tmp_path) == folder / "test.jsonl"

    def fail(*args, **kwargs):
        raise AssertionError("unpacked again although cached")

    monkeypatch.setattr(corpus, "_unpack", fail)
    assert corpus.python_docs(tmp_path, progress=False) == folder


def test_loaded_corpus_does_not_depend_on_installed_versions(tmp_path, monkeypatch):
    here = corpus.python_docs(tmp_path / "here", progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("the installed documentation was read")

    # Another machine: other versions of everything, and the builder must not even be asked.
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0.0")
    monkeypatch.setattr(corpus, "_version", lambda name: "99.0.0")
    monkeypatch.setattr(corpus, "_sources", fail)
    monkeypatch.setattr(corpus, "_collect", fail)
    monkeypatch.setattr(sys, "version", "3.99.0 (elsewhere)")
    there = corpus.python_docs(tmp_path / "there", progress=False)
    assert here.name == there.name
    for name in (*(f"{s}.jsonl" for s in corpus.SPLITS), "manifest.json"):
        assert (here / name).read_bytes() == (there / name).read_bytes()


def test_builtin_source_reads_the_snapshot(shipped, tmp_path, monkeypatch):
    from potstill.config import DataConfig
    from potstill.data.sources import load_rows

    _, rows = shipped
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "_collect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    ds = load_rows("python-docs", cfg=DataConfig(source="python-docs"), split="validation")
    assert ds["text"] == [r["text"] for r in rows if r["split"] == "validation"]
    assert [p.name for p in (tmp_path / corpus.PYTHON_DOCS).iterdir()][0].startswith("snapshot-")


@pytest.fixture()
def small_snapshot(tmp_path):
    """A snapshot of a small build (the json package), written by the same code as the shipped one."""
    built = corpus.build_python_docs(tmp_path / "build", progress=False, packages=["json"])
    corpus.write_snapshot(built, tmp_path / "snapshot")
    return built, tmp_path / "snapshot"


def test_write_snapshot_round_trips_byte_for_byte(small_snapshot, tmp_path):
    built, snapshot = small_snapshot
    folder = corpus.python_docs(tmp_path / "cache", progress=False, snapshot=snapshot)
    for split in corpus.SPLITS:
        assert (folder / f"{split}.jsonl").read_bytes() == (built / f"{split}.jsonl").read_bytes()
    manifest = corpus.read_snapshot_manifest(snapshot)
    assert manifest["sources"] == {"json": manifest["sources"]["json"]} and manifest["build_fingerprint"] == built.name


def _damage_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_sha(path):
    manifest = json.loads(path.read_text())
    manifest["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, reason", [
    (lambda s: _damage_byte(s / corpus.SNAPSHOT_FILE), "damaged"),
    (lambda s: (s / corpus.SNAPSHOT_FILE).write_bytes((s / corpus.SNAPSHOT_FILE).read_bytes()[:-200]), "damaged"),
    (lambda s: (s / corpus.SNAPSHOT_FILE).write_bytes(lzma.compress(b'{"split": "train", "text": "x"}\n')),
     "damaged"),
    (lambda s: _flip_sha(s / "manifest.json"), "damaged.*sha256"),
    (lambda s: (s / corpus.SNAPSHOT_FILE).unlink(), "missing"),
    (lambda s: (s / "manifest.json").unlink(), "missing"),
    (lambda s: (s / "manifest.json").write_text("{not json"), "unreadable"),
])
def test_damaged_snapshot_is_one_clear_line(small_snapshot, tmp_path, damage, reason):
    _, snapshot = small_snapshot
    damage(snapshot)
    with pytest.raises(DataError, match=f"python-docs: the corpus snapshot.*{reason}.*reinstall potstill") as err:
        corpus.python_docs(tmp_path / "cache", progress=False, snapshot=snapshot)
    assert "\n" not in str(err.value)
    root = tmp_path / "cache" / corpus.PYTHON_DOCS
    assert not root.exists() or not list(root.iterdir())  # nothing half-written left behind


_FIRST_USE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    me, other = Path(sys.argv[2] + "/ready-" + sys.argv[3]), Path(sys.argv[2] + "/ready-" + sys.argv[4])
    me.touch()
    while not other.exists():  # start unpacking at the same moment as the other process
        time.sleep(0.001)
    from potstill.data.corpus import python_docs
    print(python_docs(sys.argv[1], progress=False))
""")


def test_concurrent_first_use_from_two_processes(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", "import potstill.data.corpus\n" + _FIRST_USE, str(cache),
                               str(tmp_path), a, b], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for a, b in (("0", "1"), ("1", "0"))]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    folder = type(tmp_path)(paths.pop())
    manifest = corpus.read_snapshot_manifest()
    data = b"".join(
        (json.dumps({"split": s, "text": t}, ensure_ascii=False) + "\n").encode() for s in corpus.SPLITS
        for t in _rows(folder, s))
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    assert sorted(p.name for p in (cache / corpus.PYTHON_DOCS).iterdir()) == [folder.name]  # no temporary left
