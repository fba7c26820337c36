"""A teacher whose tokenizer differs from the student's: its signal at aligned positions.

The student trains on its own tokenization (with canonical character spans, see
:mod:`potstill.data.alignment`). For each student item the teacher reads its own
tokenization of the same text (:func:`~potstill.data.alignment.teacher_window`), and at every
student target that starts at the same character as one of the teacher's tokens it gives its
top-k log-probs (in its own vocabulary, translated to student ids where a student token spells
the same bytes), as an ``aligned`` :class:`~potstill.teachers.signal.TeacherSignal`. The
objective compares them with :func:`potstill.losses.aligned.aligned_divergence`.

Two sources: :class:`OnlineAlignedTeacher` (a model in this process) and
:class:`CachedAlignedTeacher` (a cache captured with character offsets, any student tokenizer).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..data.alignment import Alignment, align_targets, teacher_window, with_context_token
from ..data.batching import MicroBatch
from ..data.formats import SPAN_EXAMPLE
from ..models.hidden import forward_hidden, supports_chunked
from ..models.vocab_map import VocabMap
from .base import Teacher
from .signal import AlignedTargets, TeacherSignal, topk_rows

log = logging.getLogger("potstill")


class AlignedTeacher(Teacher):
    """What both sources share: the student's items with spans, the vocabulary map, the
    alignment of one micro-batch and the counts that say how much of it aligned."""

    def __init__(self, *, train_ds, vocab_map: VocabMap, top_k: int, temperature: float):
        if getattr(train_ds, "spans", None) is None:
            raise ValueError("a cross-tokenizer teacher needs the student's data built with spans")
        self.train_ds = train_ds
        self.vocab_map = vocab_map
        self.top_k = top_k
        self.temperature = temperature
        self.counts = {"targets": 0, "aligned": 0, "exact": 0}
        self._said = False
        self._table: torch.Tensor | None = None  # teacher id -> student id, on the training device

    def _student_rows(self, batch: MicroBatch):
        """Per row: (token ids (L,), spans (L, 4), target positions p (ascending), index of its first
        valid row in the micro-batch's valid-row order)."""
        mask = batch.loss_mask.cpu().numpy()
        base = 0
        for b, index in enumerate(batch.example_indices):
            item = self.train_ds[index]
            ids, spans = item["input_ids"].numpy(), np.asarray(item["spans"])
            targets = np.nonzero(mask[b, :len(ids) - 1])[0] + 1
            yield ids, spans, targets, base
            base += len(targets)

    def _count(self, targets: int, al: Alignment) -> None:
        self.counts["targets"] += targets
        self.counts["aligned"] += len(al.student_targets)
        self.counts["exact"] += int(al.exact.sum())

    def _say_once(self) -> None:
        if self._said or not self.counts["targets"]:
            return
        self._said = True
        c = self.counts
        log.info("cross-tokenizer alignment (first micro-batch): %.1f%% of the student's %d loss tokens start where a "
                 "teacher token starts, %.1f%% are the same token in both (exact); the others get no teacher target "
                 "(loss.ce still trains them)", 100 * c["aligned"] / c["targets"], c["targets"], 100 * c["exact"] / c["targets"])

    def summary(self) -> dict[str, Any]:
        """summary.json's ``cross_tokenizer``: the student's loss tokens over every micro-batch so far,
        how many aligned and how many exactly, the shares, and the vocabulary map."""
        c = dict(self.counts)
        n = max(c["targets"], 1)
        return {**c, "aligned_share": c["aligned"] / n, "exact_share": c["exact"] / n,
                "vocabulary_map": self.vocab_map.describe(), "top_k": self.top_k}

    def _translate(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Teacher ids (A, k) -> student ids, -1 where a teacher token has no student twin."""
        if self._table is None or self._table.device != teacher_ids.device:
            self._table = torch.as_tensor(self.vocab_map.teacher_to_student, device=teacher_ids.device)
        table = self._table
        inside = teacher_ids < len(table)
        return torch.where(inside, table[teacher_ids.clamp(max=len(table) - 1)], torch.full_like(teacher_ids, -1))


class OnlineAlignedTeacher(AlignedTeacher):
    """A teacher model in this process reading its own tokenization of each student item.

    ``view``: the train split as the teacher tokenizes it (:func:`potstill.data.build_teacher_view`).
    """

    def __init__(self, model: nn.Module, *, view, train_ds, vocab_map: VocabMap, top_k: int, temperature: float,
                 pad_token_id: int | None, context_token: int | None = None,
                 autocast: Callable[[], Any] = contextlib.nullcontext):
        super().__init__(train_ds=train_ds, vocab_map=vocab_map, top_k=top_k, temperature=temperature)
        self._model = model
        self.view = view
        self.pad = int(pad_token_id or 0)
        self.context_token = context_token  # BOS, else EOS: before a window whose first token spells text
        self.autocast = autocast
        self.head = supports_chunked(model)[0]
        # example ordinal -> the view's item: the teacher view holds whole examples, one per item.
        first = np.asarray(view.offsets[:-1])
        self.view_item = {int(view.spans[int(o), SPAN_EXAMPLE]): k for k, o in enumerate(first)}

    @property
    def model(self) -> nn.Module | None:
        """None: evaluation feeds the student's token ids, which mean nothing to this teacher."""
        return None

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "teacher_parameters": sum(p.numel() for p in self._model.parameters())}

    def _example(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        item = self.view[self.view_item[e]]
        return item["input_ids"].numpy(), np.asarray(item["spans"])

    @torch.no_grad()
    def signal(self, batch: MicroBatch) -> TeacherSignal:
        device = batch.input_ids.device
        windows, rows, places, exact = [], [], [], []
        for b, (ids, spans, targets, base) in enumerate(self._student_rows(batch)):
            needed = {int(e): self._example(int(e)) for e in np.unique(spans[:, SPAN_EXAMPLE]) if int(e) in self.view_item}
            t_ids, t_spans = with_context_token(*teacher_window(spans, needed), self.context_token)
            al = align_targets(ids, spans, targets, t_ids, t_spans, self.vocab_map.student_to_teacher)
            self._count(len(targets), al)
            windows.append(t_ids)
            rows.append(base + np.searchsorted(targets, al.student_targets))
            places.append(np.stack([np.full(len(al.teacher_targets), b), al.teacher_targets - 1], axis=1))
            exact.append(al.exact)
        self._say_once()
        where = torch.as_tensor(np.concatenate(places), dtype=torch.long, device=device)
        longest = max(1, max(len(w) for w in windows))
        t_ids = torch.full((len(windows), longest), self.pad, dtype=torch.long)
        attn = torch.zeros_like(t_ids)
        for b, w in enumerate(windows):
            t_ids[b, :len(w)] = torch.as_tensor(w)
            attn[b, :len(w)] = 1
        t_ids, attn = t_ids.to(device), attn.to(device)
        with self.autocast():
            if self.head is not None:  # the head on the aligned rows only, never B x T x V
                hidden = forward_hidden(self._model, self._model, t_ids, attn)[where[:, 0], where[:, 1]]
                logits = hidden @ self.head.weight.T
                if self.head.bias is not None:
                    logits = logits + self.head.bias
                if self.head.softcap is not None:
                    logits = self.head.softcap * torch.tanh(logits / self.head.softcap)
            else:
                logits = self._model(input_ids=t_ids, attention_mask=attn).logits[where[:, 0], where[:, 1]]
        ids, logp, rest = topk_rows(logits, k=self.top_k, temperature=self.temperature)
        return TeacherSignal(kind="aligned", aligned=AlignedTargets(
            rows=torch.as_tensor(np.concatenate(rows), dtype=torch.long, device=device), ids=self._translate(ids),
            logp=logp, rest=rest, exact=torch.as_tensor(np.concatenate(exact), device=device)))


class CachedAlignedTeacher(AlignedTeacher):
    """Teacher rows from a cache captured with character offsets (``cache.offsets``): the row of
    each teacher token, keyed by (example, start), looked up for each student target."""

    def __init__(self, reader, *, train_ds, vocab_map: VocabMap, temperature: float, examples: list[int]):
        m = reader.manifest
        super().__init__(train_ds=train_ds, vocab_map=vocab_map, top_k=int(m["k"]), temperature=temperature)
        self.reader = reader
        self.item_of = {int(e): k for k, e in enumerate(examples)}  # example ordinal -> the cache's item

    def _teacher_rows(self, e: int) -> dict[str, np.ndarray]:
        """Every captured row of example ``e``: 'ids' (n, k), 'logp' (n, k), 'rest' (n,), 'spans' (n, 4),
        'token' (n,) the teacher token each row predicts (none when the teacher's tokenization
        dropped the example)."""
        if e not in self.item_of:
            return {"token": np.zeros(0, np.int64)}
        return self.reader.rows(self.item_of[e])

    def signal(self, batch: MicroBatch) -> TeacherSignal:
        device = batch.input_ids.device
        rows, ids, logp, rest, exact = [], [], [], [], []
        for s_ids, spans, targets, base in self._student_rows(batch):
            for e in np.unique(spans[:, SPAN_EXAMPLE]):
                got = self._teacher_rows(int(e))
                if not len(got["token"]):
                    continue
                # A teacher "window" of the whole example: row j predicts the example's token j + 1.
                t_spans = np.concatenate([np.full((1, 4), -1, dtype=np.int64), got["spans"]])
                t_spans[0, SPAN_EXAMPLE] = e
                t_ids = np.concatenate([[-1], got["token"]])
                mine = targets[spans[targets, SPAN_EXAMPLE] == e]
                al = align_targets(s_ids, spans, mine, t_ids, t_spans, self.vocab_map.student_to_teacher)
                self._count(len(mine), al)
                rows.append(base + np.searchsorted(targets, al.student_targets))
                picked = al.teacher_targets - 1
                ids.append(got["ids"][picked])
                logp.append(got["logp"][picked])
                rest.append(got["rest"][picked])
                exact.append(al.exact)
        self._say_once()
        k = self.top_k
        cat = (lambda parts, shape, dtype: torch.as_tensor(np.concatenate(parts) if parts else np.zeros(shape, dtype)))
        t_ids = cat(ids, (0, k), np.int64).long()
        return TeacherSignal(kind="aligned", aligned=AlignedTargets(
            rows=cat(rows, (0,), np.int64).long(), ids=self._translate(t_ids), logp=cat(logp, (0, k), np.float32).float(),
            rest=cat(rest, (0,), np.float32).float(), exact=cat(exact, (0,), bool)).to(device))


__all__ = ["AlignedTeacher", "OnlineAlignedTeacher", "CachedAlignedTeacher"]
