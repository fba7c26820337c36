"""The cross-tokenizer vocabulary map on real tokenizers: the demo teacher's byte-level BPE and a
SentencePiece-style Unigram trained here (tiny.build_unigram_tokenizer)."""

from __future__ import annotations

import json
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tiny

from potstill.errors import ModelError
from potstill.models.vocab_map import VocabMap, build_vocab_map, token_bytes

DEMO_TEACHER = Path(__file__).resolve().parents[2] / "src" / "potstill" / "assets" / "demo-teacher"

TEXTS = [
    "Hello world",
    "def f(x):\n\treturn x  +  1\n\n",
    "Grüße, naïve café — “quotes” and ½",
    "日本語のテキスト, 中文, 한국어",
    "emoji 😀👍🏽 and a flag 🇫🇷 end",
    "tabs\t\tand   spaces\n \n  trailing  ",
]


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_TEACHER)


@pytest.fixture(scope="module")
def unigram(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("unigram")
    tiny.build_unigram_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def _fast_from_json(state: dict, like):
    """A fast tokenizer from an edited tokenizer.json, with the specials of ``like``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                   **{k: v for k, v in like.special_tokens_map.items() if isinstance(v, str)})


def _spelled(tokenizer, table, text):
    return b"".join(table[i] for i in tokenizer(text, add_special_tokens=False)["input_ids"])


# --- the unigram fixture itself ------------------------------------------------------------------

def test_unigram_tokenizer_loads_back_fast(unigram):
    assert unigram.is_fast and len(unigram) == 2000
    assert (unigram.bos_token, unigram.eos_token, unigram.pad_token, unigram.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    enc = unigram("Hello world", return_offsets_mapping=True)
    assert enc["input_ids"][0] == unigram.bos_token_id and enc["offset_mapping"][0] == (0, 0)
    assert unigram.decode(enc["input_ids"], skip_special_tokens=True) == "Hello world"
    chat = unigram.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>assistant\n"


# --- token_bytes ---------------------------------------------------------------------------------

def test_byte_level_round_trip(demo):
    table = token_bytes(demo)
    assert len(table) == len(demo)
    vocab = demo.get_vocab()
    assert table[vocab["Ġthe"]] == b" the" and table[vocab["Ċ"]] == b"\n" and table[vocab["ĉ"]] == b"\t"
    assert [table[i] for i in demo.all_special_ids] == [None] * len(demo.all_special_ids)
    for text in TEXTS + [" leading space"]:
        assert _spelled(demo, table, text) == text.encode("utf-8"), text


def test_byte_level_is_fast(demo):
    start = time.perf_counter()
    token_bytes(demo)
    assert time.perf_counter() - start < 0.5  # ~10 ms for 8192 tokens; 150k tokens take ~0.2 s


def test_unigram_round_trip_up_to_the_metaspace_space(unigram):
    """The concatenated bytes are the NFKC-normalized text with the space that Metaspace
    (prepend_scheme='always') puts before the first word: one b' ' in front, unless the text
    already starts with a space. (The decoder drops that space again; token_bytes keeps it.)"""
    table = token_bytes(unigram)
    for text in TEXTS:
        assert _spelled(unigram, table, text) == b" " + unicodedata.normalize("NFKC", text).encode("utf-8"), text
    for text in (" leading space", "  two leading"):
        assert _spelled(unigram, table, text) == text.encode("utf-8"), text
    # NFKC is the tokenizer's: the ligature comes back as two letters.
    assert _spelled(unigram, table, "ﬁne") == b" fine"


def test_unigram_pieces(unigram):
    table = token_bytes(unigram)
    vocab = unigram.get_vocab()
    assert table[vocab["▁the"]] == b" the" and table[vocab["▁"]] == b" "
    assert all(table[vocab[f"<0x{b:02X}>"]] == bytes([b]) for b in range(256))
    assert unigram.convert_ids_to_tokens(unigram("a\tb", add_special_tokens=False)["input_ids"]).count("<0x09>") == 1
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
    assert [table[vocab[s]] for s in specials] == [None] * 6


def test_llama_style_sequence_decoder_reads_the_same(unigram):
    """Llama/Mistral: Sequence[Replace('▁', ' '), ByteFallback, Fuse, Strip(' ', 1, 0)] gives the same
    bytes as Metaspace + ByteFallback (the Strip after Fuse is positional, not per token)."""
    state = json.loads(unigram.backend_tokenizer.to_str())
    state["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    llama_like = _fast_from_json(state, unigram)
    assert llama_like.decode(llama_like("Hi\tthere", add_special_tokens=False)["input_ids"]) == "Hi\tthere"
    assert token_bytes(llama_like) == token_bytes(unigram)


def test_no_decoder_reads_the_pre_tokenizer(demo):
    state = json.loads(demo.backend_tokenizer.to_str())
    state["decoder"] = None
    assert token_bytes(_fast_from_json(state, demo)) == token_bytes(demo)


def test_wordpiece(tmp_path):
    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nplay\n##ing\n##s\n", encoding="utf-8")
    bert = BertTokenizer(str(tmp_path / "vocab.txt"))
    assert bert.is_fast
    # Word-initial spaces are implicit in WordPiece: 'the' is b'the', '##ing' continues a word.
    assert token_bytes(bert) == [None] * 5 + [b"the", b"play", b"ing", b"s"]


def test_unreadable_decoder_falls_back_to_convert_tokens_to_string(demo):
    state = json.loads(demo.backend_tokenizer.to_str())
    state["decoder"] = {"type": "CTC", "pad_token": "<pad>", "word_delimiter_token": "|", "cleanup": False}
    ctc = _fast_from_json(state, demo)
    table = token_bytes(ctc)
    tokens = ctc.convert_ids_to_tokens(list(range(3, 300)))
    assert table[3:300] == [ctc.convert_tokens_to_string([t]).encode("utf-8") for t in tokens]
    assert table[demo.get_vocab()["Ġthe"]] == "Ġthe".encode()  # CTC does not undo byte-level


# --- build_vocab_map -----------------------------------------------------------------------------

def _assert_one_to_one(vmap: VocabMap):
    s2t, t2s = vmap.student_to_teacher, vmap.teacher_to_student
    assert s2t.dtype == np.int64 and t2s.dtype == np.int64
    s = np.flatnonzero(s2t >= 0)
    t = np.flatnonzero(t2s >= 0)
    assert len(s) == len(t) == vmap.n_mapped
    assert (t2s[s2t[s]] == s).all() and (s2t[t2s[t]] == t).all()
    assert len(np.unique(s2t[s])) == len(s)


def test_identical_tokenizers_map_to_themselves(demo):
    vmap = build_vocab_map(demo, demo)
    _assert_one_to_one(vmap)
    ids = np.arange(len(demo))
    # every id, special ones too (a special token maps to the other side's special of the same text)
    assert (vmap.student_to_teacher == ids).all() and (vmap.teacher_to_student == ids).all()
    assert len(demo.all_special_ids) >= 2
    assert vmap.describe() == "8192 of 8192 teacher tokens and 8192 of 8192 student tokens spell the same bytes"


def test_identical_unigram_keeps_the_smallest_id_of_equal_bytes(unigram):
    """'▁' and '<0x20>' both spell b' ' (as '\\n' and '<0x0A>' do): only the smaller id is mapped."""
    vmap = build_vocab_map(unigram, unigram)
    _assert_one_to_one(vmap)
    table = token_bytes(unigram)
    first: dict[bytes, int] = {}
    for i, b in enumerate(table):
        if b is not None:
            first.setdefault(b, i)
    vocab = unigram.get_vocab()
    specials = set(unigram.all_special_ids)
    for i, b in enumerate(table):
        expected = i if b is not None and first[b] == i else -1
        if i in specials:  # a special token maps to the special of the same text: itself
            expected = i
        assert vmap.student_to_teacher[i] == expected, (i, b)
    assert vmap.student_to_teacher[vocab["<0x20>"]] == -1 and vmap.student_to_teacher[vocab["▁"]] == vocab["▁"]


def test_cross_tokenizer_map(demo, unigram):
    vmap = build_vocab_map(unigram, demo)  # student: unigram, teacher: demo
    _assert_one_to_one(vmap)
    s2t, t2s = vmap.student_to_teacher, vmap.teacher_to_student
    assert s2t.shape == (len(unigram),) and t2s.shape == (len(demo),)
    u, d = unigram.get_vocab(), demo.get_vocab()
    ub, db = token_bytes(unigram), token_bytes(demo)
    # Every pair spells the same bytes (EOS aside).
    for s in np.flatnonzero(s2t >= 0):
        if s != unigram.eos_token_id:
            assert ub[s] == db[s2t[s]]
    assert s2t[u["▁the"]] == d["Ġthe"] and t2s[d["Ġthe"]] == u["▁the"]
    assert s2t[u["\n"]] == d["Ċ"] and s2t[u["<0x0A>"]] == -1  # '\n' has a smaller id than its byte piece
    assert s2t[u["<0xE6>"]] == d["æ"]  # a byte piece <-> the byte-level stand-in for the same byte
    # One side only: the other side has no token with those bytes.
    only_unigram = next(i for i, b in enumerate(ub) if b and b not in set(db))
    only_demo = next(i for i, b in enumerate(db) if b and b not in set(ub))
    assert s2t[only_unigram] == -1 and t2s[only_demo] == -1
    # Specials (their texts differ here: </s> <start_of_turn> vs <|endoftext|> <|im_start|>) unmapped,
    # except EOS <-> EOS.
    assert s2t[unigram.eos_token_id] == demo.eos_token_id and t2s[demo.eos_token_id] == unigram.eos_token_id
    for s in unigram.all_special_ids:
        if s != unigram.eos_token_id:
            assert s2t[s] == -1
    for t in demo.all_special_ids:
        if t != demo.eos_token_id:
            assert t2s[t] == -1
    assert 500 < vmap.n_mapped < len(unigram)
    n = vmap.n_mapped
    assert vmap.describe() == f"{n} of 8192 teacher tokens and {n} of 2000 student tokens spell the same bytes"


def test_head_rows_beyond_the_tokenizer_stay_unmapped(demo, unigram):
    plain = build_vocab_map(unigram, demo)
    padded = build_vocab_map(unigram, demo, student_rows=len(unigram) + 48, teacher_rows=len(demo) + 64)
    assert padded.student_to_teacher.shape == (len(unigram) + 48,) and padded.teacher_to_student.shape == (8256,)
    assert (padded.student_to_teacher[len(unigram):] == -1).all() and (padded.teacher_to_student[8192:] == -1).all()
    assert (padded.student_to_teacher[:len(unigram)] == plain.student_to_teacher).all()
    assert (padded.teacher_to_student[:8192] == plain.teacher_to_student).all()
    _assert_one_to_one(padded)


def test_slow_tokenizer_is_one_clear_error(tmp_path, demo):
    from transformers import BertTokenizerLegacy

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n", encoding="utf-8")
    slow = BertTokenizerLegacy(str(tmp_path / "vocab.txt"))
    assert not slow.is_fast
    for call in (lambda: build_vocab_map(slow, demo), lambda: build_vocab_map(demo, slow), lambda: token_bytes(slow)):
        with pytest.raises(ModelError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "no fast (Rust) tokenizer" in message and "use_fast=True" in message
    with pytest.raises(ModelError, match="the teacher tokenizer .*no fast"):
        build_vocab_map(demo, slow)
    with pytest.raises(ModelError, match="no fast"):
        token_bytes(object())
