"""Full and read-only disks: one line, no half-written state, and the run resumes once space is freed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import potstill
from potstill.errors import RunDirError
from potstill.training.metrics import read_metrics

from mounts import fill, free_bytes, remount, tmpfs
from tiny import run_cli, run_config


def _config(out: Path, teacher_dir: Path, data: Path, **train) -> dict:
    return run_config(out, teacher_dir, data, **{"checkpoint_every": 2, "keep_checkpoints": 3, **train})


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_full_disk_is_one_line_and_the_run_resumes_after_space_is_freed(tmp_path, teacher_dir, text_jsonl):
    straight = potstill.distill(_config(tmp_path / "straight", teacher_dir, text_jsonl), progress=False)
    one_checkpoint = _tree_bytes(tmp_path / "straight" / "checkpoints" / "step-000002")

    with tmpfs(tmp_path / "disk", "64m") as disk:
        run = disk / "run"
        cfg_path = tmp_path / "run.yaml"
        cfg_path.write_text(yaml.safe_dump(_config(run, teacher_dir, text_jsonl)))
        # Room for the run's small files and one checkpoint and a half: the second checkpoint cannot fit.
        filler = fill(disk, leave=int(one_checkpoint * 1.5) + 256 * 1024)
        proc = run_cli("distill", cfg_path, "--no-progress", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        [line] = [x for x in proc.stderr.splitlines() if x.startswith("potstill: error:")]
        assert "no space left on the device" in line and "train.resume=auto" in line, line
        ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert ckpts == ["step-000002"], ckpts  # no partial checkpoint left behind
        assert not list(run.rglob(".tmp*")) and not list(run.rglob(".*.tmp-*"))
        assert "step-000002" in line

        filler.unlink()  # free the space, resume: the same result as the run that never failed
        resumed = run_cli("distill", cfg_path, "train.resume=auto", "--no-progress", check=False)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        a, b = load_file(str(run / "student" / "model.safetensors")), load_file(
            str(tmp_path / "straight" / "student" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
        losses = [[(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
                  for d in (run, tmp_path / "straight")]
        assert losses[0] == losses[1] and straight.steps == 6


def test_read_only_output_is_one_line_and_writes_nothing(tmp_path, teacher_dir, text_jsonl):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        (disk / "mine.txt").write_text("the user's file")
        remount(disk, "ro")
        try:
            with pytest.raises(RunDirError) as err:
                potstill.distill(_config(disk / "run", teacher_dir, text_jsonl), progress=False)
            assert "read-only" in str(err.value) and "\n" not in str(err.value)
            assert sorted(p.name for p in disk.iterdir()) == ["mine.txt"]
        finally:
            remount(disk, "rw")


def test_disk_full_while_saving_the_student_leaves_no_temporary(tmp_path, teacher_dir, text_jsonl, monkeypatch):
    """The failure can come at any write; the student folder is published whole or not at all."""
    import potstill.training.loop as loop

    with tmpfs(tmp_path / "disk", "64m") as disk:
        run = disk / "run"
        original = loop.publish_student

        def publish_on_a_full_disk(run_dir, *args, **kwargs):
            fill(disk, leave=0)
            return original(run_dir, *args, **kwargs)

        monkeypatch.setattr(loop, "publish_student", publish_on_a_full_disk)
        with pytest.raises(RunDirError) as err:
            potstill.distill(_config(run, teacher_dir, text_jsonl, max_steps=2), progress=False)
        assert "no space left" in str(err.value)
        assert not (run / "student").exists() and not (run / ".tmp-student").exists()
        assert not (run / "summary.json").exists()
        (disk / "filler.bin").unlink()
        monkeypatch.undo()
        assert free_bytes(disk) > 1_000_000
        result = potstill.distill(_config(run, teacher_dir, text_jsonl, max_steps=2), progress=False,
                                  overrides=["train.resume=auto"])
        assert (run / "student" / "model.safetensors").is_file() and result.final_eval
        shutil.rmtree(run)
