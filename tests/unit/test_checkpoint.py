"""Atomic writes (potstill.atomic), the run lock, and which checkpoints count as complete."""

from __future__ import annotations

import pytest

from potstill import atomic
from potstill.training import checkpoint as ckpt
from potstill.errors import RunDirError


def test_atomic_write_leaves_no_temp(tmp_path):
    target = tmp_path / "f.json"
    atomic.atomic_write_text(target, "one")
    atomic.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_lock_is_exclusive_and_released(tmp_path):
    with ckpt.RunLock(tmp_path):
        with pytest.raises(RunDirError, match=r"is in use by pid \d+"):
            ckpt.RunLock(tmp_path).acquire()
    ckpt.RunLock(tmp_path).acquire().release()


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path):
    for step in (10, 20, 30):
        d = ckpt.final_checkpoint_dir(tmp_path, step)
        d.mkdir(parents=True)
        (d / ckpt.STATE_FILE).write_text("{}")
    (ckpt.final_checkpoint_dir(tmp_path, 40)).mkdir()  # no state.json: half-written by an old version
    ckpt.temp_checkpoint_dir(tmp_path, 50).mkdir()  # killed while writing
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 20, 30]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000030"
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20, 30]
    assert not ckpt.temp_checkpoint_dir(tmp_path, 50).exists()


def test_publish_replaces_atomically(tmp_path):
    final = tmp_path / "out"
    for text in ("a", "b"):
        tmp = tmp_path / ".tmp"
        tmp.mkdir()
        (tmp / "x").write_text(text)
        atomic.publish_dir(tmp, final)
    assert (final / "x").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
