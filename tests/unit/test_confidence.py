"""CAKLD's teacher confidence: the mean probability of the next tokens, from either dense signal."""

from __future__ import annotations

import pytest
import torch

from potstill.errors import ConfigError
from potstill.models.heads import HeadParams
from potstill.teachers.signal import SparseTargets, TeacherSignal
from potstill.training.confidence import ROWS_PER_BLOCK, label_probabilities


def _data(seed=0, rows=3, length=7, hidden=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, length, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g)
    b = torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[0, 3] = -100
    labels[-1, :2] = -100
    return h, w, b, labels


def test_logits_and_hidden_signals_give_the_same_probabilities():
    h, w, b, labels = _data()
    logits = h @ w.T + b
    a = label_probabilities(TeacherSignal(kind="dense", logits=logits), labels)
    c = label_probabilities(TeacherSignal(kind="dense", hidden=h, head=HeadParams(w, b, None)), labels)
    # reference: softmax at the shifted label, at the positions that count
    p = logits.double().softmax(-1)[:, :-1]
    t = labels[:, 1:]
    keep = t != -100
    ref = p[keep].gather(-1, t[keep].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(c, ref, rtol=1e-5, atol=1e-7)
    assert len(a) == int(keep.sum())


def test_hidden_signal_in_blocks_and_softcap():
    h, w, b, labels = _data(seed=1, rows=2, length=ROWS_PER_BLOCK)  # more rows than one block
    cap = 3.0
    logits = cap * torch.tanh((h @ w.T + b) / cap)
    a = label_probabilities(TeacherSignal(kind="dense", logits=logits), labels)
    c = label_probabilities(TeacherSignal(kind="dense", hidden=h, head=HeadParams(w, b, cap)), labels)
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)


def test_a_sparse_teacher_cannot_measure_it():
    _, _, _, labels = _data()
    sparse = TeacherSignal(kind="sparse", sparse=SparseTargets("topk", torch.zeros(1, 2, dtype=torch.long), 11))
    with pytest.raises(ConfigError, match="set loss.logits.cakld_confidence") as err:
        label_probabilities(sparse, labels)
    assert "\n" not in str(err.value)
