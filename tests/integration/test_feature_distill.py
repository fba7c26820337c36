"""Feature distillation in real runs: both loss paths, checkpointing, bf16, across architectures, resume."""

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
from potstill.features.projectors import Projectors

FEATURES = {"hidden": {"weight": 0.5, "mapping": "uniform_last", "loss": "mse", "layer_norm": True},
            "attention": {"weight": 0.3, "mapping": "last", "relation_heads": 2}}


def _cfg(out: Path, teacher_dir: Path, data: Path, *, loss=None, student=None, **train) -> dict:
    return {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": student or {"config": {"hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
                                          "intermediate_size": 48}},
        "data": {"source": str(data), "max_length": 40, "packing": False, "validation_fraction": 0.1},
        "loss": loss or {"logits": {"temperature": 2.0}, "ce": {"weight": 0.2}, **FEATURES},
        "train": {"max_steps": 4, "batch_size": 3, "grad_accum": 2, "lr": 3e-3, "precision": "fp32", "log_every": 1,
                  "checkpoint_every": None, **train},
        "eval": {"max_batches": 1},
        "output": {"dir": str(out), "tensorboard": False, "report": False},
    }


def _records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_chunked_and_plain_paths_give_the_same_feature_terms(tmp_path, teacher_dir, text_jsonl):
    runs = {}
    for path in ("plain", "chunked"):
        cfg = _cfg(tmp_path / path, teacher_dir, text_jsonl)
        cfg["loss"]["path"] = path
        runs[path] = _records(potstill.distill(cfg, progress=False).output_dir)
    assert len(runs["plain"]) == 4
    for plain, chunked in zip(runs["plain"], runs["chunked"]):
        for key in ("loss", "loss/kd", "loss/ce", "loss/hidden", "loss/attention", "grad_norm"):
            assert chunked[key] == pytest.approx(plain[key], rel=2e-5), (plain["step"], key)
    # Every term is logged on its own, and the total is their weighted sum.
    r = runs["plain"][0]
    assert r["loss"] == pytest.approx(r["loss/kd"] + 0.2 * r["loss/ce"] + 0.5 * r["loss/hidden"]
                                      + 0.3 * r["loss/attention"], rel=1e-5)


def test_feature_terms_change_the_training(tmp_path, teacher_dir, text_jsonl):
    plain = _cfg(tmp_path / "logits", teacher_dir, text_jsonl, max_steps=2)
    plain["loss"] = {"logits": {"temperature": 2.0}, "ce": {"weight": 0.2}}
    base = potstill.distill(plain, progress=False)
    feat = potstill.distill(_cfg(tmp_path / "features", teacher_dir, text_jsonl, max_steps=2), progress=False)
    assert "loss/hidden" not in _records(base.output_dir)[0]
    assert not (base.output_dir / "projectors").exists()
    a = load_file(str(base.student_dir / "model.safetensors"))
    b = load_file(str(feat.student_dir / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_run(tmp_path, teacher_dir, text_jsonl):
    runs = {}
    for gc in (False, True):
        cfg = _cfg(tmp_path / f"gc-{gc}", teacher_dir, text_jsonl, max_steps=2)
        cfg["student"]["gradient_checkpointing"] = gc
        runs[gc] = _records(potstill.distill(cfg, progress=False).output_dir)
    for a, b in zip(runs[False], runs[True]):
        for key in ("loss", "loss/hidden", "loss/attention", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def _cli(cfg: dict, cfg_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cfg_path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "potstill", "distill", str(cfg_path), *overrides, "--no-progress"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("path", ["chunked", "plain"])
def test_bf16_run(tmp_path, teacher_dir, text_jsonl, path):
    # A process of its own: Accelerate's mixed-precision state is per process.
    cfg = _cfg(tmp_path / "bf16", teacher_dir, text_jsonl, precision="bf16", max_steps=3)
    proc = _cli(cfg, tmp_path / "run.yaml", f"loss.path={path}")
    assert proc.returncode == 0, proc.stderr
    assert "precision bf16" in proc.stderr
    records = _records(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor([r["loss/hidden"], r["loss/attention"]])).all() for r in records)
    assert records[-1]["loss/hidden"] < records[0]["loss/hidden"]


@pytest.fixture(scope="module")
def gpt2_teacher_dir(tmp_path_factory, tokenizer):
    """A tiny GPT-2 teacher (3 layers, width 40) that shares the test tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2-teacher")
    torch.manual_seed(5)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=40, n_layer=3, n_head=4, n_positions=128,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("with_logits", [False, True])
def test_cli_gpt2_teacher_to_llama_student(tmp_path, gpt2_teacher_dir, text_jsonl, with_logits):
    """Other family, width (40 -> 24) and depth (3 -> 2): hidden-state KD from the command line."""
    loss = {"logits": {"weight": 1.0 if with_logits else 0.0}, "ce": {"weight": 0.0},
            "hidden": {"weight": 1.0, "mapping": "uniform_consecutive", "projector": "linear",
                       "projector_init": "orthogonal"}}
    student = {"config": {"model_type": "llama", "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "intermediate_size": 48}}
    cfg = _cfg(tmp_path / "run", gpt2_teacher_dir, text_jsonl, loss=loss, student=student, max_steps=3)
    proc = _cli(cfg, tmp_path / "run.yaml")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    records = _records(run)
    assert all("loss/hidden" in r for r in records) and ("loss/kd" in records[0]) == with_logits
    # Projectors beside the student, not inside it; the student is a plain Llama.
    spec = json.loads((run / "projectors" / "projectors.json").read_text())
    assert spec["pairs"] == [[1, 1], [2, 1], [3, 2]] and (spec["student_width"], spec["teacher_width"]) == (24, 40)
    assert not any("t1_s1" in k for k in load_file(str(run / "student" / "model.safetensors")))
    assert json.loads((run / "student" / "config.json").read_text())["model_type"] == "llama"
    proj = Projectors.load(run / "projectors")
    assert proj.by_pair["t3_s2"].weight.shape == (40, 24)


def test_mismatched_tokenizers_are_refused_for_features(tmp_path, teacher_dir, text_jsonl):
    import tiny

    other = tmp_path / "other-tok"
    tiny.build_tokenizer(other, vocab_size=300)
    cfg = _cfg(tmp_path / "run", teacher_dir, text_jsonl,
               loss={"logits": {"weight": 0.0}, "hidden": {"weight": 1.0}})
    cfg["student"]["tokenizer"] = str(other)
    cfg["student"]["config"]["model_type"] = "llama"
    with pytest.raises(potstill.errors.ModelError, match="tokenizer.*differ"):
        potstill.distill(cfg, progress=False)


def test_resume_with_projectors_equals_uninterrupted(tmp_path, teacher_dir, text_jsonl):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_resume import _interrupt, patch_decoder

    features = {"logits": {"temperature": 1.5}, "ce": {"weight": 0.2},
                "hidden": {"weight": 1.0, "mapping": "uniform", "projector": "mlp"},
                "attention": {"weight": 0.5, "relation_heads": 4}}
    kw = dict(loss=features, max_steps=6, checkpoint_every=3, keep_checkpoints=3, warmup_steps=2)
    straight = potstill.distill(_cfg(tmp_path / "straight", teacher_dir, text_jsonl, **kw), progress=False)

    # Interrupted in step 5 (2 micro-batches a step, no eval before the end).
    cfg = _cfg(tmp_path / "halves", teacher_dir, text_jsonl, **kw)
    cfg["eval"] = {"every": None, "max_batches": 1}
    cfg["teacher"] = {"name_or_path": patch_decoder(AutoModelForCausalLM.from_pretrained(teacher_dir), 9, _interrupt),
                      "tokenizer": AutoTokenizer.from_pretrained(teacher_dir)}
    with pytest.raises(KeyboardInterrupt):
        potstill.distill(cfg, progress=False)
    ckpt = potstill.training.checkpoint.latest_checkpoint(tmp_path / "halves")
    assert ckpt.name == "step-000003" and (ckpt / "projectors.pt").is_file()
    assert not (ckpt / "student" / "projectors.pt").exists()
    resumed = _cfg(tmp_path / "halves", teacher_dir, text_jsonl, **kw)
    potstill.distill(resumed, overrides=["train.resume=auto"], progress=False)

    assert [(r["step"], r["loss"], r["loss/hidden"]) for r in _records(tmp_path / "halves")] == \
        [(r["step"], r["loss"], r["loss/hidden"]) for r in _records(straight.output_dir)]
    for folder, name in (("student", "model.safetensors"), ("projectors", "projectors.safetensors")):
        a = load_file(str(tmp_path / "straight" / folder / name))
        b = load_file(str(tmp_path / "halves" / folder / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


@pytest.mark.skipif(__import__("shutil").which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_average_projector_gradients(tmp_path, teacher_dir, text_jsonl):
    """Projectors live outside the DDP-wrapped student: their gradients are averaged by hand."""
    cfg = _cfg(tmp_path / "two", teacher_dir, text_jsonl, batch_size=2, grad_accum=1, max_steps=3)
    cfg["loss"]["hidden"]["projector"] = "linear"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    two = tiny.run_torchrun_distill(path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _cli(cfg, path, "train.grad_accum=2", f"output.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip(_records(tmp_path / "two"), _records(tmp_path / "one"), strict=True):
        for key in ("loss", "loss/hidden", "loss/attention", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    a = load_file(str(tmp_path / "two" / "projectors" / "projectors.safetensors"))
    b = load_file(str(tmp_path / "one" / "projectors" / "projectors.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
