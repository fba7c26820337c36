"""How the student's start and trained parts show in the model card and carry through stages."""

from __future__ import annotations

from pathlib import Path

from potstill.commands.card import _trained_part_words, weights_origin
from potstill.commands.stages import stage_config
from potstill.config import as_config


def test_card_says_pruned_lora_frozen_and_embeddings():
    cfg = {"teacher": {"name_or_path": "/models/teacher"},
           "student": {"from_teacher": {"prune": {"params": 1000, "hidden_size": None, "num_layers": 3}}}}
    _, _, origin = weights_origin(cfg)
    assert origin.startswith("pruned from the teacher") and "params 1000" in origin and "num_layers 3" in origin
    assert "hidden_size" not in origin
    summary = {"student_parameters": 2_000_000, "trained_parameters": 50_000}
    lora = _trained_part_words({"lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}}, summary)
    assert len(lora) == 1 and "rank 16" in lora[0] and "50,000 of 2,000,000" in lora[0] and "adapter/" in lora[0]
    frozen = _trained_part_words({"freeze": ["embed_tokens"], "spectrum": "/x/snr.yaml",
                                  "embeddings_from_teacher": {"mode": "project", "freeze": True}}, summary)
    assert "`embed_tokens`" in frozen[0] and "snr.yaml" in frozen[0]
    assert "principal directions" in frozen[1] and "frozen" in frozen[1]
    assert _trained_part_words({}, {"student_parameters": 10, "trained_parameters": 10}) == []


def test_a_later_stage_keeps_the_trained_embeddings_unless_it_asks_again(tmp_path):
    base = {"teacher": {"name_or_path": "t"}, "student": {"config": {"hidden_size": 32},
                                                          "embeddings_from_teacher": {"mode": "project"},
                                                          "lora": {"r": 4}},
            "data": {"source": "d.jsonl"}, "output": {"dir": str(tmp_path)},
            "stages": [{"train": {"max_steps": 2}}, {"train": {"max_steps": 2}},
                       {"student": {"embeddings_from_teacher": {"mode": "copy"}}}]}
    cfg = as_config(base)
    first = stage_config(cfg, 1, None)
    assert first.student.embeddings_from_teacher.mode == "project"
    second = stage_config(cfg, 2, Path(tmp_path / "stage-1" / "student"))
    assert second.student.embeddings_from_teacher is None and second.student.lora.r == 4
    assert second.student.name_or_path == str(tmp_path / "stage-1" / "student")
    third = stage_config(cfg, 3, Path(tmp_path / "stage-2" / "student"))
    assert third.student.embeddings_from_teacher.mode == "copy"
