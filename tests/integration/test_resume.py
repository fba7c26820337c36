"""Never lose a run: resume equals uninterrupted, a killed run continues, NaN keeps the last good state."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import potstill
import potstill.training.checkpoint
from potstill.errors import DivergedError
from potstill.training.metrics import read_metrics
from tiny import kill_at_checkpoint, run_config


def _config(out: Path, teacher_dir: Path, data: Path, **train) -> dict:
    return run_config(out, teacher_dir, data, loss={"logits": {"temperature": 1.5}, "ce": {"weight": 0.2}},
                      eval={"every": 4, "max_batches": 1},
                      **{"max_steps": 8, "batch_size": 3, "grad_accum": 2, "checkpoint_every": 4, "keep_checkpoints": 3,
                         "warmup_steps": 2, **train})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def patch_decoder(model, calls: int, after):
    """Let the model's decoder run ``calls`` times, then hand its output to ``after``.

    Patched at the decoder, which both loss paths (chunked and plain) go through.
    """
    decoder = model.get_decoder()
    original = decoder.forward
    left = [calls]

    @functools.wraps(original)
    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        left[0] -= 1
        return after(out) if left[0] < 0 else out

    decoder.forward = forward
    return model


def _interrupt(_out):
    raise KeyboardInterrupt  # as if the user pressed Ctrl-C


def _nan(out):
    out.last_hidden_state = torch.full_like(out.last_hidden_state, float("nan"))
    return out


@pytest.mark.parametrize("path", ["chunked", "plain"])
def test_resume_is_bit_exact(tmp_path, teacher_dir, text_jsonl, path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    straight = potstill.distill(_config(tmp_path / "straight", teacher_dir, text_jsonl), progress=False,
                                overrides=[f"loss.path={path}"])

    # The same 8-step run, interrupted during step 6 (2 micro-batches a step; eval at step 4 uses 1 batch).
    interrupted = _config(tmp_path / "halves", teacher_dir, text_jsonl)
    interrupted["teacher"] = {"name_or_path": patch_decoder(AutoModelForCausalLM.from_pretrained(teacher_dir), 11,
                                                            _interrupt),
                              "tokenizer": AutoTokenizer.from_pretrained(teacher_dir)}
    with pytest.raises(KeyboardInterrupt):
        potstill.distill(interrupted, progress=False, overrides=[f"loss.path={path}"])
    assert potstill.training.checkpoint.latest_checkpoint(tmp_path / "halves").name == "step-000004"
    # Continue in the same run directory from the step-4 checkpoint.
    resumed = potstill.distill(_config(tmp_path / "halves", teacher_dir, text_jsonl),
                               overrides=["train.resume=auto", f"loss.path={path}"], progress=False)

    assert resumed.steps == straight.steps == 8
    assert _losses(tmp_path / "halves") == _losses(tmp_path / "straight")  # exact floats
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "halves")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_killed_run_resumes_to_the_same_result(tmp_path, teacher_dir, text_jsonl):
    cfg = _config(tmp_path / "killed", teacher_dir, text_jsonl, max_steps=40, checkpoint_every=2, log_every=1)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kill_at_checkpoint(cfg_path, tmp_path / "killed", "step-000004")
    assert not (tmp_path / "killed" / "student").exists()

    resumed = subprocess.run([sys.executable, "-m", "potstill", "distill", str(cfg_path), "train.resume=auto",
                              "--no-progress"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    straight = potstill.distill(cfg, overrides=[f"output.dir={tmp_path / 'straight'}"], progress=False)
    assert straight.steps == 40
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")
    a, b = _weights(tmp_path / "killed"), _weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("path", ["chunked", "plain"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, teacher_dir, text_jsonl, path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = patch_decoder(AutoModelForCausalLM.from_pretrained(teacher_dir), 2 * 5, _nan)  # 2 micro-batches a step
    cfg = _config(tmp_path / "nan", teacher_dir, text_jsonl, checkpoint_every=2)
    cfg["teacher"] = {"name_or_path": teacher, "tokenizer": AutoTokenizer.from_pretrained(teacher_dir)}
    cfg["eval"] = {"every": None, "at_start": False}  # every teacher call is a training one
    cfg["loss"]["path"] = path
    with pytest.raises(DivergedError, match=r"diverged at step 6: loss is nan.*step-000004") as err:
        potstill.distill(cfg, progress=False)
    assert "train.resume=auto" in str(err.value)
    run = tmp_path / "nan"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
    assert not (run / "student").exists()
    state = json.loads((run / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(
        str(run / "checkpoints" / "step-000004" / "student" / "model.safetensors")).values())


def test_python_api_takes_objects(tmp_path, teacher_dir):
    """teacher and student as nn.Modules, data as a list of strings, result in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tiny

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = tiny.build_llama(None, len(tok), hidden_size=16, layers=1, heads=2, intermediate=32)
    cfg = potstill.DistillConfig(
        teacher=potstill.TeacherConfig(name_or_path=teacher, tokenizer=tok),
        student=potstill.StudentConfig(name_or_path=student, tokenizer=tok),
        data=potstill.DataConfig(source=tiny.synthetic_sentences(60, seed=9), max_length=32),
        train=potstill.TrainConfig(max_steps=3, batch_size=2, precision="fp32", lr=1e-2),
        output=potstill.OutputConfig(dir=str(tmp_path / "api"), tensorboard=False),
    )
    before = student.lm_head.weight.detach().clone()
    result = potstill.distill(cfg, progress=False)
    assert result.steps == 3 and result.student_dir.is_dir()
    assert not torch.equal(before, student.lm_head.weight)  # the caller's object was trained
    assert {"ppl", "kl", "agreement"} <= set(result.final_eval)
    assert "<object" in (tmp_path / "api" / "config.yaml").read_text()
