"""potstill.ownership: the mark of what potstill wrote (and may replace), and path relations."""

from __future__ import annotations

import json

import pytest

from potstill.errors import RunDirError
from potstill.ownership import (
    MARK_FILE,
    is_within,
    local_paths,
    mark_owned,
    owner_kind,
    require_owned,
)
from potstill.version import __version__


def test_mark_creates_the_folder_and_records_kind_and_version(tmp_path):
    folder = tmp_path / "a" / "run"
    mark_owned(folder, "run")
    data = json.loads((folder / MARK_FILE).read_text())
    assert data["kind"] == "run" and data["potstill_version"] == __version__ and data["created"]
    assert owner_kind(folder) == "run"
    assert sorted(p.name for p in folder.iterdir()) == [MARK_FILE]  # no temporary file left


def test_mark_is_idempotent_and_keeps_the_first_record(tmp_path):
    mark_owned(tmp_path, "cache")
    first = (tmp_path / MARK_FILE).read_bytes()
    mark_owned(tmp_path, "cache")
    assert (tmp_path / MARK_FILE).read_bytes() == first


def test_mark_of_another_kind_replaces_it(tmp_path):
    mark_owned(tmp_path, "cache")
    mark_owned(tmp_path, "export")
    assert owner_kind(tmp_path) == "export"


def test_unknown_kind_is_a_bug(tmp_path):
    with pytest.raises(ValueError, match="unknown ownership kind 'model'"):
        mark_owned(tmp_path, "model")
    assert not (tmp_path / MARK_FILE).exists()


@pytest.mark.parametrize("content", [None, "", "not json", "[1, 2]", '{"kind": "model"}', '{"no": "kind"}'])
def test_owner_kind_is_none_for_absent_damaged_or_foreign_marks(tmp_path, content):
    if content is not None:
        (tmp_path / MARK_FILE).write_text(content)
    assert owner_kind(tmp_path) is None


def test_owner_kind_of_a_missing_folder_is_none(tmp_path):
    assert owner_kind(tmp_path / "absent") is None


def test_require_owned_passes_for_the_same_kind(tmp_path):
    mark_owned(tmp_path, "cache")
    require_owned(tmp_path, "cache", what="cache.dir")


def test_require_owned_refuses_an_unmarked_folder_in_one_line(tmp_path):
    with pytest.raises(RunDirError) as err:
        require_owned(tmp_path, "cache", what="cache.dir")
    assert str(err.value) == (f"cache.dir {tmp_path} was not written by potstill: potstill replaces only its own "
                              "output; choose another cache.dir or move the folder away yourself")


def test_require_owned_refuses_another_kind(tmp_path):
    mark_owned(tmp_path, "run")
    with pytest.raises(RunDirError, match=f"export {tmp_path} holds a potstill run, not an? export"):
        require_owned(tmp_path, "export", what="export")


def test_is_within(tmp_path):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    assert is_within(run, run)
    assert is_within(run / "student", run)
    assert is_within(run / "student" / "not-yet-there.bin", run)
    assert is_within(tmp_path / "other" / ".." / "run" / "student", run)  # ".." resolved
    assert not is_within(tmp_path / "run-2", run)  # a sibling with the same prefix is not inside
    assert not is_within(tmp_path, run)


def test_is_within_resolves_symlinks(tmp_path):
    real = tmp_path / "models" / "student"
    real.mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "student").symlink_to(real, target_is_directory=True)
    assert is_within(real, run / "student")  # the link's target is what would be deleted through it
    assert is_within(run / "student", tmp_path / "models")
    assert not is_within(real, run)


def test_local_paths_keeps_only_what_exists_on_disk(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    assert local_paths(str(data)) == [data]
    assert local_paths(data) == [data]
    assert local_paths([str(data), "Qwen/Qwen2.5-0.5B", str(tmp_path / "absent")]) == [data]
    assert local_paths(("a-hub-id", str(tmp_path))) == [tmp_path]
    assert local_paths(None) == [] and local_paths(object()) == [] and local_paths(["x" * 5000]) == []
