"""Rows -> token ids and a loss mask, one example per row.

Formats (``data.format``; ``auto`` picks the first whose columns exist, in this order):

* ``text``: ``text_field`` tokenized (with the tokenizer's own special tokens, e.g. BOS),
  EOS appended; loss on every token.
* ``messages``: ``messages_field`` holds OpenAI-style ``{"role", "content"}`` lists,
  rendered with ``data.chat_template`` or the tokenizer's template.
* ``sharegpt``: ``conversations_field`` holds ``{"from", "value"}`` lists; converted to
  messages (human/user -> user, gpt/assistant -> assistant, system -> system).
* ``prompt_completion``: ``prompt_field`` and ``completion_field``. With a chat template,
  a user/assistant exchange (a prompt that is already a message list is extended by the
  completion); without one, ``prompt + completion + EOS`` tokenized separately.

Loss: with ``assistant_only_loss`` (default), chat examples carry loss only on the
assistant messages' content plus the template's end-of-turn token (e.g. ``<|im_end|>``),
never on role headers, and plain prompt/completion examples only on the completion and
EOS. Assistant character spans come from rendering prefixes of the conversation
(``messages[:i]`` with ``add_generation_prompt=True`` against ``messages[:i+1]``), then
tokens are picked with the fast tokenizer's offset mapping; no ``{% generation %}``
markers needed. Every chat example ends in EOS (appended, without loss under
``assistant_only_loss``, unless the rendering already ends in the EOS token, as ChatML
does when EOS is ``<|im_end|>``) so that packed examples stay separated.

Skipped, and counted in ``stats``: empty texts/conversations, and conversations without
an assistant turn under ``assistant_only_loss`` (they would carry no loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import DataError

FORMATS = ("text", "messages", "sharegpt", "prompt_completion")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
_BATCH = 512
_SENTINEL = "\u2063POTSTILL_ASSISTANT_SPAN\u2063"


@dataclass
class Encoded:
    """Tokenized examples of one split, flat: example ``k`` is ``tokens[o[k]:o[k+1]]``."""

    tokens: np.ndarray  # int32 (N,)
    loss: np.ndarray  # uint8 (N,), 1 where the token is a training target
    lengths: np.ndarray  # int64 (E,)
    format: str
    stats: dict[str, int] = field(default_factory=dict)  # rows, examples, empty, no_assistant
    spans: np.ndarray | None = None  # int32 (N, 4) with ``spans=True``: see :func:`token_spans`


# Columns of a spans array: the example's ordinal, the token's character span [start, end) in the
# example's canonical text, and flags (first / last token of its example).
SPAN_EXAMPLE, SPAN_START, SPAN_END, SPAN_FLAGS = range(4)
FIRST_TOKEN, LAST_TOKEN = 1, 2


def token_spans(text: str, offsets, ids, special_ids: frozenset, *, base: int = 0,
                window: tuple[int, int] | None = None, space_ids: frozenset = frozenset()) -> np.ndarray:
    """(L, 2) int64 character spans of tokens in canonical coordinates, -1 where a token spells
    no text of the canonical string (special tokens, zero-width pieces, template scaffolding).

    ``offsets`` are the fast tokenizer's (start, end) in ``text``; a token inside ``window``
    (a [lo, hi) slice of ``text``) maps to ``base + start - lo``; tokens outside are -1.
    Leading whitespace is trimmed from every span (a token that is only whitespace keeps it):
    byte-level BPE counts a word's leading space in its offsets ('Ġworld' -> ' world') and
    other tokenizers do not, so starts are compared where the visible text starts. A token of
    ``space_ids`` (:func:`whitespace_token_ids`) whose offsets cover visible text spans nothing.
    """
    lo, hi = window if window is not None else (0, len(text))
    out = np.full((len(ids), 2), -1, dtype=np.int64)
    for k, ((a, b), i) in enumerate(zip(offsets, ids)):
        if a >= b or i in special_ids or a < lo or b > hi:
            continue
        piece = text[a:b]
        stripped = piece.lstrip()
        if stripped:
            if i in space_ids:
                continue  # a space the tokenizer made up (Metaspace's prepended '▁' carries the next char's offsets)
            a += len(piece) - len(stripped)
        out[k] = (base + a - lo, base + b - lo)
    return out


def whitespace_token_ids(tokenizer) -> frozenset:
    """Ids of tokens that spell only whitespace ('▁', 'Ġ', 'Ċ', ' '): where such a token's offsets
    cover visible text, the tokenizer invented it (:func:`token_spans` drops its span)."""
    markers = "\u2581\u0120\u010a\u0109 \t\n\r"
    return frozenset(i for t, i in tokenizer.get_vocab().items() if t and not t.strip(markers))


def detect_format(columns: list[str], cfg, describe: str) -> str:
    """The format named by ``cfg.format``, or the one whose columns exist (``auto``)."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.text_field in columns:
        return "text"
    if cfg.messages_field in columns:
        return "messages"
    if cfg.conversations_field in columns:
        return "sharegpt"
    if cfg.prompt_field in columns and cfg.completion_field in columns:
        return "prompt_completion"
    hint = (" (these rows look like the messages of ONE conversation: wrap each conversation in a list)"
            if {"role", "content"} <= set(columns) else "")
    raise DataError(
        f"cannot tell the format of {describe}: columns found: {', '.join(columns) or 'none'}{hint}; set "
        f"data.text_field (plain text, now '{cfg.text_field}'), data.messages_field (role/content chats, now "
        f"'{cfg.messages_field}'), data.conversations_field (ShareGPT from/value, now '{cfg.conversations_field}') "
        f"or data.prompt_field + data.completion_field (now '{cfg.prompt_field}', '{cfg.completion_field}'), "
        "or set data.format")


def _required(fmt: str, cfg) -> list[tuple[str, str]]:
    return {"text": [(cfg.text_field, "text_field")], "messages": [(cfg.messages_field, "messages_field")],
            "sharegpt": [(cfg.conversations_field, "conversations_field")],
            "prompt_completion": [(cfg.prompt_field, "prompt_field"), (cfg.completion_field, "completion_field")],
            }[fmt]


def _format_of(rows, cfg, where: Callable[[int], str], describe: str, row_ids: np.ndarray) -> str:
    """The rows' format, once the columns it needs are known to exist."""
    columns = list(rows.column_names)
    fmt = detect_format(columns, cfg, describe)
    for col, opt in _required(fmt, cfg):
        if col not in columns:
            first = where(int(row_ids[0])) if len(rows) else describe
            raise DataError(f"{first}: row has no '{col}' field (format '{fmt}'; the rows have columns: "
                            f"{', '.join(columns) or 'none'}): set data.{opt} to the column that holds it")
    return fmt


def check_rows(rows, cfg, *, where: Callable[[int], str], describe: str = "the data") -> str:
    """Raise the DataError that tokenizing would raise for a missing, null or mistyped field or a
    malformed message, without a tokenizer: a cheap check of every row before any model loads.
    Returns the format. (Chat-template failures need the tokenizer and surface when tokenizing.)"""
    rows = rows.with_format(None)
    row_ids = np.arange(len(rows))
    fmt = _format_of(rows, cfg, where, describe, row_ids)
    for start in range(0, len(rows), _BATCH):
        batch = rows[start:start + _BATCH]
        for j in range(len(batch[next(iter(batch))])):
            r = start + j
            if fmt == "text":
                field_value(batch[cfg.text_field][j], cfg.text_field, "text_field", lambda r=r: where(r), (str,),
                            "a string")
            else:
                row_messages(fmt, batch, j, lambda r=r: where(r), cfg)
    return fmt


def tokenize_rows(rows, cfg, tokenizer, *, where: Callable[[int], str], describe: str = "the data",
                  row_ids: np.ndarray | None = None, progress: bool = False, desc: str = "tokenizing",
                  spans: bool = False) -> Encoded:
    """Format and tokenize every row of ``rows`` (a ``datasets.Dataset``); see the module doc.

    ``spans``: also record where each token sits in its example's *canonical text* (``Encoded.spans``),
    the coordinates two tokenizers share: the text itself (text format), the prompt then the
    completion (plain prompt_completion), the messages' contents one after another (chat, each
    tokenizer rendering its own template). Cross-tokenizer distillation aligns tokens by them."""
    from tqdm.auto import tqdm

    rows = rows.with_format(None)  # plain Python values, whatever format the caller set
    columns = list(rows.column_names)
    row_ids = np.arange(len(rows)) if row_ids is None else row_ids
    fmt = _format_of(rows, cfg, where, describe, row_ids)
    enc = _Encoder(fmt, cfg, tokenizer, where, spans=spans)
    with tqdm(total=len(rows), desc=desc, unit="row", disable=not progress) as bar:
        for start in range(0, len(rows), _BATCH):
            batch = rows[start:start + _BATCH]
            n = len(batch[columns[0]])
            enc.add_batch(batch, [int(i) for i in row_ids[start:start + n]])
            bar.update(n)
    return enc.finish(len(rows))


class _Encoder:
    def __init__(self, fmt: str, cfg, tokenizer, where: Callable[[int], str], *, spans: bool = False):
        self.fmt, self.cfg, self.tok, self.where = fmt, cfg, tokenizer, where
        self.eos = tokenizer.eos_token_id
        self.tokens: list[np.ndarray] = []
        self.loss: list[np.ndarray] = []
        self.spans: list[np.ndarray] | None = [] if spans else None
        if spans and not getattr(tokenizer, "is_fast", False):
            raise DataError(f"cross-tokenizer distillation aligns tokens by their character offsets, which "
                            f"{type(tokenizer).__name__} does not give (it is not a fast tokenizer): load it with "
                            "use_fast=True, or convert it to a tokenizers (Rust) tokenizer")
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", []) or []) | frozenset(
            i for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if getattr(t, "special", False))
        self.space_ids = whitespace_token_ids(tokenizer) if spans else frozenset()
        self.stats = {"empty": 0, "no_assistant": 0}
        has_template = cfg.chat_template is not None or bool(getattr(tokenizer, "chat_template", None))
        self.chat = ChatRenderer(tokenizer, cfg) if fmt in ("messages", "sharegpt") or (
            fmt == "prompt_completion" and has_template) else None

    def finish(self, n_rows: int) -> Encoded:
        lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        tokens = np.concatenate(self.tokens).astype(np.int32) if self.tokens else np.zeros(0, np.int32)
        loss = np.concatenate(self.loss).astype(np.uint8) if self.loss else np.zeros(0, np.uint8)
        stats = {"rows": n_rows, "examples": len(lengths), **self.stats}
        spans = None
        if self.spans is not None:
            spans = np.concatenate(self.spans).astype(np.int32) if self.spans else np.zeros((0, 4), np.int32)
        return Encoded(tokens, loss, lengths, self.fmt, stats, spans)

    def _value(self, batch: dict, col: str, opt: str, j: int, row_id: int, kinds: tuple, kind_name: str) -> Any:
        return field_value(batch[col][j], col, opt, lambda: self.where(row_id), kinds, kind_name)

    def _append(self, ids, mask, ends_in_eos: bool = False, spans: np.ndarray | None = None, end: int = 0) -> None:
        """One example. ``spans`` (L, 2) canonical character spans of ``ids`` (with ``spans=True``);
        ``end``: the canonical text's length, where an appended EOS sits (zero width)."""
        ids, mask = list(ids), list(mask)
        appended = not ends_in_eos and (not ids or ids[-1] != self.eos)
        if appended:
            ids.append(self.eos)
            mask.append(0 if (self.cfg.assistant_only_loss and self.fmt != "text") else 1)
        self.tokens.append(np.asarray(ids, dtype=np.int64))
        self.loss.append(np.asarray(mask, dtype=np.uint8))
        if self.spans is not None:
            rows = np.zeros((len(ids), 4), dtype=np.int64)
            rows[:, SPAN_EXAMPLE] = len(self.tokens) - 1
            rows[:len(spans), SPAN_START:SPAN_END + 1] = spans
            if appended:  # EOS ends the canonical text in every tokenization: a zero-width span at its end
                rows[-1, SPAN_START:SPAN_END + 1] = end
            rows[0, SPAN_FLAGS] |= FIRST_TOKEN
            rows[-1, SPAN_FLAGS] |= LAST_TOKEN
            self.spans.append(rows)

    def add_batch(self, batch: dict, row_ids: list[int]) -> None:
        cfg = self.cfg
        if self.fmt == "text":
            texts = [self._value(batch, cfg.text_field, "text_field", j, r, (str,), "a string")
                     for j, r in enumerate(row_ids)]
            kept = [t for t in texts if t.strip()]
            self.stats["empty"] += len(texts) - len(kept)
            if not kept:
                return
            if self.spans is None:
                for ids in self.tok(kept, add_special_tokens=True)["input_ids"]:
                    self._append(ids, [1] * len(ids))
                return
            enc = self.tok(kept, add_special_tokens=True, return_offsets_mapping=True)
            for text, ids, offs in zip(kept, enc["input_ids"], enc["offset_mapping"]):
                spans = token_spans(text, offs, ids, self.special_ids, space_ids=self.space_ids)
                self._append(ids, [1] * len(ids), spans=spans, end=len(text))
            return
        if self.fmt == "prompt_completion" and self.chat is None:
            self._plain_prompt_completion(batch, row_ids)
            return
        convs = []
        for j, r in enumerate(row_ids):
            msgs = self._messages(batch, j, r)
            if not msgs:
                self.stats["empty"] += 1
            elif cfg.assistant_only_loss and not any(m.get("role") == "assistant" for m in msgs):
                self.stats["no_assistant"] += 1
            else:
                convs.append((r, msgs))
        self._chat_batch(convs)

    def _messages(self, batch: dict, j: int, r: int) -> list[dict]:
        return row_messages(self.fmt, batch, j, lambda: self.where(r), self.cfg)

    def _chat_batch(self, convs: list[tuple[int, list[dict]]]) -> None:
        if not convs:
            return
        only = self.cfg.assistant_only_loss
        rendered = [self.chat.spans(msgs, self.where(r)) if only else (self.chat.render(msgs, where=self.where(r)), [])
                    for r, msgs in convs]
        texts = [text for text, _ in rendered]
        offsets = only or self.spans is not None
        if only:
            if not getattr(self.tok, "is_fast", False):
                raise DataError("assistant_only_loss needs a fast tokenizer (for its offset mapping), but "
                                f"{type(self.tok).__name__} is not one: load it with use_fast=True or set "
                                "data.assistant_only_loss=false")
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=offsets)
        eos_text = self.tok.eos_token
        for k, (text, spans) in enumerate(rendered):
            ids = enc["input_ids"][k]
            ends = bool(eos_text) and text.rstrip().endswith(eos_text)  # e.g. eos == <|im_end|>: no extra EOS
            canon, end = self._content_spans(text, enc["offset_mapping"][k], ids, convs[k][1]) if (
                self.spans is not None) else (None, 0)
            if not only:
                self._append(ids, [1] * len(ids), ends, canon, end)
                continue
            offs = np.asarray(enc["offset_mapping"][k], dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(ids), dtype=bool)
            for s, e in spans:
                mask |= (offs[:, 0] < e) & (offs[:, 1] > s)
            self._append(ids, mask.astype(np.uint8), ends, canon, end)

    def _content_spans(self, rendered: str, offsets, ids, msgs: list[dict]) -> tuple[np.ndarray, int]:
        """Canonical spans of a rendered conversation's tokens: the messages' contents one after
        another (each followed by one separator position), located in this tokenizer's rendering in
        order; tokens of the template around them span nothing. Returns (spans, canonical length)."""
        out = np.full((len(ids), 2), -1, dtype=np.int64)
        cursor = base = 0
        for m in msgs:
            content = m.get("content")
            content = content if isinstance(content, str) else ""
            for c in (content, content.strip()):
                at = rendered.find(c, cursor) if c else -1
                if at >= 0:
                    shift = content.find(c)  # a template that trims the content: keep canonical positions
                    part = token_spans(rendered, offsets, ids, self.special_ids, base=base + shift,
                                       window=(at, at + len(c)), space_ids=self.space_ids)
                    out = np.where(part >= 0, part, out)
                    cursor = at + len(c)
                    break
            base += len(content) + 1
        return out, base

    def _plain_prompt_completion(self, batch: dict, row_ids: list[int]) -> None:
        cfg = self.cfg
        pairs = []
        for j, r in enumerate(row_ids):
            p = self._value(batch, cfg.prompt_field, "prompt_field", j, r, (str, list, tuple), "a string")
            c = self._value(batch, cfg.completion_field, "completion_field", j, r, (str, list, tuple), "a string")
            if not isinstance(p, str) or not isinstance(c, str):
                ChatRenderer(self.tok, cfg)  # message lists need a template: raises the clear error
            if not (p + c).strip():
                self.stats["empty"] += 1
            else:
                pairs.append((p, c))
        if not pairs:
            return
        with_offsets = self.spans is not None
        prompts = self.tok([p for p, _ in pairs], add_special_tokens=True, return_offsets_mapping=with_offsets)
        completions = self.tok([c for _, c in pairs], add_special_tokens=False, return_offsets_mapping=with_offsets)
        for k, (p_ids, c_ids) in enumerate(zip(prompts["input_ids"], completions["input_ids"])):
            spans = None
            if with_offsets:  # canonical text: the prompt, one separator, the completion; EOS at its end
                p, c = pairs[k]
                end = len(p) + 1 + len(c)
                spans = np.concatenate([
                    token_spans(p, prompts["offset_mapping"][k], p_ids, self.special_ids, space_ids=self.space_ids),
                    token_spans(c, completions["offset_mapping"][k], c_ids, self.special_ids, base=len(p) + 1,
                                space_ids=self.space_ids),
                    [[end, end]]])
            c_ids = list(c_ids) + [self.eos]
            p_mask = 0 if cfg.assistant_only_loss else 1
            self._append(list(p_ids) + c_ids, [p_mask] * len(p_ids) + [1] * len(c_ids), spans=spans)


def field_value(value: Any, col: str, opt: str, where: Callable[[], str], kinds: tuple, kind_name: str) -> Any:
    """``value`` of column ``col`` in one row, or the DataError naming the row (``where()``) and the
    ``data.<opt>`` setting that picks the column."""
    if value is None:
        raise DataError(f"{where()}: row has no '{col}' field (missing or null): add it to every "
                        f"row, drop the row, or set data.{opt} to the column that holds it")
    if not isinstance(value, kinds):
        raise DataError(f"{where()}: field '{col}' is a {type(value).__name__}, expected {kind_name}: "
                        "fix the row or set data.format")
    return value


def row_messages(fmt: str, batch: dict, j: int, where: Callable[[], str], cfg) -> list[dict]:
    """Row ``j`` of a chat-like batch as checked messages (messages, sharegpt, prompt_completion)."""
    if fmt == "messages":
        conv = field_value(batch[cfg.messages_field][j], cfg.messages_field, "messages_field", where, (list, tuple),
                           "a list of messages")
        at = where() if conv else ""
        return [_check_message(m, k, at, cfg.messages_field) for k, m in enumerate(conv)]
    if fmt == "sharegpt":
        conv = field_value(batch[cfg.conversations_field][j], cfg.conversations_field, "conversations_field", where,
                           (list, tuple), "a list of {from, value} turns")
        at = where() if conv else ""
        return [_sharegpt_turn(t, k, at, cfg.conversations_field) for k, t in enumerate(conv)]
    prompt = field_value(batch[cfg.prompt_field][j], cfg.prompt_field, "prompt_field", where, (str, list, tuple),
                         "a string or messages")
    completion = field_value(batch[cfg.completion_field][j], cfg.completion_field, "completion_field", where,
                             (str, list, tuple), "a string or messages")
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    msgs += [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    at = where()
    return [_check_message(m, k, at, cfg.prompt_field) for k, m in enumerate(msgs)]


def _check_message(m: Any, k: int, where: str, col: str) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise DataError(f"{where}: message {k} of '{col}' has no 'role' (got {str(m)[:80]!r}): each message "
                        "needs 'role' and 'content' (for from/value turns set data.format=sharegpt)")
    return {key: v for key, v in m.items() if v is not None}


def _sharegpt_turn(t: Any, k: int, where: str, col: str) -> dict:
    if not isinstance(t, dict) or "from" not in t or "value" not in t:
        raise DataError(f"{where}: turn {k} of '{col}' is not a {{from, value}} dict (got {str(t)[:80]!r}): fix "
                        "the row (for role/content messages set data.format=messages)")
    role = SHAREGPT_ROLES.get(str(t["from"]).lower())
    if role is None:
        raise DataError(f"{where}: turn {k} of '{col}' has unknown speaker '{t['from']}': use one of "
                        f"{', '.join(SHAREGPT_ROLES)}")
    return {"role": role, "content": t["value"]}


class ChatRenderer:
    """Renders conversations with the chat template and finds the assistant character spans."""

    def __init__(self, tokenizer, cfg):
        self.tok = tokenizer
        self.template = cfg.chat_template
        try:
            tokenizer.get_chat_template(cfg.chat_template)
        except (ValueError, AttributeError):
            raise DataError(
                f"the tokenizer ({type(tokenizer).__name__}) has no chat template and data.chat_template is not "
                "set, so chat rows cannot be rendered: set data.chat_template to a Jinja chat template (e.g. "
                "ChatML), or use data.format=text for plain text") from None
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials = set(getattr(tokenizer, "all_special_tokens", [])) | {
            str(t) for t in added.values() if getattr(t, "special", False)}
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)

    def render(self, msgs: list[dict], gen: bool = False, *, where: str = "") -> str:
        try:
            return self.tok.apply_chat_template(msgs, chat_template=self.template, tokenize=False,
                                                add_generation_prompt=gen)
        except Exception as err:  # noqa: BLE001 - jinja errors and template raise_exception()
            raise DataError(f"{where}: the chat template failed on this conversation ({type(err).__name__}: "
                            f"{err}): fix the roles or their order, or set data.chat_template") from None

    def spans(self, msgs: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the character spans of assistant content + end-of-turn token."""
        full = self.render(msgs, where=where)
        spans = []
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            if i == 0:  # nothing to render before it: cut a probe at a sentinel content
                probe = self.render([{**m, "content": _SENTINEL}], where=where)
                prefix = probe[:max(probe.find(_SENTINEL), 0)]
            else:
                prefix = self.render(msgs[:i], gen=True, where=where)
            upto = self.render(msgs[:i + 1], where=where)
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise DataError(
                    f"{where}: the chat template is not prefix-consistent (the conversation rendered up to "
                    f"message {i} does not extend the rendering of the earlier messages), so assistant tokens "
                    "cannot be located: set data.assistant_only_loss=false to train on all tokens, or set "
                    "data.chat_template to a template that renders earlier turns the same way")
            begin, end = self._turn_span(upto[len(prefix):], m.get("content"))
            spans.append((len(prefix) + begin, len(prefix) + end))
        return full, spans

    def _turn_span(self, turn: str, content: Any) -> tuple[int, int]:
        """Within an assistant turn (the text after the generation prompt): from the content
        (if the generation prompt is shorter than the turn's header, the rest of the header is
        skipped) to the end of the first special token after it (the end-of-turn marker)."""
        begin = frm = 0
        if isinstance(content, str) and content.strip():
            for c in (content, content.strip()):
                k = turn.find(c)
                if k >= 0:
                    begin, frm = k, k + len(c)
                    break
        hits = [(turn.find(s, frm), -len(s)) for s in self.specials if turn.find(s, frm) >= 0]
        if not hits:
            return begin, len(turn)
        pos, neg_len = min(hits)
        return begin, pos - neg_len
