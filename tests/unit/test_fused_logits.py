"""The plain path's fused loss on full logits equals the textbook losses: values and gradients."""

import pytest
import torch

import potstill.losses.chunked as chunked_mod
from potstill.losses import cross_entropy, logit_divergence
from potstill.losses.fused_logits import fused_logit_loss

CASES = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 1.0}),
         ("tvd", {}), ("skew_fkl", {"alpha": 0.1}), ("skew_rkl", {"alpha": 0.3}), ("mse", {})]
IDS = [n + "".join(f"-{k}{v}" for k, v in kw.items()) for n, kw in CASES]
N, VS, VT = 37, 109, 101  # odd sizes; the student head has 8 padding rows beyond the shared 101


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(chunked_mod, "BLOCK_ELEMENTS", {"closed_form": 320, "autograd": 320})
    monkeypatch.setattr(chunked_mod, "POOL_MIN_BLOCKS", 1)  # a few blocks already go to the worker pool


def _inputs(dtype=torch.float32, seed=0, masked=0.3):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, VS, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    t = (torch.randn(N, VT, generator=g, dtype=torch.float64) * 2).to(dtype)
    targets = torch.randint(0, VT, (N,), generator=g)
    targets[torch.rand(N, generator=g) < masked] = -100
    return s, t, targets


def _reference(s, t, targets, divergence, kw, temperature, kd_weight, ce_weight):
    mask = targets != -100
    kd, _ = logit_divergence(divergence, s[:, :VT], t, mask, temperature=temperature, **kw)
    total = kd_weight * kd
    if ce_weight:
        ce, _ = cross_entropy(s, targets, ignore_index=-100)
        total = total + ce_weight * ce
    return total


@pytest.mark.parametrize("divergence,kw", CASES, ids=IDS)
@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_equals_the_textbook_loss_fp32(divergence, kw, ce_weight, chunk_size):
    s, t, targets = _inputs()
    ref = _reference(s, t, targets, divergence, kw, 1.7, 0.9, ce_weight)
    (g_ref,) = torch.autograd.grad(ref, s)
    out = fused_logit_loss(s, targets, t, divergence=divergence, temperature=1.7, kd_weight=0.9,
                           ce_weight=ce_weight, chunk_size=chunk_size, **kw)
    (g,) = torch.autograd.grad(out.weighted_sum * 3.0, s)
    torch.testing.assert_close(out.weighted_sum, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, 3.0 * g_ref, rtol=1e-4, atol=1e-6)
    assert out.n_valid == (targets != -100).sum()
    assert set(out.term_sums) == ({"kd", "ce"} if ce_weight else {"kd"})
    if not ce_weight:  # padding columns beyond the shared vocab get exactly zero gradient
        assert torch.count_nonzero(g[:, VT:]) == 0
    assert torch.count_nonzero(g[targets == -100]) == 0


@pytest.mark.parametrize("divergence,kw", [("fkl", {}), ("jsd", {"beta": 0.3})], ids=["fkl", "jsd"])
def test_bf16_logits_close_to_the_float32_reference(divergence, kw):
    s, t, targets = _inputs(torch.bfloat16, seed=1)
    ref = _reference(s.float(), t.float(), targets, divergence, kw, 1.0, 1.0, 0.5)
    out = fused_logit_loss(s, targets, t, divergence=divergence, ce_weight=0.5, **kw)
    (g,) = torch.autograd.grad(out.weighted_sum, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(out.weighted_sum, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=2e-2, atol=2e-3)


def test_everything_masked_gives_zero_loss_and_gradient():
    s, t, targets = _inputs()
    targets[:] = -100
    out = fused_logit_loss(s, targets, t, ce_weight=1.0)
    (g,) = torch.autograd.grad(out.weighted_sum, s)
    assert float(out.weighted_sum.detach()) == 0.0 and int(out.n_valid) == 0
    assert torch.count_nonzero(g) == 0


def test_bad_inputs_are_refused():
    s, t, targets = _inputs()
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_logit_loss(s, targets, None)
    with pytest.raises(ValueError, match="shared_vocab"):
        fused_logit_loss(s, targets, t, shared_vocab=VT + 1)
    with pytest.raises(ValueError, match="targets"):
        fused_logit_loss(s, targets[:-1], t)
