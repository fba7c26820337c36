"""The python-docs corpus, built from real files on a small restricted set of packages."""

from __future__ import annotations

import json

import pytest

from potstill.data import corpus

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
