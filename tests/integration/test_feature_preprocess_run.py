"""loss.hidden.preprocess standardize / whitening in real runs: fitted before training, saved in
each checkpoint and in <run>/projectors/, restored on resume (bit-exact continuation)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import potstill
import potstill.training.checkpoint
import tiny
from potstill.features.preprocess import FeatureStats
from potstill.training.metrics import read_metrics

FIT_BATCHES = 3


def _cfg(out: Path, teacher, student_dir: Path, data: Path, preprocess: str) -> dict:
    return {
        "teacher": teacher,
        "student": {"name_or_path": str(student_dir)},
        "data": {"source": str(data), "max_length": 40, "packing": False, "validation_fraction": 0.1},
        "loss": {"logits": {"temperature": 1.5}, "ce": {"weight": 0.2},
                 "hidden": {"weight": 1.0, "mapping": "uniform", "loss": "mse", "preprocess": preprocess,
                            "fit_batches": FIT_BATCHES}},
        "train": {"max_steps": 4, "batch_size": 3, "grad_accum": 2, "lr": 3e-3, "precision": "fp32", "log_every": 1,
                  "checkpoint_every": 2, "keep_checkpoints": 3, "warmup_steps": 1},
        "eval": {"every": None, "max_batches": 1},
        "output": {"dir": str(out), "tensorboard": False, "report": False},
    }


def _records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("preprocess", ["whitening", "standardize"])
def test_preprocessed_run_resumes_bit_exact(tmp_path, teacher_dir, student_dir, text_jsonl, preprocess):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_resume import _interrupt, patch_decoder

    teacher = {"name_or_path": str(teacher_dir)}
    straight = potstill.distill(_cfg(tmp_path / "straight", teacher, student_dir, text_jsonl, preprocess),
                                progress=False).output_dir
    records = _records(straight)
    assert len(records) == 4 and all(math.isfinite(r["loss/hidden"]) and r["loss/hidden"] > 0 for r in records)
    folder = straight / "projectors"
    stats = FeatureStats.load(folder)
    spec = json.loads((folder / "feature_stats.json").read_text())
    assert stats.kind == preprocess and spec["teacher_layers"] == [2, 4] and spec["width"] == 48
    assert spec["n_tokens"] > 0 and all(torch.isfinite(b).all() for b in stats.buffers())

    # Interrupted in step 3: the fit's FIT_BATCHES teacher forwards, 1 for the evaluation at the
    # start, then 2 a step (2 micro-batches).
    patched = patch_decoder(AutoModelForCausalLM.from_pretrained(teacher_dir), FIT_BATCHES + 4 + 1, _interrupt)
    halves = _cfg(tmp_path / "halves", {"name_or_path": patched, "tokenizer": AutoTokenizer.from_pretrained(teacher_dir)},
                  student_dir, text_jsonl, preprocess)
    with pytest.raises(KeyboardInterrupt):
        potstill.distill(halves, progress=False)
    ckpt = potstill.training.checkpoint.latest_checkpoint(tmp_path / "halves")
    assert ckpt.name == "step-000002" and (ckpt / "feature_stats.pt").is_file()
    saved = torch.load(ckpt / "feature_stats.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in stats.state_dict().items())
    potstill.distill(_cfg(tmp_path / "halves", teacher, student_dir, text_jsonl, preprocess),
                     overrides=["train.resume=auto"], progress=False)

    assert [(r["step"], r["loss"], r["loss/hidden"]) for r in _records(tmp_path / "halves")] == \
        [(r["step"], r["loss"], r["loss/hidden"]) for r in records]
    for sub, name in (("student", "model.safetensors"), ("projectors", "projectors.safetensors"),
                      ("projectors", "feature_stats.safetensors")):
        a, b = load_file(str(straight / sub / name)), load_file(str(tmp_path / "halves" / sub / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (sub, name)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_fit_the_same_statistics(tmp_path, teacher_dir, student_dir, text_jsonl):
    """Every process fits on the same first batches (and takes the main process's bits); the run
    equals one process accumulating the same micro-batches."""
    import yaml

    cfg = _cfg(tmp_path / "two", {"name_or_path": str(teacher_dir)}, student_dir, text_jsonl, "whitening")
    cfg["train"].update(batch_size=2, grad_accum=1, max_steps=2, checkpoint_every=None)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    two = tiny.run_torchrun_distill(path)
    assert two.returncode == 0, two.stderr[-3000:]
    cfg["train"]["grad_accum"], cfg["output"]["dir"] = 2, str(tmp_path / "one")
    potstill.distill(cfg, progress=False)
    for a, b in zip(_records(tmp_path / "two"), _records(tmp_path / "one"), strict=True):
        assert a["loss/hidden"] == pytest.approx(b["loss/hidden"], rel=1e-5), a["step"]
    a = load_file(str(tmp_path / "two" / "projectors" / "feature_stats.safetensors"))
    b = load_file(str(tmp_path / "one" / "projectors" / "feature_stats.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
