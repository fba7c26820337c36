"""On-policy distillation end to end: the student samples, the teacher scores; GKD mixtures,
seq_kd, exact resume after kill -9, two processes, and each bad input as one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import potstill
from potstill.training.metrics import read_metrics
from tiny import assert_one_line_error, kill_at_checkpoint, run_cli, run_config, run_torchrun_distill

NEW_TOKENS = 10


def _config(out: Path, teacher_dir: Path, data: Path, *, onpolicy: dict | None = None, loss: dict | None = None,
            **train) -> dict:
    cfg = run_config(out, teacher_dir, data, loss=loss or {"logits": {"divergence": "jsd", "beta": 0.5}},
                     eval={"max_batches": 1}, **{"max_steps": 4, **train})
    cfg["data"]["max_length"] = 96
    cfg["onpolicy"] = {"lmbda": 1.0, "max_new_tokens": NEW_TOKENS, **(onpolicy or {})}
    return cfg


def _train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def test_onpolicy_run_trains_on_the_students_samples_and_logs_them(tmp_path, teacher_dir, chat_jsonl):
    cfg = _config(tmp_path / "run", teacher_dir, chat_jsonl)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("distill", path)
    assert "onpolicy: lmbda 1.00 (per step)" in proc.stderr
    records = _train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["onpolicy/fraction"] == 1.0
        assert 1 <= r["onpolicy/completion_len"] <= NEW_TOKENS
        assert r["onpolicy/teacher_nll"] > 0
        assert r["time/generate_s"] > 0 and r["time/train_s"] > 0
        assert r["loss/kd"] > 0
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    # evaluation adds what the teacher thinks of the student's own completions to the validation prompts
    final = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/ppl" in r][-1]
    assert final["eval/sample_teacher_nll"] > 0 and 1 <= final["eval/sample_len"] <= NEW_TOKENS


def test_every_onpolicy_option_changes_the_run(tmp_path, teacher_dir, chat_jsonl):
    def run(name: str, **onpolicy) -> tuple[list[dict], dict[str, torch.Tensor]]:
        cfg = _config(tmp_path / name, teacher_dir, chat_jsonl, onpolicy=onpolicy, max_steps=6)
        potstill.distill(cfg, progress=False)
        return _train_records(tmp_path / name), _weights(tmp_path / name)

    off, w_off = run("off", lmbda=0.0)
    assert all("onpolicy/fraction" not in r for r in off)  # lmbda 0 and no seq_kd: today's off-policy run
    on, w_on = run("on", lmbda=1.0)
    mixed, w_mixed = run("mixed", lmbda=0.5, per="sequence")
    seqkd, w_seqkd = run("seqkd", lmbda=0.0, seq_kd=True)
    two, w_two = run("two", lmbda=1.0, num_completions=2)
    greedy, w_greedy = run("greedy", lmbda=1.0, temperature=0.0)
    assert all(r["onpolicy/fraction"] == 1.0 for r in on)
    share = sum(r["onpolicy/fraction"] for r in mixed) / len(mixed)
    assert 0.0 < share < 1.0
    assert all(r["onpolicy/fraction"] == 0.0 for r in seqkd)  # the teacher's samples, not the student's
    assert all("onpolicy/teacher_nll" not in r for r in seqkd)
    weights = [w_off, w_on, w_mixed, w_seqkd, w_two, w_greedy]
    for i in range(len(weights)):
        for j in range(i + 1, len(weights)):
            assert any(not torch.equal(weights[i][k], weights[j][k]) for k in weights[i]), (i, j)


def test_token_rkl_on_the_students_samples(tmp_path, teacher_dir, chat_jsonl):
    cfg = _config(tmp_path / "rkl", teacher_dir, chat_jsonl, loss={"logits": {"divergence": "token_rkl"}})
    potstill.distill(cfg, progress=False)
    records = _train_records(tmp_path / "rkl")
    assert all(torch.isfinite(torch.tensor(r["loss/kd"])) for r in records)
    assert all(r["onpolicy/fraction"] == 1.0 for r in records)


def test_killed_onpolicy_run_resumes_to_the_same_samples_and_weights(tmp_path, teacher_dir, chat_jsonl):
    cfg = _config(tmp_path / "killed", teacher_dir, chat_jsonl, onpolicy={"lmbda": 0.5, "per": "sequence"},
                  max_steps=30, checkpoint_every=2, grad_accum=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    kill_at_checkpoint(path, tmp_path / "killed", "step-000006")
    assert not (tmp_path / "killed" / "student").exists()
    resumed = subprocess.run([sys.executable, "-m", "potstill", "distill", str(path), "train.resume=auto",
                              "--no-progress"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    potstill.distill(cfg, overrides=[f"output.dir={tmp_path / 'straight'}"], progress=False)
    keys = ("loss", "onpolicy/fraction", "onpolicy/completion_len", "onpolicy/teacher_nll")
    killed = {r["step"]: [r.get(k) for k in keys] for r in _train_records(tmp_path / "killed")}
    straight = {r["step"]: [r.get(k) for k in keys] for r in _train_records(tmp_path / "straight")}
    assert killed == straight  # the same samples (lengths, teacher NLL) and losses, bit for bit
    a, b = _weights(tmp_path / "killed"), _weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_sample_and_train_as_one_with_accumulation(tmp_path, teacher_dir, chat_jsonl, strategy):
    cfg = _config(tmp_path / "two", teacher_dir, chat_jsonl, onpolicy={"lmbda": 0.5, "per": "sequence"},
                  checkpoint_every=2, strategy=strategy)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    two = run_torchrun_distill(path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli("distill", path, "train.grad_accum=2", f"output.dir={tmp_path / 'one'}", "--no-progress")
    assert one.returncode == 0
    a, b = _train_records(tmp_path / "two"), _train_records(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        # the same samples: the same fraction and lengths exactly; the loss to float reduction order
        assert ra["onpolicy/fraction"] == rb["onpolicy/fraction"]
        assert ra["onpolicy/completion_len"] == rb["onpolicy/completion_len"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["onpolicy/teacher_nll"] == pytest.approx(rb["onpolicy/teacher_nll"], rel=1e-5)
    wa, wb = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_bad_onpolicy_inputs_are_one_line(tmp_path, teacher_dir, chat_jsonl, text_jsonl):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "bad", teacher_dir, chat_jsonl)))
    assert_one_line_error(run_cli("distill", path, "onpolicy.lmbda=1.5", check=False), "onpolicy.lmbda",
                          "less than or equal to 1", code=2)
    assert_one_line_error(run_cli("distill", path, "onpolicy.lmbda=-0.1", check=False), "onpolicy.lmbda", code=2)
    assert_one_line_error(run_cli("distill", path, f"teacher.cache={tmp_path}", "student.config.hidden_size=32",
                                  check=False), "teacher.cache", "onpolicy.lmbda", code=2)
    # the tiny teacher has 256 positions: prompts of up to 96 tokens leave no room for 200 more
    assert_one_line_error(run_cli("distill", path, "onpolicy.max_new_tokens=200", check=False),
                          "too long for the teacher's context of 256", "onpolicy.max_new_tokens")
    assert_one_line_error(run_cli("distill", path, f"data.source={text_jsonl}", check=False),
                          "plain text", "prompt")
    assert_one_line_error(run_cli("distill", path, "data.assistant_only_loss=false", check=False),
                          "data.assistant_only_loss=true", code=2)
    assert_one_line_error(run_cli("distill", path, "loss.logits.weight=0", "loss.ce.weight=1", check=False),
                          "loss.logits.weight > 0", code=2)
    assert not (tmp_path / "bad" / "student").exists()
