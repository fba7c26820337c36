"""Never lose a run, part 2: a damaged newest checkpoint is set aside and the run resumes from the
one before it, to the same result; overwrite and output.dir mistakes are one line, before any model loads."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import tiny
from tiny import run_config
import torch
import yaml
from safetensors.torch import load_file

import potstill
from potstill.ownership import mark_owned
from potstill.training import checkpoint as ckpt
from potstill.training.metrics import read_metrics


def _config(out: Path, teacher_dir: Path, data: Path, **train) -> dict:
    return run_config(out, teacher_dir, data, loss={"logits": {"temperature": 1.5}, "ce": {"weight": 0.2}},
                      eval={"every": 4, "max_batches": 1},
                      **{"max_steps": 8, "batch_size": 3, "grad_accum": 2, "checkpoint_every": 2, "keep_checkpoints": 3,
                         "warmup_steps": 2, **train})


def _interrupt_after(model, calls: int):
    """Let the model's decoder run ``calls`` times, then raise KeyboardInterrupt (as Ctrl-C would)."""
    decoder = model.get_decoder()
    original = decoder.forward
    left = [calls]

    @functools.wraps(original)
    def forward(*args, **kwargs):
        left[0] -= 1
        if left[0] < 0:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    decoder.forward = forward
    return model


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_damaged_newest_checkpoint_is_set_aside_and_the_run_ends_as_if_uninterrupted(
        tmp_path, teacher_dir, text_jsonl, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    potstill.distill(_config(tmp_path / "straight", teacher_dir, text_jsonl), progress=False)

    # The same run, stopped during step 7 (2 micro-batches a step, 1 eval batch at steps 0 and 4: 14 teacher calls).
    stopped = _config(tmp_path / "run", teacher_dir, text_jsonl)
    stopped["teacher"] = {"name_or_path": _interrupt_after(AutoModelForCausalLM.from_pretrained(teacher_dir), 14),
                          "tokenizer": AutoTokenizer.from_pretrained(teacher_dir)}
    try:
        potstill.distill(stopped, progress=False)
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    run = tmp_path / "run"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]

    # The disk damages the newest checkpoint (e.g. a copy cut short).
    optimizer = ckpt.final_checkpoint_dir(run, 6) / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[:1200])

    with caplog.at_level(logging.INFO, logger="potstill"):
        resumed = potstill.distill(_config(run, teacher_dir, text_jsonl), overrides=["train.resume=auto"],
                                   progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "damaged" in r.getMessage()]
    assert len(warnings) == 1
    assert f"step-000006 is damaged (optimizer.pt is truncated (1200 of {size} bytes))" in warnings[0]
    assert "resuming from step-000004 instead" in warnings[0]
    assert any("resumed from" in r.getMessage() and "step-000004" in r.getMessage() for r in caplog.records)

    # Kept for inspection, never resumed nor pruned; the run ends exactly as the uninterrupted one.
    damaged = run / "checkpoints" / "damaged-step-000006"
    assert (damaged / "optimizer.pt").stat().st_size == 1200
    assert resumed.steps == 8
    assert _losses(run) == _losses(tmp_path / "straight")
    a, b = (load_file(str(r / "student" / "model.safetensors")) for r in (tmp_path / "straight", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("potstill: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_overwrite_refuses_to_delete_the_student_it_would_load(tmp_path, teacher_dir, student_dir, text_jsonl):
    """output.overwrite=true with student.name_or_path=<run>/student: one line, the student untouched."""
    run = tmp_path / "run"
    mark_owned(run, "run")
    shutil.copytree(student_dir, run / "student")
    (run / "summary.json").write_text(json.dumps({"steps": 8}))
    before = {p.name: p.read_bytes() for p in (run / "student").iterdir()}
    cfg = _config(run, teacher_dir, text_jsonl)
    cfg["student"] = {"name_or_path": str(run / "student")}
    cfg["output"]["overwrite"] = True
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    line = _one_error_line(tiny.run_cli("distill", cfg_path, "--no-progress", check=False))
    assert f"output.overwrite=true would delete {run / 'student'}, but student.name_or_path=" in line
    assert f"copy it out of {run} first" in line
    assert {p.name: p.read_bytes() for p in (run / "student").iterdir()} == before
    assert (run / "summary.json").is_file()


def test_output_dir_that_is_a_file_is_one_line(tmp_path, teacher_dir, text_jsonl):
    target = tmp_path / "run"
    target.write_text("my notes")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(target, teacher_dir, text_jsonl)))
    line = _one_error_line(tiny.run_cli("distill", cfg_path, "--no-progress", check=False))
    assert f"output.dir {target} is a file, not a folder: choose another output.dir" in line
    assert target.read_text() == "my notes"
