"""Token alignment across two tokenizers, by character position in the same text.

Both tokenizations of an example carry canonical character spans
(:func:`potstill.data.formats.token_spans`: column 0 the example's ordinal, 1-2 the span
``[start, end)`` with leading whitespace trimmed, 3 first/last-token flags; -1 where a token
spells no canonical text). Two things are derived from them here:

* :func:`teacher_window`: for one student item (a packed block or one example, maybe cut
  mid-example), the teacher tokens that cover the same text: whole examples where the item
  holds the whole example, else the teacher tokens inside the item's character range. The
  teacher reads that window as its context.
* :func:`align_targets`: which next-token predictions of the two models answer the same
  question. Student position ``p - 1`` predicts token ``p``; teacher position ``q - 1``
  predicts token ``q``. When tokens ``p`` and ``q`` *start at the same character* of the same
  example, both distributions are over "what text comes next from here", given the same
  preceding text: an aligned pair. It is *exact* when they also end at the same character and
  spell the same bytes (the student id maps to the teacher id in the vocabulary map): then
  the two models name the same token and their distributions can be compared id by id on
  the ids both vocabularies share. Zero-width EOS tokens at an example's end align with each
  other. A student token no teacher token starts with (the teacher merged it into a longer
  token) gets no logit target; it still gets the hard-label loss.

Tokens that share a span (byte-level BPE splits one emoji into several byte pieces, all with
the character's offsets) count once: the first of them owns the start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import FIRST_TOKEN, LAST_TOKEN, SPAN_END, SPAN_EXAMPLE, SPAN_FLAGS, SPAN_START


def teacher_window(student_spans: np.ndarray, view_items: dict[int, tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The teacher tokens covering the text of one student item.

    ``student_spans`` (L, 4): the item's spans. ``view_items``: example ordinal -> (teacher ids
    (Le,), teacher spans (Le, 4)) of that whole example. Returns teacher ids (Lt,) int64 and
    spans (Lt, 4), examples in the item's order. An example the item holds from its first token
    is taken from the teacher's first token (BOS, template header), one it holds to its last
    token to the teacher's last; a cut side keeps the teacher tokens inside the item's
    character range.
    """
    ids_out, spans_out = [], []
    examples = student_spans[:, SPAN_EXAMPLE]
    order = examples[np.sort(np.unique(examples, return_index=True)[1])]
    for e in order:
        rows = student_spans[examples == e]
        if int(e) not in view_items:
            continue  # the teacher's tokenization dropped this example (nothing to align)
        t_ids, t_spans = view_items[int(e)]
        starts, ends = t_spans[:, SPAN_START], t_spans[:, SPAN_END]
        spanned = rows[rows[:, SPAN_START] >= 0]
        lo, hi = 0, len(t_ids)
        if not (rows[:, SPAN_FLAGS] & FIRST_TOKEN).any():
            if len(spanned) == 0:
                continue
            first = int(spanned[:, SPAN_START].min())
            after = np.nonzero(starts >= first)[0]
            lo = int(after[0]) if len(after) else len(t_ids)
        if not (rows[:, SPAN_FLAGS] & LAST_TOKEN).any():
            last = int(spanned[:, SPAN_END].max()) if len(spanned) else -1
            inside = (starts >= 0) & (ends <= last)
            if not ((spanned[:, SPAN_START] == last) & (spanned[:, SPAN_END] == last)).any():
                inside &= ~((starts == last) & (ends == last))  # the example's EOS is not in the item either
            inside = np.nonzero(inside)[0]
            hi = int(inside[-1]) + 1 if len(inside) else lo
            if not len(spanned):  # only the example's leading special tokens are in the item
                hi = int(np.argmax(starts >= 0)) if (starts >= 0).any() else len(t_ids)
        if hi > lo:
            ids_out.append(np.asarray(t_ids[lo:hi], dtype=np.int64))
            spans_out.append(np.asarray(t_spans[lo:hi]))
    if not ids_out:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.int32)
    return np.concatenate(ids_out), np.concatenate(spans_out)


def context_token(tokenizer) -> int | None:
    """The token a teacher reads before a text that starts without one: its BOS, else its EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def with_context_token(ids: np.ndarray, spans: np.ndarray, token_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` (L,), ``spans`` (L, 4) with ``token_id`` (the tokenizer's BOS, else its EOS) put in front
    when the first token spells text: a tokenizer without BOS would otherwise have no prediction
    for that token, where a packed stream has the previous example's EOS before it. The cache
    capture and the online teacher do the same, so both give a target there."""
    if token_id is None or not len(ids) or spans[0, SPAN_START] < 0:
        return ids, spans
    head = np.array([[spans[0, SPAN_EXAMPLE], -1, -1, 0]], dtype=spans.dtype)
    return np.concatenate([[token_id], ids]).astype(np.int64), np.concatenate([head, spans])


@dataclass
class Alignment:
    """Aligned next-token predictions of one row pair.

    ``student_targets`` (A,): positions ``p`` of the student's target tokens (its logits at
    ``p - 1``); ``teacher_targets`` (A,): the teacher's ``q`` (logits at ``q - 1``); ``exact`` (A,)
    bool: same span and the same bytes.
    """

    student_targets: np.ndarray
    teacher_targets: np.ndarray
    exact: np.ndarray


def _starts(spans: np.ndarray) -> dict[tuple[int, int], int]:
    """(example, start) -> the first position >= 1 whose token starts there (position 0 predicts
    nothing)."""
    out: dict[tuple[int, int], int] = {}
    for q in range(1, len(spans)):
        s = int(spans[q, SPAN_START])
        if s >= 0:
            out.setdefault((int(spans[q, SPAN_EXAMPLE]), s), q)
    return out


def align_targets(student_ids: np.ndarray, student_spans: np.ndarray, student_targets: np.ndarray,
                  teacher_ids: np.ndarray, teacher_spans: np.ndarray, student_to_teacher: np.ndarray) -> Alignment:
    """Pair the student's target positions ``student_targets`` (ascending, each >= 1) with the
    teacher positions whose token starts at the same character (see the module docstring).

    ``student_ids`` (L,), ``student_spans`` (L, 4); ``teacher_ids`` (Lt,), ``teacher_spans``
    (Lt, 4); ``student_to_teacher`` (Vs,) int64, -1 where a student id has no teacher twin.
    """
    teacher_at, student_first = _starts(teacher_spans), _starts(student_spans)
    sp, tq, ex = [], [], []
    for p in student_targets:
        p = int(p)
        key = (int(student_spans[p, SPAN_EXAMPLE]), int(student_spans[p, SPAN_START]))
        if key[1] < 0 or student_first.get(key) != p:
            continue  # spells no canonical text, or a later byte piece of a split character
        q = teacher_at.get(key)
        if q is None:
            continue
        sid = int(student_ids[p])
        same = (int(student_spans[p, SPAN_END]) == int(teacher_spans[q, SPAN_END])
                and 0 <= sid < len(student_to_teacher) and int(student_to_teacher[sid]) == int(teacher_ids[q]))
        sp.append(p)
        tq.append(q)
        ex.append(same)
    return Alignment(np.asarray(sp, np.int64), np.asarray(tq, np.int64), np.asarray(ex, bool))
