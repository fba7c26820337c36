"""Objective: one shift, one mask, one normalization; accumulation == one big batch."""

from __future__ import annotations

import pytest
import torch

import tiny
from potstill.config import LossConfig
from potstill.losses import forward_kl
from potstill.training.objective import Objective, count_valid, step_loss


@pytest.fixture(scope="module")
def models():
    teacher = tiny.build_llama(None, 64, hidden_size=32, layers=2, seed=1).eval()
    student = tiny.build_llama(None, 64, hidden_size=16, layers=1, heads=2, intermediate=32, seed=2)
    return teacher, student


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (4, 12), generator=g)
    labels = x.clone()
    # Very uneven valid-token counts per sequence, so naive per-micro-batch means are wrong.
    labels[0, :10] = -100
    labels[1, :2] = -100
    labels[2, 5:] = -100
    return x, labels


def _grads(student):
    return torch.cat([p.grad.flatten() for p in student.parameters()])


def _run(student, teacher, objective, chunks, n_valid_step, world=1):
    student.zero_grad()
    for x, y in chunks:
        with torch.no_grad():
            t = teacher(input_ids=x).logits
        out = objective(student(input_ids=x).logits, y, t)
        step_loss(out.weighted_sum, n_valid_step, world).backward()
    return _grads(student).clone()


@pytest.mark.parametrize("loss", [{"logits": {"weight": 1.0}}, {"logits": {"weight": 0.5, "divergence": "jsd"},
                                                                  "ce": {"weight": 0.5}}])
def test_accumulation_equals_one_big_batch(models, loss):
    teacher, student = models
    objective = Objective(LossConfig.model_validate(loss))
    x, y = _batch()
    n = count_valid(y)
    full = _run(student, teacher, objective, [(x, y)], n)
    accumulated = _run(student, teacher, objective, [(x[:2], y[:2]), (x[2:], y[2:])], n)
    torch.testing.assert_close(accumulated, full, rtol=1e-5, atol=1e-7)
    # Averaging each micro-batch's own mean (the old bug) gives a different gradient.
    student.zero_grad()
    for xs, ys in [(x[:2], y[:2]), (x[2:], y[2:])]:
        out = objective(student(input_ids=xs).logits, ys, teacher(input_ids=xs).logits.detach())
        (out.weighted_sum / count_valid(ys) / 2).backward()
    assert not torch.allclose(_grads(student), full, rtol=1e-3)


def test_processes_averaged_equal_one_big_batch(models):
    """Two processes, each normalizing by the global count times world size, then DDP's mean."""
    teacher, student = models
    objective = Objective(LossConfig())
    x, y = _batch(1)
    n = count_valid(y)
    full = _run(student, teacher, objective, [(x, y)], n)
    rank0 = _run(student, teacher, objective, [(x[:1], y[:1]), (x[1:2], y[1:2])], n, world=2)
    rank1 = _run(student, teacher, objective, [(x[2:3], y[2:3]), (x[3:], y[3:])], n, world=2)
    torch.testing.assert_close((rank0 + rank1) / 2, full, rtol=1e-5, atol=1e-7)


def test_shift_and_mask():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 3, 4], [-100, -100, -100, -100, 5]])
    out = Objective(LossConfig())(s, labels, t)
    mask = labels[:, 1:] != -100
    expected, n = forward_kl(s[:, :-1], t[:, :-1], mask)
    assert int(out.n_valid) == int(n) == 4
    torch.testing.assert_close(out.weighted_sum, expected)


def test_temperature_squared_scaling_and_weights():
    torch.manual_seed(0)
    s, t = torch.randn(1, 6, 9), torch.randn(1, 6, 9)
    y = torch.randint(0, 9, (1, 6))
    base = Objective(LossConfig.model_validate({"logits": {"temperature": 2.0}}))(s, y, t)
    scaled = Objective(LossConfig.model_validate({"logits": {"temperature": 2.0, "t2_scaling": True}}))(s, y, t)
    torch.testing.assert_close(scaled.weighted_sum, 4 * base.weighted_sum)
    mixed = Objective(LossConfig.model_validate({"logits": {"weight": 0.3}, "ce": {"weight": 0.7}}))(s, y, t)
    torch.testing.assert_close(mixed.weighted_sum, 0.3 * mixed.term_sums["kd"] + 0.7 * mixed.term_sums["ce"])
    assert set(base.term_sums) == {"kd"}


def test_shared_vocab_ignores_padding_rows():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 10), torch.randn(1, 4, 12)
    y = torch.randint(0, 8, (1, 4))
    sliced = Objective(LossConfig(), shared_vocab=8)(s, y, t)
    expected, _ = forward_kl(s[:, :-1, :8], t[:, :-1, :8], torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(sliced.weighted_sum, expected)


def test_missing_teacher_logits_is_an_error():
    with pytest.raises(ValueError, match="no teacher logits"):
        Objective(LossConfig())(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))
