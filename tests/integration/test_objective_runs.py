"""The new logit divergences in real runs from the CLI, and CAKLD's measured confidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import potstill
import tiny
from potstill.training.metrics import read_metrics

NEW = ("soft_ce", "soft_mse", "cos", "logsum", "cakld", "akl", "hinge", "logistic_ranking", "sinkhorn")


def _records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("divergence", NEW)
def test_each_new_divergence_trains_from_the_cli(tmp_path, teacher_dir, text_jsonl, divergence):
    cfg = tiny.run_config(tmp_path / "run", teacher_dir, text_jsonl, max_steps=3,
                          loss={"logits": {"divergence": divergence, "rank_k": 4, "sinkhorn_rows": 16},
                                "ce": {"weight": 0.1}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tiny.run_cli("distill", path, "--no-progress")
    records = _records(tmp_path / "run")
    assert len(records) == 3 and all(r["loss/kd"] == r["loss/kd"] and r["loss/kd"] >= 0 for r in records)
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def _independent_confidence(teacher_dir: Path, cfg: dict, batches: int) -> float:
    """The teacher's mean probability of the next tokens over the first train batches, from its logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.config import as_config
    from potstill.data import build_datasets
    from potstill.data.tokenized import collate

    c = as_config(cfg)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    train, _ = build_datasets(c.data, tok, seed=c.train.seed, progress=False)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    probs = []
    size = c.train.batch_size
    for start in range(0, min(batches * size, len(train)), size):
        b = collate([train[i] for i in range(start, min(start + size, len(train)))], tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
        p = logits.softmax(-1)[:, :-1]
        labels = b["labels"][:, 1:]
        keep = labels != -100
        probs.append(p[keep].gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1))
    return float(torch.cat(probs).mean())


@pytest.mark.parametrize("path", ["chunked", "plain"])
def test_cakld_measures_the_teachers_confidence_and_records_it(tmp_path, teacher_dir, text_jsonl, path):
    cfg = tiny.run_config(tmp_path / "run", teacher_dir, text_jsonl, max_steps=2, checkpoint_every=2,
                          loss={"logits": {"divergence": "cakld", "cakld_batches": 3}, "path": path})
    cfg["output"]["report"] = True
    result = potstill.distill(cfg, progress=False)
    gamma = json.loads((result.output_dir / "summary.json").read_text())["measured"]["cakld_confidence"]
    assert gamma == pytest.approx(_independent_confidence(teacher_dir, cfg, 3), rel=1e-5)
    assert 0.0 < gamma < 1.0
    state = json.loads(next((result.output_dir / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["measured"]["cakld_confidence"] == gamma
    assert f"measured teacher confidence γ = {gamma:.3f}" in (result.student_dir / "README.md").read_text()


def test_cakld_with_a_set_confidence_equals_the_mix_of_forward_and_reverse(tmp_path, teacher_dir, text_jsonl):
    """γ = 0 is forward KL, γ = 1 reverse KL: the same first loss as those runs."""
    first = {}
    for name, logits in (("fkl", {"divergence": "fkl"}), ("rkl", {"divergence": "rkl"}),
                         ("c0", {"divergence": "cakld", "cakld_confidence": 0.0}),
                         ("c1", {"divergence": "cakld", "cakld_confidence": 1.0})):
        cfg = tiny.run_config(tmp_path / name, teacher_dir, text_jsonl, max_steps=1, loss={"logits": logits})
        first[name] = _records(potstill.distill(cfg, progress=False).output_dir)[0]["loss"]
    assert first["c0"] == pytest.approx(first["fkl"], rel=1e-6)
    assert first["c1"] == pytest.approx(first["rkl"], rel=1e-6)


@pytest.mark.parametrize("override, fragment", [
    ("loss.logits.sinkhorn_epsilon=-0.5", "loss.logits.sinkhorn_epsilon"),
    ("loss.logits.cakld_confidence=1.5", "loss.logits.cakld_confidence"),
    ("loss.balance=pcgrad", "needs two terms or more"),
])
def test_bad_objective_parameters_are_one_line(tmp_path, teacher_dir, text_jsonl, override, fragment):
    cfg = tiny.run_config(tmp_path / "run", teacher_dir, text_jsonl, max_steps=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tiny.assert_one_line_error(tiny.run_cli("distill", path, override, check=False), fragment)
    assert not (tmp_path / "run").exists()
