"""Skew KL at alpha=1: the mixture is the target itself, so the loss is exactly 0, yet it trains.

At ``alpha=1`` skew-FKL is KL(p_t || p_t) and skew-RKL is KL(p_s || p_s): both are 0 for
any student. The loss must still be part of the student's graph, so that ``backward``
runs and gives an all-zero gradient (not None, not "does not require grad"), on the plain
path (``logit_divergence``), the fused-logits path (``fused_logit_loss``) and the chunked
path (``chunked_distill_loss``), in float32 and bf16.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import potstill
from potstill.losses import chunked_distill_loss, logit_divergence
from potstill.losses.fused_logits import fused_logit_loss

SKEW = ("skew_fkl", "skew_rkl")
DTYPES = (torch.float32, torch.bfloat16)
N, V, HS, HT = 13, 37, 8, 6


def _targets(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 7]] = -100  # ignored rows
    return targets


def _logits(dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(N, V, generator=g)).to(dtype).requires_grad_()
    t = (3 * torch.randn(N, V, generator=g)).to(dtype)
    return s, t


def _hidden(dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, HS, generator=g).to(dtype).requires_grad_()
    w = torch.randn(V, HS, generator=g).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(V, generator=g)).to(dtype).requires_grad_()
    th = torch.randn(N, HT, generator=g).to(dtype)
    tw = torch.randn(V, HT, generator=g).to(dtype)
    return h, w, b, th, tw


def _assert_zero_grad(x: torch.Tensor) -> None:
    assert x.grad is not None, "backward gave no gradient"
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype
    assert torch.equal(x.grad, torch.zeros_like(x)), x.grad.abs().max()


# -- (a) alpha=1: loss 0, backward works, gradient all zeros ---------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SKEW)
def test_plain_alpha_one_is_zero_and_trains(name, dtype):
    s, t = _logits(dtype)
    mask = _targets() != -100
    with torch.no_grad():  # garbage in an ignored row must not leak in
        s[2] = float("nan")
        t[7] = float("inf")
    loss, n_valid = logit_divergence(name, s, t, mask, alpha=1.0)
    assert loss.requires_grad and loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert n_valid.item() == int(mask.sum()) == N - 2
    (loss / n_valid).backward()
    _assert_zero_grad(s)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", SKEW)
def test_plain_alpha_one_float64_and_temperature(name, temperature):
    s, t = _logits(torch.float64, seed=3)
    mask = torch.ones(N, dtype=torch.bool)
    loss, n_valid = logit_divergence(name, s, t, mask, temperature=temperature, alpha=1.0)
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(0.0, abs=1e-12)
    assert n_valid.item() == N
    loss.backward()
    _assert_zero_grad(s)


@pytest.mark.parametrize("name", SKEW)
def test_plain_alpha_one_with_minus_inf_student_logits(name):
    """Padded vocab slots (-inf logits) neither NaN the value nor the gradient."""
    s, t = _logits(torch.float32, seed=4)
    with torch.no_grad():
        s[:, -3:] = float("-inf")
        t[:, -3:] = float("-inf")
    loss, _ = logit_divergence(name, s, t, torch.ones(N, dtype=torch.bool), alpha=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    _assert_zero_grad(s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SKEW)
def test_fused_alpha_one_is_zero_and_trains(name, dtype):
    s, t = _logits(dtype, seed=1)
    targets = _targets(1)
    out = fused_logit_loss(s, targets, t, divergence=name, alpha=1.0, kd_weight=1.0, ce_weight=0.0, chunk_size=4)
    assert out.weighted_sum.requires_grad
    assert out.weighted_sum.item() == pytest.approx(0.0, abs=1e-6)
    assert out.term_sums["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.n_valid.item() == N - 2
    (out.weighted_sum / out.n_valid).backward()
    _assert_zero_grad(s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SKEW)
def test_chunked_alpha_one_is_zero_and_trains(name, dtype):
    h, w, b, th, tw = _hidden(dtype, seed=2)
    targets = _targets(2)
    out = chunked_distill_loss(h, w, targets, teacher_hidden=th, teacher_head=tw, divergence=name, alpha=1.0,
                               kd_weight=1.0, ce_weight=0.0, student_bias=b, chunk_size=4)
    assert out.weighted_sum.requires_grad
    assert out.weighted_sum.item() == pytest.approx(0.0, abs=1e-6)
    assert out.term_sums["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.n_valid.item() == N - 2
    (out.weighted_sum / out.n_valid).backward()
    for x in (h, w, b):
        _assert_zero_grad(x)


@pytest.mark.parametrize("name", SKEW)
def test_alpha_one_with_ce_is_just_ce(name):
    """With CE on, the KD term adds exactly nothing: loss and gradients equal the CE-only ones."""
    targets = _targets(5)
    s, t = _logits(torch.float32, seed=5)
    out = fused_logit_loss(s, targets, t, divergence=name, alpha=1.0, kd_weight=2.0, ce_weight=1.0)
    out.weighted_sum.backward()
    s_ce = s.detach().clone().requires_grad_()
    ref = fused_logit_loss(s_ce, targets, None, kd_weight=0.0, ce_weight=1.0)
    ref.weighted_sum.backward()
    torch.testing.assert_close(out.weighted_sum, ref.weighted_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.grad, s_ce.grad, rtol=1e-6, atol=1e-7)

    h, w, b, th, tw = _hidden(torch.float32, seed=5)
    out = chunked_distill_loss(h, w, targets, teacher_hidden=th, teacher_head=tw, divergence=name, alpha=1.0,
                               kd_weight=2.0, ce_weight=1.0, student_bias=b)
    out.weighted_sum.backward()
    leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
    ref = chunked_distill_loss(leaves[0], leaves[1], targets, kd_weight=0.0, ce_weight=1.0, student_bias=leaves[2])
    ref.weighted_sum.backward()
    torch.testing.assert_close(out.weighted_sum, ref.weighted_sum, rtol=1e-6, atol=1e-6)
    for x, y in zip((h, w, b), leaves):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)


# -- (b) alpha close to 1: finite, small, and the fused / chunked paths match the plain one ------------

def _skew_reference(name, s, t, alpha):
    """Textbook float64 skew KL summed over rows (no log-space tricks)."""
    ps, pt = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    if name == "skew_fkl":
        p, q = pt, alpha * pt + (1 - alpha) * ps
    else:
        p, q = ps, alpha * ps + (1 - alpha) * pt
    return (p * (p.log() - q.log())).sum()


@pytest.mark.parametrize("alpha", [0.999, 1.0 - 1e-6])
@pytest.mark.parametrize("name", SKEW)
def test_alpha_near_one_is_small_and_paths_agree(name, alpha):
    targets = _targets(6)
    mask = targets != -100
    s, t = _logits(torch.float32, seed=6)
    plain, n_valid = logit_divergence(name, s, t, mask, alpha=alpha)
    plain.backward()
    g_plain = s.grad.clone()
    # KL >= 0; float32 rounding of the log-space mixture leaves about 1e-7 absolute error.
    assert math.isfinite(plain.item()) and -1e-6 <= plain.item() < 1e-2 * n_valid.item()
    assert torch.isfinite(g_plain).all() and g_plain.abs().max() < 1e-2
    assert plain.item() == pytest.approx(_skew_reference(name, s[mask], t[mask], alpha).item(), rel=1e-3, abs=1e-6)

    s.grad = None
    fused = fused_logit_loss(s, targets, t, divergence=name, alpha=alpha, chunk_size=4)
    fused.weighted_sum.backward()
    torch.testing.assert_close(fused.weighted_sum, plain, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(s.grad, g_plain, rtol=1e-5, atol=1e-9)
    assert fused.n_valid.item() == n_valid.item()

    h, w, b, th, tw = _hidden(torch.float32, seed=6)
    chunked = chunked_distill_loss(h, w, targets, teacher_hidden=th, teacher_head=tw, divergence=name,
                                   alpha=alpha, student_bias=b, chunk_size=4)
    chunked.weighted_sum.backward()
    hp, wp, bp = (x.detach().clone().requires_grad_() for x in (h, w, b))
    ref, _ = logit_divergence(name, hp @ wp.T + bp, th @ tw.T, mask, alpha=alpha)
    ref.backward()
    torch.testing.assert_close(chunked.weighted_sum, ref, rtol=1e-5, atol=1e-8)
    for x, y in zip((h, w, b), (hp, wp, bp)):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-9)


# -- (c) end to end: a run with skew_fkl at alpha=1 and CE on keeps training ---------------------------

def _cfg(out, teacher_dir, data, path, ce_weight=1.0):
    return {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 64}},
        "data": {"source": str(data), "max_length": 32, "packing": False, "validation_fraction": 0.1},
        "loss": {"logits": {"divergence": "skew_fkl", "alpha": 1.0},
                 "ce": {"weight": ce_weight}, "path": path, "chunk_size": 7},
        "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 3e-3, "precision": "fp32",
                  "log_every": 1, "checkpoint_every": None},
        "eval": {"max_batches": 1},
        "output": {"dir": str(out), "tensorboard": False, "report": False},
    }


@pytest.mark.parametrize("path", ["chunked", "plain"])
def test_distill_skew_fkl_alpha_one_runs(tmp_path, teacher_dir, text_jsonl, path):
    result = potstill.distill(_cfg(tmp_path / path, teacher_dir, text_jsonl, path), progress=False)
    assert result.steps == 2
    rows = [json.loads(line) for line in result.metrics_path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    steps = [r for r in rows if "loss" in r and "grad_norm" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["loss/kd"] == pytest.approx(0.0, abs=1e-6)
        assert math.isfinite(r["loss/ce"]) and r["loss/ce"] > 0
        assert r["loss"] == pytest.approx(r["loss/ce"], rel=1e-6)  # the KD term adds nothing
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0  # CE still trains the student


@pytest.mark.parametrize("path", ["chunked", "plain"])
def test_distill_skew_fkl_alpha_one_alone_trains_with_zero_gradient(tmp_path, teacher_dir, text_jsonl, path):
    """KD alone at alpha=1 (before the fix: 'element 0 of tensors does not require grad'): the loss is
    identically 0, the run completes, and every step's gradient norm is exactly 0."""
    cfg = _cfg(tmp_path / path, teacher_dir, text_jsonl, path, ce_weight=0.0)
    result = potstill.distill(cfg, progress=False)
    rows = [json.loads(line) for line in result.metrics_path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    steps = [r for r in rows if "loss" in r and "grad_norm" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["loss"] == 0.0 and r["loss/kd"] == 0.0 and r["grad_norm"] == 0.0
