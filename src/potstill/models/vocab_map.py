"""Cross-tokenizer vocabulary map: which student id and which teacher id spell the same bytes.

When teacher and student tokenizers differ, their logits live over different vocabularies.
Tokens are aligned by character offsets elsewhere; here each tokenizer's ids are paired
by the UTF-8 bytes they contribute to decoded text (:func:`token_bytes`), so that a
distillation loss can compare probabilities of tokens that mean the same text.

:func:`token_bytes` reads the fast tokenizer's serialized backend (``tokenizer.json``:
"decoder", "pre_tokenizer", "model") and undoes the decoder per token, in one pass
over the vocabulary, without a decode call per token:

* **byte-level BPE** (GPT-2, Llama 3, Qwen): the ``bytes_to_unicode`` table inverted,
  ``'Ġworld'`` -> ``b' world'``, ``'Ċ'`` -> ``b'\\n'``. A token with a character outside the
  table (an added token written with a real space) is its own UTF-8, as the Rust decoder does.
* **Metaspace / SentencePiece** (Metaspace decoder, or Llama/Mistral/Gemma's Sequence of
  Replace / ByteFallback / Fuse / Strip): the replacement character (``'▁'``, read from the
  decoder) -> ``b' '``; byte-fallback pieces ``'<0x0A>'`` -> ``b'\\n'`` (also when only the
  model declares ``byte_fallback``). The decoders' *positional* edits are not per-token and
  are left out: the Metaspace decoder and a ``Strip`` after ``Fuse`` drop the space that
  starts the decoded text, so ``token_bytes`` of ``'▁Hello'`` is ``b' Hello'`` even where a
  decode of that single token gives ``'Hello'``.
* **WordPiece** (BERT): ``'##ing'`` -> ``b'ing'``, other tokens their text. The space before a
  word-initial token is implicit there (the decoder inserts it between tokens), so it is
  not part of the token's bytes: ``'the'`` is ``b'the'``, never ``b' the'``.
* ``BPEDecoder`` (``'</w>'`` suffix -> space) and ``Replace`` (string patterns; regex patterns
  with Python's ``re``) are applied per token as well. Without any decoder, the pre-tokenizer
  (ByteLevel, Metaspace) or the model (WordPiece) says how to read tokens; failing that a
  token is its own text.
* A decoder that cannot be read per token (``CTC``, a custom one): each token goes through
  ``tokenizer.convert_tokens_to_string([token])``, encoded UTF-8 (a Python call per token).

Special and control tokens (bos/eos/pad/unk, chat markers such as ``<|im_start|>``: every
added token flagged special, every id in ``all_special_ids``, the model's unk) are ``None``.
Added tokens *not* flagged special are text and get their bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelError
from .loading import describe

__all__ = ["VocabMap", "build_vocab_map", "token_bytes"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_table() -> dict[int, str]:
    """``str.translate`` table undoing GPT-2's ``bytes_to_unicode``: each printable stand-in char
    -> the latin-1 char of its byte; code points below 256 that are *not* stand-ins -> U+FFFF, so
    that ``.encode('latin-1')`` fails on them (and on every other char outside the table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in = {b: b for b in printable}
    shift = 0
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = 256 + shift
            shift += 1
    table: dict[int, str] = {cp: "\uffff" for cp in range(256)}
    for b, cp in stand_in.items():
        table[cp] = chr(b)
    return table


_BYTE_LEVEL = _byte_level_table()


def _byte_level(token: str) -> bytes:
    try:
        return token.translate(_BYTE_LEVEL).encode("latin-1")
    except UnicodeEncodeError:  # a char outside the table: the Rust decoder keeps the token's own UTF-8
        return token.encode("utf-8")


def _is_fast(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "is_fast", False)) and getattr(tokenizer, "backend_tokenizer", None) is not None


def _require_fast(tokenizer: Any, role: str) -> None:
    if not _is_fast(tokenizer):
        raise ModelError(
            f"the {role} tokenizer {describe(tokenizer)} has no fast (Rust) tokenizer, so potstill cannot read its "
            "vocabulary bytes or character offsets: load it with use_fast=True or convert it to a tokenizer.json "
            "(transformers.PreTrainedTokenizerFast)")


def _types(component: dict | None) -> list[dict]:
    """A normalizer/pre-tokenizer/decoder and, for a Sequence, its parts, flattened in order."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        parts = component.get("decoders") or component.get("pretokenizers") or []
        return [leaf for part in parts for leaf in _types(part)]
    return [component]


def _strip(token: str, content: str, start: int, stop: int) -> str:
    """The ``Strip`` decoder on one token: up to ``start`` leading and ``stop`` trailing ``content`` chars."""
    i, j = 0, len(token)
    while i < min(start, j) and token[i] == content:
        i += 1
    k = 0
    while k < stop and j > i and token[j - 1] == content:
        j -= 1
        k += 1
    return token[i:j]


def _decode_steps(state: dict) -> list[dict] | None:
    """The decoder steps to undo per token, or None when the decoder cannot be read per token."""
    model = state.get("model") or {}
    steps: list[dict] = []
    if model.get("byte_fallback"):
        steps.append({"type": "ByteFallback"})
    decoder = state.get("decoder")
    if decoder is None:  # no decoder: infer from the pre-tokenizer or the model
        for pre in _types(state.get("pre_tokenizer")):
            if pre.get("type") in ("ByteLevel", "Metaspace"):
                steps.append(pre)
                break
        else:
            if model.get("type") == "WordPiece":
                steps.append({"type": "WordPiece", "prefix": model.get("continuing_subword_prefix") or "##"})
        return steps
    known = {"ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip", "WordPiece", "BPEDecoder"}
    leaves = _types(decoder)
    if any(leaf.get("type") not in known for leaf in leaves):
        return None
    return steps + leaves


def _apply(steps: list[dict], tokens: list[str | bytes | None]) -> list[str | bytes | None] | None:
    """Undo each decoder step on every token; str stays text, bytes are final. None: not readable."""
    fused = False
    for step in steps:
        kind = step["type"]
        if kind == "ByteLevel":
            tokens = [_byte_level(t) if isinstance(t, str) else t for t in tokens]
        elif kind == "Metaspace":
            repl = step.get("replacement") or "▁"
            tokens = [t.replace(repl, " ") if isinstance(t, str) else t for t in tokens]
        elif kind == "Replace":
            pattern, content = step.get("pattern") or {}, step.get("content", "")
            if "String" in pattern:
                old = pattern["String"]
                tokens = [t.replace(old, content) if isinstance(t, str) else t for t in tokens]
            else:
                try:
                    regex = re.compile(pattern.get("Regex", ""))
                except re.error:
                    return None
                tokens = [regex.sub(lambda _, c=content: c, t) if isinstance(t, str) else t for t in tokens]
        elif kind == "ByteFallback":
            out: list[str | bytes | None] = []
            for t in tokens:
                m = _BYTE_PIECE.fullmatch(t) if isinstance(t, str) else None
                out.append(bytes([int(m.group(1), 16)]) if m else t)
            tokens = out
        elif kind == "Fuse":
            fused = True  # joins tokens: nothing per token, but a later Strip is positional
        elif kind == "Strip":
            if not fused:  # before Fuse, Strip works on each token
                content, start, stop = step.get("content", " "), int(step.get("start", 0)), int(step.get("stop", 0))
                tokens = [_strip(t, content, start, stop) if isinstance(t, str) else t for t in tokens]
        elif kind == "WordPiece":
            prefix = step.get("prefix", "##")
            tokens = [t[len(prefix):] if isinstance(t, str) and prefix and t.startswith(prefix) else t
                      for t in tokens]
        elif kind == "BPEDecoder":
            suffix = step.get("suffix", "</w>")
            tokens = [t.replace(suffix, " ") if isinstance(t, str) and suffix else t for t in tokens]
        else:
            return None
    return tokens


def _control_ids(tokenizer: Any, state: dict, n: int) -> set[int]:
    """Ids that are not text: added tokens flagged special, ``all_special_ids``, the model's unk."""
    ids = {int(t["id"]) for t in state.get("added_tokens") or [] if t.get("special")}
    ids.update(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None)
    model = state.get("model") or {}
    if model.get("type") == "Unigram" and model.get("unk_id") is not None:
        ids.add(int(model["unk_id"]))
    elif model.get("unk_token"):
        unk = tokenizer.backend_tokenizer.token_to_id(model["unk_token"])
        if unk is not None:
            ids.add(int(unk))
    return {i for i in ids if 0 <= i < n}


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """For every id in ``range(len(tokenizer))``: the UTF-8 bytes that token contributes to decoded
    text, or None for special/control tokens and ids with no token. See the module docstring
    for what each tokenizer kind gives. Raises :class:`ModelError` for a slow tokenizer."""
    _require_fast(tokenizer, "given")
    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str())
    n = len(tokenizer)
    tokens: list[str | bytes | None] = [None] * n
    for tok, i in backend.get_vocab(with_added_tokens=True).items():
        if 0 <= i < n:
            tokens[i] = tok
    for i in _control_ids(tokenizer, state, n):
        tokens[i] = None
    steps = _decode_steps(state)
    undone = _apply(steps, tokens) if steps is not None else None
    if undone is None:  # a decoder we cannot read per token: ask transformers, one token at a time
        undone = [tokenizer.convert_tokens_to_string([t]) if isinstance(t, str) else t for t in tokens]
    return [t.encode("utf-8") if isinstance(t, str) else t for t in undone]


@dataclass
class VocabMap:
    """Student id <-> teacher id for tokens that spell the same bytes (and EOS <-> EOS).

    ``student_to_teacher``: (Vs,) int64, the teacher id of each student row, -1 where unmapped;
    ``teacher_to_student``: (Vt,) int64, the inverse. Vs/Vt are the model heads' rows (padding
    rows included, always -1) or the tokenizers' lengths. The map is one-to-one:
    ``teacher_to_student[student_to_teacher[s]] == s`` wherever ``student_to_teacher[s] >= 0``.
    """

    student_to_teacher: np.ndarray
    teacher_to_student: np.ndarray

    @property
    def n_mapped(self) -> int:
        """Number of mapped pairs (the EOS pair included)."""
        return int((self.student_to_teacher >= 0).sum())

    def describe(self) -> str:
        n = self.n_mapped
        return (f"{n} of {len(self.teacher_to_student)} teacher tokens and {n} of {len(self.student_to_teacher)} "
                "student tokens spell the same bytes")


def _specials(tokenizer: Any) -> dict[int, str]:
    """id -> text of the tokenizer's special tokens (those :func:`token_bytes` gives None)."""
    out = {int(i): str(t) for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
           if getattr(t, "special", False)}
    for t, i in zip(getattr(tokenizer, "all_special_tokens", []) or [], getattr(tokenizer, "all_special_ids", []) or []):
        out.setdefault(int(i), str(t))
    return out


def _rows(rows: int | None, tokenizer: Any, role: str) -> int:
    if rows is None:
        return len(tokenizer)
    if isinstance(rows, bool) or int(rows) != rows or rows <= 0:
        raise ValueError(f"{role}_rows must be a positive int, got {rows!r}")
    return int(rows)


def build_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any, *, student_rows: int | None = None,
                    teacher_rows: int | None = None) -> VocabMap:
    """Pair student and teacher ids whose :func:`token_bytes` are equal (and non-empty).

    One-to-one: where several ids of one side spell the same bytes, the smallest id is kept.
    Special tokens map to the other side's special token of the same text (two ChatML
    tokenizers' ``<|im_end|>``), and each side's EOS to the other's (both predict "end of
    text"); other special tokens stay unmapped. Arrays have ``student_rows`` / ``teacher_rows`` entries (the heads' rows, which may
    exceed the tokenizer with padding rows, left -1), by default ``len(tokenizer)``; ids at or
    beyond a head's rows cannot be predicted and are left out.
    """
    _require_fast(student_tokenizer, "student")
    _require_fast(teacher_tokenizer, "teacher")
    vs = _rows(student_rows, student_tokenizer, "student")
    vt = _rows(teacher_rows, teacher_tokenizer, "teacher")
    student_to_teacher = np.full(vs, -1, dtype=np.int64)
    teacher_to_student = np.full(vt, -1, dtype=np.int64)
    teacher_ids: dict[bytes, int] = {}
    for t, b in enumerate(token_bytes(teacher_tokenizer)[:vt]):
        if b:
            teacher_ids.setdefault(b, t)
    for s, b in enumerate(token_bytes(student_tokenizer)[:vs]):
        t = teacher_ids.pop(b, None) if b else None  # pop: a later student id with the same bytes finds none
        if t is not None:
            student_to_teacher[s] = t
            teacher_to_student[t] = s
    # Special tokens with the same text in both (ChatML's <|im_end|> in two tokenizers) are the same marker.
    t_special = {str(t): i for i, t in _specials(teacher_tokenizer).items() if 0 <= i < vt and teacher_to_student[i] < 0}
    for i, t in _specials(student_tokenizer).items():
        j = t_special.pop(str(t), None)
        if j is not None and 0 <= i < vs and student_to_teacher[i] < 0:
            student_to_teacher[i] = j
            teacher_to_student[j] = i
    s_eos, t_eos = getattr(student_tokenizer, "eos_token_id", None), getattr(teacher_tokenizer, "eos_token_id", None)
    if s_eos is not None and t_eos is not None and 0 <= s_eos < vs and 0 <= t_eos < vt:
        for s, t in ((s_eos, student_to_teacher[s_eos]), (teacher_to_student[t_eos], t_eos)):
            if s >= 0 and t >= 0:  # EOS is special, so unmapped by bytes; stay one-to-one regardless
                student_to_teacher[s] = -1
                teacher_to_student[t] = -1
        student_to_teacher[s_eos] = t_eos
        teacher_to_student[t_eos] = s_eos
    return VocabMap(student_to_teacher=student_to_teacher, teacher_to_student=teacher_to_student)
