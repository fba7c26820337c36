"""Token alignment across tokenizers: canonical character spans, the teacher's window of a
student item, and which predictions pair up. Hand-made tokenizations checked position by
position, then the real demo-teacher byte-level BPE against a SentencePiece-style Unigram
tokenizer trained here (unicode, whitespace, byte fallback, special tokens, chat templates)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from potstill.config import DataConfig
from potstill.data import build_datasets, build_teacher_view
from potstill.data.alignment import align_targets, teacher_window
from potstill.data.formats import FIRST_TOKEN, LAST_TOKEN, token_spans, whitespace_token_ids
from potstill.models.vocab_map import build_vocab_map, token_bytes
from potstill.commands.quickstart import DEMO_TEACHER
from tiny import CHATML_TEMPLATE, build_tokenizer, build_unigram_tokenizer

TEXTS = [
    "Hello  world, the teacher returns a value.",
    "def f(x):\n\treturn x  + 1  # tabs and  double spaces",
    "Unicode: café naïve résumé — “quotes” and ½ fractions.",
    "CJK 日本語のテキスト and emoji 😀🚀 in one line.",
    "   leading spaces, trailing spaces   ",
]


def spans_of(rows):
    """Hand-made spans (L, 4) from (example, start, end) triples, first/last flags set."""
    out = np.array([[e, s, t, 0] for e, s, t in rows], dtype=np.int64)
    for e in np.unique(out[:, 0]):
        idx = np.nonzero(out[:, 0] == e)[0]
        out[idx[0], 3] |= FIRST_TOKEN
        out[idx[-1], 3] |= LAST_TOKEN
    return out


# ------------------------------------------------------------------------------------------
# Hand-made tokenizations


def test_align_targets_hand_made_pair():
    # text "ab cd" (+ EOS at 5). student: "ab" " cd" EOS; teacher: "a" "b" " c" "d" EOS.
    # Trimmed spans: " cd" -> [3, 5), " c" -> [3, 4).
    s_spans = spans_of([(0, 0, 2), (0, 3, 5), (0, 5, 5)])
    t_spans = spans_of([(0, 0, 1), (0, 1, 2), (0, 3, 4), (0, 4, 5), (0, 5, 5)])
    s_ids, t_ids = np.array([10, 11, 2]), np.array([20, 21, 22, 23, 3])
    s2t = np.full(12, -1)
    s2t[2] = 3        # EOS <-> EOS
    al = align_targets(s_ids, s_spans, np.array([1, 2]), t_ids, t_spans, s2t)
    # student token 1 (" cd", start 3) pairs with teacher token 2 (" c", start 3): not the same span.
    # student token 2 (EOS at 5) pairs with teacher token 4 (EOS at 5): same span, mapped ids -> exact.
    assert al.student_targets.tolist() == [1, 2]
    assert al.teacher_targets.tolist() == [2, 4]
    assert al.exact.tolist() == [False, True]


def test_exact_needs_same_end_and_mapped_bytes():
    s_spans = spans_of([(0, 0, 1), (0, 1, 3), (0, 3, 4)])
    t_spans = spans_of([(0, 0, 1), (0, 1, 3), (0, 3, 4)])
    s_ids, t_ids = np.array([0, 1, 2]), np.array([5, 6, 7])
    s2t = np.array([5, 6, -1])  # token 2 has no teacher twin
    al = align_targets(s_ids, s_spans, np.array([1, 2]), t_ids, t_spans, s2t)
    assert al.teacher_targets.tolist() == [1, 2]
    assert al.exact.tolist() == [True, False]
    s2t_wrong = np.array([5, 7, 7])  # maps to another teacher id than the one at that span
    assert align_targets(s_ids, s_spans, np.array([1]), t_ids, t_spans, s2t_wrong).exact.tolist() == [False]


def test_unaligned_and_spanless_targets_get_no_pair():
    # student "abc" as one token; teacher "ab" "c": the student's next token "d" starts at 3 in both.
    s_spans = spans_of([(0, -1, -1), (0, 0, 3), (0, 3, 4)])          # BOS, "abc", "d"
    t_spans = spans_of([(0, 0, 2), (0, 2, 3), (0, 3, 4)])            # "ab", "c", "d"
    al = align_targets(np.array([1, 2, 3]), s_spans, np.array([1, 2]), np.array([7, 8, 9]), t_spans,
                       np.array([-1, -1, -1, 9]))
    # target 1 ("abc" at 0): the teacher's token at 0 is its position 0, which nothing predicts.
    assert al.student_targets.tolist() == [2]
    assert al.teacher_targets.tolist() == [2]
    assert al.exact.tolist() == [True]


def test_split_character_counts_once():
    # an emoji as 2 byte pieces in the teacher (same span) and one token in the student
    s_spans = spans_of([(0, 0, 1), (0, 1, 2)])
    t_spans = spans_of([(0, 0, 1), (0, 1, 2), (0, 1, 2)])
    al = align_targets(np.array([0, 1]), s_spans, np.array([1]), np.array([4, 5, 6]), t_spans, np.array([4, 1]))
    assert al.teacher_targets.tolist() == [1]  # the first piece owns the start
    assert al.exact.tolist() == [False]        # the piece is not the student's whole token
    # and a student target that is a later piece gets no pair
    al = align_targets(np.array([0, 1, 2]), t_spans, np.array([1, 2]), np.array([0, 1]), s_spans, np.array([0, 1, 2]))
    assert al.student_targets.tolist() == [1]


def test_teacher_window_whole_and_cut_examples():
    view = {
        0: (np.array([100, 1, 2, 3, 9]), spans_of([(0, -1, -1), (0, 0, 2), (0, 2, 4), (0, 4, 6), (0, 6, 6)])),
        1: (np.array([100, 4, 5, 9]), spans_of([(1, -1, -1), (1, 0, 3), (1, 3, 5), (1, 5, 5)])),
    }
    # a packed student item: the end of example 0 (from char 2) and the start of example 1 (to char 3)
    item = np.array([[0, 2, 3, 0], [0, 3, 6, 0], [0, 6, 6, LAST_TOKEN], [1, -1, -1, FIRST_TOKEN], [1, 0, 3, 0]])
    ids, spans = teacher_window(item, view)
    # example 0 from its first teacher token starting at or after char 2; example 1 from its start
    # (BOS) up to the last teacher token ending by char 3
    assert ids.tolist() == [2, 3, 9, 100, 4]
    assert spans[:, 0].tolist() == [0, 0, 0, 1, 1]
    # a whole example is taken whole
    whole = spans_of([(1, -1, -1), (1, 0, 1), (1, 1, 5), (1, 5, 5)])
    assert teacher_window(whole, view)[0].tolist() == [100, 4, 5, 9]


def test_token_spans_trim_specials_and_invented_spaces():
    text = "a  bc"
    # tokens: BOS(special), "a", invented '▁' on "a"'s offsets, " ", " bc"
    offsets = [(0, 0), (0, 1), (0, 1), (1, 2), (2, 5)]
    ids = [1, 10, 11, 12, 13]
    out = token_spans(text, offsets, ids, frozenset({1}), space_ids=frozenset({11, 12}))
    assert out.tolist() == [[-1, -1], [0, 1], [-1, -1], [1, 2], [3, 5]]
    # a window maps into canonical coordinates from base; tokens outside it span nothing
    out = token_spans("<u>hi</u>", [(0, 3), (3, 5), (5, 9)], [1, 2, 3], frozenset(), base=10, window=(3, 5))
    assert out.tolist() == [[-1, -1], [10, 12], [-1, -1]]


# ------------------------------------------------------------------------------------------
# Real tokenizers: the demo teacher's byte-level BPE and a Unigram (SentencePiece-style) one


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unigram")
    build_unigram_tokenizer(folder, vocab_size=1500)
    return AutoTokenizer.from_pretrained(DEMO_TEACHER), AutoTokenizer.from_pretrained(folder)


def encode(tok, texts, tmp_path, name, **data):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in texts), encoding="utf-8")
    cfg = DataConfig(source=str(path), max_length=512, packing=False, validation_fraction=0,
                     cache_dir=str(tmp_path / "cache"), **data)
    ds, _ = build_datasets(cfg, tok, spans=True, progress=False)
    return ds, cfg


@pytest.mark.parametrize("which", [0, 1])
def test_spans_cover_the_visible_text(tokenizers, tmp_path, which):
    tok = tokenizers[which]
    ds, _ = encode(tok, [{"text": t} for t in TEXTS], tmp_path, f"t{which}")
    specials = set(tok.all_special_ids)
    for k, text in enumerate(TEXTS):
        item = ds[k]
        spans, ids = item["spans"], item["input_ids"].tolist()
        assert (spans[:, 0] == k).all()
        assert spans[0, 3] & FIRST_TOKEN and spans[-1, 3] & LAST_TOKEN
        assert spans[-1, 1] == spans[-1, 2] == len(text) and ids[-1] == tok.eos_token_id  # EOS at the end
        covered = np.zeros(len(text), bool)
        for (e, s, t, _), i in zip(spans[:-1], ids[:-1]):
            if s < 0:
                continue
            assert i not in specials
            assert not text[s].isspace() or not text[s:t].strip()  # trimmed: starts at visible text
            covered[s:t] = True
        visible = np.array([not c.isspace() for c in text])
        assert covered[visible].all(), f"visible characters without a token span in {text!r}"
        starts = spans[spans[:, 1] >= 0, 1]
        assert (np.diff(starts) >= 0).all()


def test_identical_tokenizers_align_every_target_exactly(tokenizers, tmp_path):
    tok = tokenizers[1]
    ds, _ = encode(tok, [{"text": t} for t in TEXTS], tmp_path, "same")
    vmap = build_vocab_map(tok, tok)
    for k in range(len(TEXTS)):
        item = ds[k]
        ids, spans = item["input_ids"].numpy(), item["spans"]
        targets = np.arange(1, len(ids))
        al = align_targets(ids, spans, targets, ids, spans, vmap.student_to_teacher)
        owner = [p for p in targets if spans[p, 1] >= 0 and not (
            (spans[1:p, 0] == spans[p, 0]) & (spans[1:p, 1] == spans[p, 1])).any()]
        assert al.student_targets.tolist() == owner
        assert al.teacher_targets.tolist() == owner
        assert al.exact.all()


def test_bpe_against_unigram(tokenizers, tmp_path):
    teacher, student = tokenizers
    s_ds, cfg = encode(student, [{"text": t} for t in TEXTS], tmp_path, "x")
    t_view = build_teacher_view(cfg, teacher, progress=False)
    vmap = build_vocab_map(student, teacher)
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    n_exact = n_pairs = 0
    for k, text in enumerate(TEXTS):
        item, t_item = s_ds[k], t_view[k]
        ids, spans = item["input_ids"].numpy(), item["spans"]
        t_ids, t_spans = teacher_window(spans, {k: (t_item["input_ids"].numpy(), t_item["spans"])})
        assert t_ids.tolist() == t_item["input_ids"].tolist()  # a whole example: the teacher's whole example
        al = align_targets(ids, spans, np.arange(1, len(ids)), t_ids, t_spans, vmap.student_to_teacher)
        for p, q, exact in zip(al.student_targets, al.teacher_targets, al.exact):
            assert spans[p, 1] == t_spans[q, 1]  # the same start character
            if exact:  # same span, same bytes
                assert spans[p, 2] == t_spans[q, 2]
                assert s_bytes[ids[p]] == t_bytes[t_ids[q]]
        n_pairs += len(al.student_targets)
        n_exact += int(al.exact.sum())
        # the EOS of both ends the text: aligned and exact (eos <-> eos in the map)
        assert al.student_targets[-1] == len(ids) - 1 and al.teacher_targets[-1] == len(t_ids) - 1
        assert al.exact[-1]
    assert 0 < n_exact < n_pairs  # unrelated tokenizers share many tokens, not all


def test_chat_templates_align_assistant_content(tokenizers, tmp_path):
    # the student renders ChatML (<|im_start|>...), the teacher its Gemma-like template (<start_of_turn>...)
    _, teacher = tokenizers
    student = build_tokenizer(tmp_path / "chatml", vocab_size=400, chat_template=CHATML_TEMPLATE)
    rows = [{"messages": [{"role": "user", "content": "What does the teacher return?"},
                          {"role": "assistant", "content": "The teacher returns a value."}]}]
    s_ds, cfg = encode(student, rows, tmp_path, "chat")
    t_view = build_teacher_view(cfg, teacher, progress=False)
    item, t_item = s_ds[0], t_view[0]
    ids, spans, labels = item["input_ids"].numpy(), item["spans"], item["labels"].numpy()
    t_ids, t_spans = t_item["input_ids"].numpy(), t_item["spans"]
    assert "<start_of_turn>" in teacher.decode(t_ids) and "<|im_start|>" in student.decode(ids)
    canonical = "What does the teacher return?\nThe teacher returns a value.\n"  # the contents, one after another
    for tok, tok_ids, sp in ((student, ids, spans), (teacher, t_ids, t_spans)):
        pieces = token_bytes(tok)
        for i, (_, s, t, _) in zip(tok_ids, sp):
            if s >= 0 and s < t:  # a spanned token spells its canonical text; template tokens span nothing
                assert pieces[int(i)].decode("utf-8").strip() == canonical[s:t].strip()
        spanned = [int(i) for i, x in zip(tok_ids, sp) if x[1] >= 0 and x[1] < x[2]]
        assert tok.decode(spanned).replace(" ", "") == canonical.replace("\n", "").replace(" ", "")
    targets = np.nonzero(labels[1:] != -100)[0] + 1  # the student's assistant tokens
    vmap = build_vocab_map(student, teacher)
    al = align_targets(ids, spans, targets, t_ids, t_spans, vmap.student_to_teacher)
    answer = canonical.index("The teacher")
    assert set(al.student_targets) <= set(targets)
    # every aligned teacher position lies in the assistant's answer (the user's words are context only)
    assert len(al.teacher_targets) >= 4 and all(t_spans[q, 1] >= answer for q in al.teacher_targets)
    assert (spans[al.student_targets, 1] == t_spans[al.teacher_targets, 1]).all()


def test_whitespace_token_ids(tokenizers):
    teacher, student = tokenizers
    assert teacher.convert_tokens_to_ids("Ġ") in whitespace_token_ids(teacher)
    assert student.convert_tokens_to_ids("▁") in whitespace_token_ids(student)
    assert teacher.convert_tokens_to_ids("the") not in whitespace_token_ids(teacher)
