"""Resuming with changed settings uses the new values where allowed and refuses the rest before loading;
a finished run re-run changes nothing; a run stopped after its last checkpoint completes without duplicates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import potstill
import potstill.training.loop as loop
import potstill.training.setup as setup
from potstill.errors import ConfigError
from potstill.training.metrics import read_metrics
from tiny import run_config


def _config(out: Path, teacher_dir: Path, data: Path, **train) -> dict:
    return run_config(out, teacher_dir, data, **{"checkpoint_every": 3, "warmup_steps": 1, **train})


def _lr_schedule(lr: float, max_steps: int, warmup: int, kind: str = "cosine") -> list[float]:
    """lr after each of steps 1..max_steps, from transformers' own schedule on a fresh optimizer."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=max_steps)
    out = []
    for _ in range(max_steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def _train_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def _listing(run: Path) -> list:
    """Every file and folder of the run with its modification time (the lock file, which records
    the pid of whoever holds it, aside)."""
    return sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.name != ".potstill.lock")


def _contents(run: Path) -> dict:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".potstill.lock"}


def test_lower_lr_and_longer_schedule_on_resume_are_used(tmp_path, teacher_dir, text_jsonl):
    run = tmp_path / "run"
    potstill.distill(_config(run, teacher_dir, text_jsonl), progress=False)
    before = _train_records(run)
    # The advice after a divergence: resume with a lower learning rate. Here also a longer run.
    result = potstill.distill(_config(run, teacher_dir, text_jsonl), progress=False,
                              overrides=["train.resume=auto", "train.lr=5e-4", "train.max_steps=10",
                                         "train.scheduler=linear"])
    assert result.steps == 10
    after = _train_records(run)
    assert sorted(after) == list(range(1, 11))
    assert all(after[s]["loss"] == before[s]["loss"] for s in range(1, 7))  # history kept as it was
    expected = _lr_schedule(5e-4, 10, 1, "linear")
    for s in range(7, 11):
        assert after[s]["lr"] == pytest.approx(expected[s - 1], rel=1e-12), s
    # The checkpoint of the longer run records the new settings.
    state = json.loads((run / "checkpoints" / "step-000010" / "state.json").read_text())
    assert state["config"]["train"]["lr"] == 5e-4 and state["max_steps"] == 10


def test_the_optimizer_uses_the_new_lr(tmp_path, teacher_dir, text_jsonl, monkeypatch):
    """Not only the logged value: the AdamW param groups hold the new schedule's lr when stepping."""
    run = tmp_path / "run"
    potstill.distill(_config(run, teacher_dir, text_jsonl, max_steps=3), progress=False)
    seen = []
    original = loop.train_step

    def spy(run_, batches, step, last_good):
        seen.append([g["lr"] for g in run_.optimizer.param_groups])
        return original(run_, batches, step, last_good)

    monkeypatch.setattr(loop, "train_step", spy)
    potstill.distill(_config(run, teacher_dir, text_jsonl, max_steps=3), progress=False,
                     overrides=["train.resume=auto", "train.lr=1e-5", "train.max_steps=5", "train.scheduler=constant"])
    assert seen == [[1e-5] * len(seen[0])] * 2


def test_keys_that_cannot_change_are_refused_before_any_model_loads(tmp_path, teacher_dir, text_jsonl, monkeypatch):
    run = tmp_path / "run"
    potstill.distill(_config(run, teacher_dir, text_jsonl, max_steps=3), progress=False)
    listing = _listing(run)

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(setup, "load_models", no_models)
    with pytest.raises(ConfigError) as err:
        potstill.distill(_config(run, teacher_dir, text_jsonl, max_steps=5), progress=False,
                         overrides=["train.resume=auto", "train.batch_size=3", "train.seed=7", "data.max_length=40"])
    message = str(err.value)
    assert "\n" not in message
    for key in ("train.batch_size (2 -> 3)", "train.seed (0 -> 7)", "data.max_length (48 -> 40)"):
        assert key in message, message
    assert "train.max_steps" not in message  # allowed, not named
    # The same data file by another spelling of its path is not a change.
    from potstill.config import as_config, config_to_dict
    from potstill.training.resume import config_changes

    saved = json.loads((run / "checkpoints" / "step-000003" / "state.json").read_text())["config"]
    same = as_config(_config(run, teacher_dir, text_jsonl, max_steps=3),
                     [f"data.source={Path(os.path.relpath(text_jsonl))}"])
    assert config_changes(saved, same) == {}
    # A teacher section given on one side only (a served teacher added on resume) is a change of the
    # section, which no allowed key covers; its url alone may change between two served runs.
    served = as_config(_config(run, teacher_dir, text_jsonl, max_steps=3),
                       ["teacher.server.url=http://127.0.0.1:1", "loss.logits.temperature=1"])
    assert "teacher.server" in config_changes(saved, served)
    from potstill.training.resume import MAY_CHANGE

    assert "teacher.server" not in MAY_CHANGE and "teacher.server.url" in MAY_CHANGE
    assert "teacher.server" in config_changes(config_to_dict(served), same)
    assert _listing(run) == listing


def test_finished_run_rerun_changes_nothing(tmp_path, teacher_dir, text_jsonl, monkeypatch):
    run = tmp_path / "run"
    first = potstill.distill(_config(run, teacher_dir, text_jsonl, max_steps=3), progress=False)
    files = _contents(run)

    monkeypatch.setattr(setup, "load_models", lambda *a, **k: pytest.fail("a finished run loaded its models"))
    again = potstill.distill(_config(run, teacher_dir, text_jsonl, max_steps=3), progress=False,
                             overrides=["train.resume=auto"])
    assert again.steps == 3 and again.final_eval == first.final_eval
    assert _contents(run) == files


def test_run_stopped_after_its_last_checkpoint_completes_without_duplicates(tmp_path, teacher_dir, text_jsonl,
                                                                            monkeypatch):
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the final checkpoint, before the student is saved

    monkeypatch.setattr(loop, "publish_student", killed)
    with pytest.raises(KeyboardInterrupt):
        potstill.distill(_config(run, teacher_dir, text_jsonl), progress=False)
    assert (run / "checkpoints" / "step-000006" / "state.json").is_file()
    assert not (run / "summary.json").exists()
    monkeypatch.undo()

    result = potstill.distill(_config(run, teacher_dir, text_jsonl), progress=False, overrides=["train.resume=auto"])
    records = read_metrics(run / "metrics.jsonl")
    keys = [(r["step"], "loss" in r, any(k.startswith("eval/") for k in r)) for r in records]
    assert len(keys) == len(set(keys)), keys  # no record twice
    assert [r["step"] for r in records if any(k.startswith("eval/") for k in r)] == [0, 6]  # before training, at the end
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval"] == result.final_eval and summary["final_eval"]["ppl"] > 1
    assert summary["train"]["loss"] == _train_records(run)[6]["loss"]
    assert (run / "student" / "model.safetensors").is_file()
