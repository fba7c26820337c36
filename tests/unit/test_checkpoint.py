"""Atomic writes (potstill.atomic), the run lock, which checkpoints count as complete and intact
(verification, falling back past damaged ones), and what a killed save, publish or prune leaves behind."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time

import pytest
import tiny
import torch

from potstill import atomic
from potstill.errors import RunDirError
from potstill.training import checkpoint as ckpt


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


# ----------------------------------------------------------------------------------------
# Verified checkpoints: real ones, written by the functions the loop uses, then damaged.

@pytest.fixture(scope="module")
def trainee():
    """A tiny model with a stepped optimizer (so optimizer.pt holds state) and a schedule."""
    model = tiny.build_llama(None, 64, hidden_size=16, layers=1, heads=2, intermediate=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def save(run_dir, step, trainee, tokenizer=None, ranks=2, extra=None):
    """One checkpoint as save_checkpoint writes it: every rank's RNG, then the main state, published."""
    model, optimizer, scheduler = trainee
    tmp = ckpt.temp_checkpoint_dir(run_dir, step)
    for rank in range(ranks):
        ckpt.write_process_state(tmp, rank)
    ckpt.write_main_state(tmp, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                          state={"step": step, "max_steps": 8}, extra_modules=extra)
    final = ckpt.final_checkpoint_dir(run_dir, step)
    atomic.publish_dir(tmp, final)
    return final


def _truncate(path, keep=None):
    data = path.read_bytes()
    keep = len(data) // 2 if keep is None else keep
    path.write_bytes(data[:keep])
    return keep, len(data)


def _flip(path, at=None):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_state_json_lists_every_file_with_size_and_sha256(tmp_path, trainee, tokenizer):
    path = save(tmp_path, 2, trainee, tokenizer, extra={"projectors": torch.nn.Linear(2, 2)})
    files = json.loads((path / ckpt.STATE_FILE).read_text())[ckpt.FILES_KEY]
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted(files) == [f for f in on_disk if f != ckpt.STATE_FILE]
    assert {"optimizer.pt", "scheduler.pt", "rng-0.pt", "rng-1.pt", "projectors.pt", "student/model.safetensors",
            "student/config.json", "student/tokenizer.json"} <= set(files)
    import hashlib
    record = files["optimizer.pt"]
    data = (path / "optimizer.pt").read_bytes()
    assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path) is None


def _damage_weights_truncated(path):
    keep, size = _truncate(path / "student" / "model.safetensors")
    return f"student/model.safetensors is truncated ({keep} of {size} bytes)"


def _damage_optimizer_truncated(path):
    _, size = _truncate(path / "optimizer.pt", keep=1200)
    return f"optimizer.pt is truncated (1200 of {size} bytes)"


def _damage_scheduler_missing(path):
    (path / "scheduler.pt").unlink()
    return "scheduler.pt is missing"


def _damage_rng_truncated(path):
    keep, size = _truncate(path / "rng-1.pt")
    return f"rng-1.pt is truncated ({keep} of {size} bytes)"


def _damage_rng_missing(path):
    (path / "rng-0.pt").unlink()
    return "rng-0.pt is missing"


def _damage_state_invalid(path):
    _truncate(path / ckpt.STATE_FILE)
    return "state.json is not valid JSON"


def _damage_state_missing(path):
    (path / ckpt.STATE_FILE).unlink()
    return "state.json is missing"


def _damage_weights_flipped(path):
    _flip(path / "student" / "model.safetensors")
    return "student/model.safetensors checksum differs"


def _damage_projectors_flipped(path):
    _flip(path / "projectors.pt")
    return "projectors.pt checksum differs"


def _damage_tokenizer_grown(path):
    target = path / "student" / "tokenizer_config.json"
    size = target.stat().st_size
    with open(target, "ab") as fh:
        fh.write(b" ")
    return f"student/tokenizer_config.json is longer than recorded ({size + 1} bytes, {size} expected)"


@pytest.mark.parametrize("damage", [
    _damage_weights_truncated, _damage_optimizer_truncated, _damage_scheduler_missing, _damage_rng_truncated,
    _damage_rng_missing, _damage_state_invalid, _damage_state_missing, _damage_weights_flipped,
    _damage_projectors_flipped, _damage_tokenizer_grown])
def test_verify_names_what_is_damaged(tmp_path, trainee, tokenizer, damage):
    path = save(tmp_path, 4, trainee, tokenizer, extra={"projectors": torch.nn.Linear(2, 2)})
    assert ckpt.verify_checkpoint(path) is None
    expected = damage(path)
    assert ckpt.verify_checkpoint(path) == expected


def _make_legacy(path):
    """As written before verification: state.json without the file list."""
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    del state[ckpt.FILES_KEY]
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))


def test_legacy_checkpoint_is_accepted_when_its_files_load(tmp_path, trainee):
    path = save(tmp_path, 2, trainee)
    _make_legacy(path)
    assert ckpt.verify_checkpoint(path) is None


@pytest.mark.parametrize("target, expected", [
    ("optimizer.pt", "optimizer.pt does not load"),
    ("rng-1.pt", "rng-1.pt does not load"),
    ("student/model.safetensors", "student/model.safetensors does not load"),
])
def test_legacy_checkpoint_with_a_truncated_file_is_damaged(tmp_path, trainee, target, expected):
    path = save(tmp_path, 2, trainee)
    _make_legacy(path)
    _truncate(path / target)
    assert ckpt.verify_checkpoint(path).startswith(expected)


def test_legacy_checkpoint_with_a_missing_file_is_damaged(tmp_path, trainee):
    path = save(tmp_path, 2, trainee)
    _make_legacy(path)
    (path / "scheduler.pt").unlink()
    assert ckpt.verify_checkpoint(path) == "scheduler.pt is missing"


def test_find_resumable_falls_back_and_sets_the_damaged_one_aside(tmp_path, trainee, caplog):
    for step in (2, 4, 6):
        save(tmp_path, step, trainee)
    _truncate(ckpt.final_checkpoint_dir(tmp_path, 6) / "optimizer.pt", keep=1200)
    _flip(ckpt.final_checkpoint_dir(tmp_path, 4) / "student" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="potstill"):
        found = ckpt.find_resumable(tmp_path)
    assert found == ckpt.final_checkpoint_dir(tmp_path, 2)
    root = tmp_path / ckpt.CHECKPOINT_DIR
    assert sorted(p.name for p in root.iterdir()) == ["damaged-step-000004", "damaged-step-000006", "step-000002"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "step-000006 is damaged (optimizer.pt is truncated (1200 of" in warnings[0]
    assert "resuming from step-000002 instead" in warnings[0] and "damaged-step-000006" in warnings[0]
    assert "step-000004 is damaged (student/model.safetensors checksum differs)" in warnings[1]
    # The damaged ones are kept whole, and pruning never touches them.
    assert (root / "damaged-step-000006" / "optimizer.pt").stat().st_size == 1200
    save(tmp_path, 8, trainee)
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["damaged-step-000004", "damaged-step-000006", "step-000008"]


def test_set_aside_adds_a_suffix_when_the_name_is_taken(tmp_path, trainee):
    save(tmp_path, 2, trainee)
    root = tmp_path / ckpt.CHECKPOINT_DIR
    (root / "damaged-step-000004").mkdir()
    (root / "damaged-step-000004" / "earlier").write_text("kept")
    bad = save(tmp_path, 4, trainee)
    (bad / "scheduler.pt").unlink()
    assert ckpt.find_resumable(tmp_path).name == "step-000002"
    assert (root / "damaged-step-000004" / "earlier").read_text() == "kept"
    assert (root / "damaged-step-000004-2" / "optimizer.pt").is_file()


def test_find_resumable_without_set_aside_changes_nothing(tmp_path, trainee):
    save(tmp_path, 2, trainee)
    (save(tmp_path, 4, trainee) / "scheduler.pt").unlink()
    assert ckpt.find_resumable(tmp_path, set_aside=False).name == "step-000002"
    assert ckpt.final_checkpoint_dir(tmp_path, 4).is_dir()


def test_a_step_folder_without_state_json_counts_as_damaged(tmp_path, trainee):
    save(tmp_path, 2, trainee)
    ckpt.final_checkpoint_dir(tmp_path, 4).mkdir()
    assert ckpt.find_resumable(tmp_path).name == "step-000002"
    assert (tmp_path / ckpt.CHECKPOINT_DIR / "damaged-step-000004").is_dir()


def test_every_checkpoint_damaged_is_one_line_and_nothing_moves(tmp_path, trainee):
    for step in (2, 4):
        _truncate(save(tmp_path, step, trainee) / "optimizer.pt", keep=1200)
    with pytest.raises(RunDirError) as err:
        ckpt.find_resumable(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "every checkpoint in" in message and "step-000004: optimizer.pt is truncated (1200 of" in message
    assert "step-000002: optimizer.pt is truncated" in message and "output.overwrite=true" in message
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]


def test_find_resumable_without_checkpoints_is_none(tmp_path):
    assert ckpt.find_resumable(tmp_path) is None


# ----------------------------------------------------------------------------------------
# Leftovers of a killed save, publish or prune


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_leftovers_removes_or_restores_each_kind(tmp_path):
    run, root = tmp_path, tmp_path / ckpt.CHECKPOINT_DIR
    dead = _dead_pid()
    for rel in ("checkpoints/step-000004", "checkpoints/.tmp-step-000006", "checkpoints/.trash-step-000002",
                "checkpoints/.old-step-000004-77", "checkpoints/.old-step-000008-77", "checkpoints/damaged-step-000003",
                ".tmp-projectors", "student", "projectors", ".old-student-77", ".old-projectors-77", ".tmp-mine"):
        (run / rel).mkdir(parents=True)
        (run / rel / "file").write_text(rel)
    keep_files = {"notes.txt": "mine", ".potstill.lock": "pid 1", ".potstill-owned": "{}",
                  f".summary.json.tmp-{os.getppid()}": "being written by a live process"}
    for name, text in keep_files.items():
        (run / name).write_text(text)
    (run / f".config.yaml.tmp-{dead}").write_text("stale")
    (root / f".state.json.tmp-{dead}").write_text("stale")

    done = ckpt.clean_leftovers(run)

    assert sorted(p.name for p in root.iterdir()) == ["damaged-step-000003", "step-000004", "step-000008"]
    # The kill fell between publish_dir's two renames and no new version is there: the old one is put back.
    assert (root / "step-000008" / "file").read_text() == "checkpoints/.old-step-000008-77"
    assert (root / "step-000004" / "file").read_text() == "checkpoints/step-000004"
    assert (run / "projectors" / "file").read_text() == "projectors"
    assert (run / "student" / "file").read_text() == "student"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoints", "student", "projectors", ".tmp-mine", *keep_files])
    for name, text in keep_files.items():
        assert (run / name).read_text() == text
    assert "restored step-000008 from .old-step-000008-77" in done
    assert ckpt.clean_leftovers(run) == []


def test_a_publish_killed_between_its_renames_is_completed_with_the_new_version(tmp_path, trainee):
    """publish_dir(tmp, X) renames X to .old-X-PID, then tmp to X: a kill in between leaves both folders."""
    final = save(tmp_path, 8, trainee)
    final.rename(final.with_name(".old-step-000008-77"))
    tmp = ckpt.temp_checkpoint_dir(tmp_path, 8)
    ckpt.write_process_state(tmp, 0)
    ckpt.write_process_state(tmp, 1)
    model, optimizer, scheduler = trainee
    ckpt.write_main_state(tmp, model=model, tokenizer=None, optimizer=optimizer, scheduler=scheduler,
                          state={"step": 8, "max_steps": 8, "second": True})
    (tmp_path / ".old-student-77").mkdir()
    (tmp_path / ".old-student-77" / "model.safetensors").write_text("old")
    (tmp_path / ".tmp-student").mkdir()
    (tmp_path / ".tmp-student" / "model.safetensors").write_text("new")

    done = ckpt.clean_leftovers(tmp_path)

    assert sorted(done) == ["published step-000008 from .tmp-step-000008", "published student from .tmp-student"]
    assert ckpt.read_state(final)["second"] is True and ckpt.verify_checkpoint(final) is None
    assert (tmp_path / "student" / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "student"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000008"]


def test_an_unverified_new_version_is_not_published_the_old_one_is_restored(tmp_path, trainee):
    final = save(tmp_path, 8, trainee)
    final.rename(final.with_name(".old-step-000008-77"))
    ckpt.temp_checkpoint_dir(tmp_path, 8).mkdir()  # no state.json: not a complete checkpoint
    assert ckpt.clean_leftovers(tmp_path) == ["restored step-000008 from .old-step-000008-77",
                                              "removed checkpoints/.tmp-step-000008"]
    assert ckpt.find_resumable(tmp_path) == final


def test_interrupted_prune_leaves_the_newest_checkpoint_and_a_trash_folder(tmp_path, trainee, monkeypatch):
    for step in (2, 4):
        save(tmp_path, step, trainee)
    real_remove = ckpt._remove

    def killed(path):  # the process dies after the rename, while deleting
        (path / "optimizer.pt").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_remove", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(tmp_path, keep=1)
    monkeypatch.setattr(ckpt, "_remove", real_remove)
    root = tmp_path / ckpt.CHECKPOINT_DIR
    assert sorted(p.name for p in root.iterdir()) == [".trash-step-000002", "step-000004"]
    assert ckpt.clean_leftovers(tmp_path) == ["removed checkpoints/.trash-step-000002"]
    assert ckpt.find_resumable(tmp_path).name == "step-000004"
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]


_WRITER = r"""
import itertools, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from potstill import atomic
from potstill.training import checkpoint as ckpt

class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(512, 1024))
    def save_pretrained(self, path, safe_serialization=True):
        path.mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach()}, str(path / "model.safetensors"))

run = Path(sys.argv[1])
model = Student()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model.w.grad = torch.ones_like(model.w)
opt.step()
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
ckpt.clean_leftovers(run)
latest = ckpt.find_resumable(run)
start = ckpt.read_state(latest)["step"] if latest else 0
for step in itertools.count(start + 1):
    for _ in range(1 + step % 2):  # odd steps are saved twice: publish_dir replaces a checkpoint (".old-")
        tmp = ckpt.temp_checkpoint_dir(run, step)
        ckpt.write_process_state(tmp, 0)
        ckpt.write_process_state(tmp, 1)
        ckpt.write_main_state(tmp, model=model, tokenizer=None, optimizer=opt, scheduler=sched, state={"step": step})
        atomic.publish_dir(tmp, ckpt.final_checkpoint_dir(run, step))
        ckpt.prune_checkpoints(run, keep=1)
        print(step, flush=True)
"""


def test_kill_9_during_saves_and_prunes_always_leaves_a_verified_checkpoint(tmp_path):
    """A real process saving and pruning (keep_checkpoints=1) is killed at random moments; each time
    the next start finds an intact checkpoint at least as new as the last one it reported, and nothing damaged."""
    rng = random.Random(12)
    last_published = 0
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        first = proc.stdout.readline()
        assert first, "the writer ended before saving"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        rest = proc.communicate()[0]
        last_published = int((first + rest).split()[-1])
        ckpt.clean_leftovers(tmp_path)
        found = ckpt.find_resumable(tmp_path)
        assert found is not None and ckpt.verify_checkpoint(found) is None
        assert ckpt.read_state(found)["step"] >= last_published
        names = [p.name for p in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir()]
        assert not [n for n in names if n.startswith("damaged-")], names
