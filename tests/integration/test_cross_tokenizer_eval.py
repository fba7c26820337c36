"""`potstill evaluate` with a teacher whose tokenizer differs from the model's: each model is scored
on its own tokenization of the same text, compared by bits per byte / per character, without KL."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import tiny
from potstill.commands.quickstart import DEMO_TEACHER

NOTE = "perplexities over different tokenizations are not comparable; compare bits per byte"
TEXTS = tiny.synthetic_sentences(5, seed=3) + ["The naïve café serves crème brûlée to the student model."]
ARGS = ("--precision", "fp32", "--batch-size", "4", "--no-progress")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    tok = tiny.build_tokenizer(root / "student", vocab_size=300)
    assert len(tok) != len(AutoTokenizer.from_pretrained(DEMO_TEACHER))  # really different tokenizers
    tiny.build_llama(root / "student", len(tok), seed=0)
    tok.save_pretrained(root / "other")  # a second model of the same tokenizer
    tiny.build_llama(root / "other", len(tok), seed=1)
    data = tiny.write_jsonl(root / "eval.jsonl", [{"text": t} for t in TEXTS])
    return root, tok, data


def _evaluate(root, name, *args):
    out = root / f"{name}.json"
    proc = tiny.run_cli("evaluate", *args, *ARGS, "--json", out)
    return json.loads(out.read_text()), proc.stdout + proc.stderr


def _scored(tok, key: str) -> int:
    """Bytes or characters the scored tokens spell: every token of each row but its first (the
    first is context only), plus the EOS that spells nothing."""
    size = (lambda s: len(s.encode())) if key == "bytes" else len
    return sum(size(tok.decode(tok(t)["input_ids"][1:], skip_special_tokens=True)) for t in TEXTS)


def test_a_teacher_of_another_tokenizer_is_scored_on_its_own_tokens(setup):
    root, tok, data = setup
    both, out = _evaluate(root, "both", root / "student", "--teacher", DEMO_TEACHER, "--data", data)
    alone, _ = _evaluate(root, "teacher", DEMO_TEACHER, "--data", data)
    teacher_tok = AutoTokenizer.from_pretrained(DEMO_TEACHER)

    assert out.count(NOTE) == 1
    for key in ("ce", "ppl", "bpb", "bpc", "tokens", "bytes", "chars"):
        assert key in both and f"teacher_{key}" in both
        assert both[f"teacher_{key}"] == alone[key]  # the same number as the teacher evaluated alone
    assert "kl" not in both and "agreement" not in both and "teacher_kl" not in both
    # Each counts what its own scored tokens spell: the whole text but each row's first token.
    assert both["bytes"] == _scored(tok, "bytes") and both["teacher_bytes"] == _scored(teacher_tok, "bytes")
    assert both["chars"] == _scored(tok, "chars") and both["teacher_chars"] == _scored(teacher_tok, "chars")
    total = sum(len(t.encode()) for t in TEXTS)
    firsts = [(len(tok.decode(tok(t)["input_ids"][:1]).encode()),
               len(teacher_tok.decode(teacher_tok(t)["input_ids"][:1]).encode())) for t in TEXTS]
    assert both["bytes"] == total - sum(s for s, _ in firsts)
    assert both["teacher_bytes"] == total - sum(t for _, t in firsts)
    assert both["tokens"] != both["teacher_tokens"]  # different tokenizations of the same text
    # Non-ASCII text: fewer characters than bytes, so more bits per character than per byte.
    for p in ("", "teacher_"):
        assert both[f"{p}chars"] < both[f"{p}bytes"]
        assert both[f"{p}bpc"] == pytest.approx(both[f"{p}bpb"] * both[f"{p}bytes"] / both[f"{p}chars"], rel=1e-12)
        assert both[f"{p}bpb"] == pytest.approx(both[f"{p}ce"] * both[f"{p}tokens"] / (0.6931471805599453 *
                                                                                      both[f"{p}bytes"]), rel=1e-9)
    assert both["teacher_bpb"] < both["bpb"]  # the trained teacher beats the random student per byte

    # The same tokenizer: today's pair metrics, one set of counts, no note.
    same, out = _evaluate(root, "same", root / "student", "--teacher", root / "other", "--data", data)
    assert NOTE not in out
    assert "kl" in same and "agreement" in same and "teacher_tokens" not in same and "teacher_bytes" not in same
    assert same["bpc"] > 0 and same["teacher_bpc"] > 0 and same["chars"] == both["chars"]
    for key in ("ce", "bpb", "bpc", "tokens", "bytes"):  # the model is scored the same either way
        assert same[key] == both[key]
