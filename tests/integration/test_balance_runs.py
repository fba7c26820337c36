"""loss.balance in real runs: gradnorm and pcgrad train, log the conflict, survive accumulation,
processes and resume; fixed weights measured per term change nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import potstill
import potstill.training.checkpoint
import tiny
from potstill.training.metrics import read_metrics

TERMS = {"logits": {"temperature": 2.0}, "ce": {"weight": 0.2},
         "hidden": {"weight": 1.0, "mapping": "uniform_last", "loss": "mse", "projector": "linear"},
         "attention": {"weight": 1.0, "mapping": "last", "relation_heads": 2}}


def _cfg(out: Path, teacher_dir: Path, data: Path, balance: str, **train) -> dict:
    loss = {**json.loads(json.dumps(TERMS)), "balance": balance}
    return {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"config": {"hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
                               "intermediate_size": 48}},
        "data": {"source": str(data), "max_length": 40, "packing": False, "validation_fraction": 0.1},
        "loss": loss,
        "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "lr": 3e-3, "precision": "fp32", "log_every": 1,
                  "checkpoint_every": None, **train},
        "eval": {"max_batches": 1},
        "output": {"dir": str(out), "tensorboard": False, "report": False},
    }


def _records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


@pytest.mark.parametrize("balance", ["gradnorm", "pcgrad"])
def test_balanced_runs_log_each_terms_gradient_and_the_conflict(tmp_path, teacher_dir, text_jsonl, balance):
    result = potstill.distill(_cfg(tmp_path / balance, teacher_dir, text_jsonl, balance), progress=False)
    records = _records(result.output_dir)
    assert len(records) == 4
    for r in records:
        for key in ("grad_norm/logits", "grad_norm/hidden", "grad_norm/attention", "grad_cos/logits_hidden",
                    "grad_cos/logits_attention", "grad_cos/hidden_attention"):
            assert key in r and r[key] == r[key], key
        assert r["grad_norm/logits"] > 0 and -1.0 <= r["grad_cos/logits_hidden"] <= 1.0
    if balance == "gradnorm":
        first, last = records[0], records[-1]
        assert sum(first[f"balance/{t}"] for t in ("logits", "hidden", "attention")) == pytest.approx(3.0)
        # The multipliers moved, toward the term whose gradient is the smallest share.
        assert any(abs(last[f"balance/{t}"] - 1.0) > 1e-3 for t in ("logits", "hidden", "attention"))


def test_fixed_weights_measured_per_term_train_as_without(tmp_path, teacher_dir, text_jsonl):
    """loss.log_term_gradients only measures: per-term backward passes summed give the one backward's run."""
    plain = potstill.distill(_cfg(tmp_path / "plain", teacher_dir, text_jsonl, "fixed"), progress=False)
    cfg = _cfg(tmp_path / "measured", teacher_dir, text_jsonl, "fixed")
    cfg["loss"]["log_term_gradients"] = True
    measured = potstill.distill(cfg, progress=False)
    a, b = _records(plain.output_dir), _records(measured.output_dir)
    assert "grad_cos/logits_hidden" in b[0] and "grad_cos/logits_hidden" not in a[0]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    wa, wb = _weights(plain.output_dir), _weights(measured.output_dir)
    # float32 sums in another order, through Adam: equal to ~1e-5 (measured max 8e-6)
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=2e-5) for k in wa)


def test_pcgrad_projects_conflicts_away(tmp_path, teacher_dir, text_jsonl):
    """A different run from fixed weights whenever a logged cosine is negative."""
    fixed = _records(potstill.distill(_cfg(tmp_path / "fixed", teacher_dir, text_jsonl, "fixed",
                                           max_steps=2), overrides=["loss.log_term_gradients=true"],
                                      progress=False).output_dir)
    pc = _records(potstill.distill(_cfg(tmp_path / "pc", teacher_dir, text_jsonl, "pcgrad", max_steps=2),
                                   progress=False).output_dir)
    first = fixed[0]
    assert pc[0]["loss"] == pytest.approx(first["loss"], rel=1e-6)  # the same start
    conflicts = [k for k in first if k.startswith("grad_cos/") and first[k] < 0]
    if conflicts:
        assert pc[0]["grad_norm"] != pytest.approx(first["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("balance", ["gradnorm", "pcgrad"])
def test_accumulation_equals_one_big_batch(tmp_path, teacher_dir, text_jsonl, balance):
    big = _records(potstill.distill(_cfg(tmp_path / "big", teacher_dir, text_jsonl, balance, max_steps=3),
                                    progress=False).output_dir)
    acc = _records(potstill.distill(_cfg(tmp_path / "acc", teacher_dir, text_jsonl, balance, max_steps=3,
                                         batch_size=2, grad_accum=2), progress=False).output_dir)
    for a, b in zip(big, acc, strict=True):
        for key in ("loss", "grad_norm", "grad_norm/hidden", "grad_cos/logits_hidden"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    wa, wb = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5) for k in wa)


def test_gradnorm_resume_equals_uninterrupted(tmp_path, teacher_dir, text_jsonl):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_resume import _interrupt, patch_decoder

    # Two micro-batches a step: the teacher's 9th forward is in step 5, after the checkpoint of step 3.
    kw = dict(max_steps=6, checkpoint_every=3, keep_checkpoints=3, warmup_steps=2, batch_size=2, grad_accum=2)
    straight = potstill.distill(_cfg(tmp_path / "straight", teacher_dir, text_jsonl, "gradnorm", **kw),
                                progress=False)
    cfg = _cfg(tmp_path / "halves", teacher_dir, text_jsonl, "gradnorm", **kw)
    cfg["eval"] = {"every": None, "max_batches": 1}
    cfg["teacher"] = {"name_or_path": patch_decoder(AutoModelForCausalLM.from_pretrained(teacher_dir), 9, _interrupt),
                      "tokenizer": AutoTokenizer.from_pretrained(teacher_dir)}
    with pytest.raises(KeyboardInterrupt):
        potstill.distill(cfg, progress=False)
    ckpt = potstill.training.checkpoint.latest_checkpoint(tmp_path / "halves")
    assert ckpt.name == "step-000003"
    state = json.loads((ckpt / "state.json").read_text())
    assert set(state["balance"]["weights"]) == {"logits", "hidden", "attention"}
    potstill.distill(_cfg(tmp_path / "halves", teacher_dir, text_jsonl, "gradnorm", **kw),
                     overrides=["train.resume=auto"], progress=False)
    keys = ("step", "loss", "balance/hidden", "grad_norm")
    assert [tuple(r[k] for k in keys) for r in _records(tmp_path / "halves")] == \
        [tuple(r[k] for k in keys) for r in _records(straight.output_dir)]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "halves")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_equal_one_with_pcgrad(tmp_path, teacher_dir, text_jsonl):
    cfg = _cfg(tmp_path / "two", teacher_dir, text_jsonl, "pcgrad", batch_size=2, max_steps=3)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    two = tiny.run_torchrun_distill(path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "potstill", "distill", str(path), "train.grad_accum=2",
                          f"output.dir={tmp_path / 'one'}", "--no-progress"], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(_records(tmp_path / "two"), _records(tmp_path / "one"), strict=True):
        for key in ("loss", "grad_norm", "grad_norm/logits", "grad_cos/logits_hidden"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_balance_refusals_are_one_line(tmp_path, teacher_dir, text_jsonl):
    cfg = _cfg(tmp_path / "one-term", teacher_dir, text_jsonl, "pcgrad")
    cfg["loss"] = {"logits": {"weight": 1.0}, "ce": {"weight": 0.5}, "balance": "pcgrad"}
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tiny.assert_one_line_error(tiny.run_cli("distill", path, check=False),
                               "loss.balance=pcgrad needs two terms or more")
    cfg = _cfg(tmp_path / "fsdp", teacher_dir, text_jsonl, "gradnorm", strategy="fsdp")
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tiny.assert_one_line_error(tiny.run_cli("distill", path, check=False), "not supported with train.strategy=fsdp")
