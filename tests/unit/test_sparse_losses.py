"""Sparse teacher losses: k = V equals the full loss, the sampled estimator is unbiased,
the chunked hidden-state path equals the plain one."""

from __future__ import annotations

import pytest
import torch

from potstill.losses import cross_entropy, logit_divergence
from potstill.losses.sparse import sampled_forward_kl, topk_divergence
from potstill.losses.sparse_chunked import sparse_chunked_loss


def _logits(n=40, v=29, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale,
            torch.randn(n, v, generator=g, dtype=torch.float64) * scale)


def _topk(teacher, k, temperature=1.0):
    lp = torch.log_softmax(teacher / temperature, -1)
    values, ids = lp.topk(k, -1)
    rest = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, rest


@pytest.mark.parametrize("name,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0),
                                       ("jsd", 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_rest_with_k_equal_v_is_the_full_loss(name, beta, temperature):
    s, t = _logits()
    ids, values, rest = _topk(t, t.shape[-1], temperature)
    mask = torch.ones(s.shape[0], dtype=torch.bool)
    full, n_full = logit_divergence(name, s, t, mask, temperature=temperature, beta=beta)
    s1 = s.clone().requires_grad_(True)
    sparse, n = topk_divergence(name, s1, ids, values, rest, missing_mass="rest", temperature=temperature, beta=beta)
    assert int(n) == int(n_full) == s.shape[0]
    torch.testing.assert_close(sparse, full, rtol=1e-9, atol=1e-9)
    s2 = s.clone().requires_grad_(True)
    logit_divergence(name, s2, t, mask, temperature=temperature, beta=beta)[0].backward()
    sparse.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_renormalize_with_k_equal_v_is_the_full_forward_kl(temperature):
    s, t = _logits(seed=1)
    ids, values, _ = _topk(t, t.shape[-1], temperature)
    mask = torch.ones(s.shape[0], dtype=torch.bool)
    full, _ = logit_divergence("fkl", s, t, mask, temperature=temperature)
    sparse, _ = topk_divergence("fkl", s, ids, values, missing_mass="renormalize", temperature=temperature)
    torch.testing.assert_close(sparse, full, rtol=1e-9, atol=1e-9)


def test_topk_modes_differ_below_v_and_rest_is_a_lower_bound_of_full_kl():
    s, t = _logits(seed=2)
    ids, values, rest = _topk(t, 5)
    mask = torch.ones(s.shape[0], dtype=torch.bool)
    full, _ = logit_divergence("fkl", s, t, mask)
    with_rest, _ = topk_divergence("fkl", s, ids, values, rest, missing_mass="rest")
    renorm, _ = topk_divergence("fkl", s, ids, values, missing_mass="renormalize")
    # Coarse-graining never increases a KL (data processing inequality).
    assert float(with_rest) <= float(full) + 1e-9
    assert abs(float(renorm) - float(with_rest)) > 1e-3


def test_renormalize_rejects_reverse_kl_and_unknown_names():
    s, t = _logits()
    ids, values, rest = _topk(t, 4)
    with pytest.raises(ValueError, match="missing_mass='rest'"):
        topk_divergence("rkl", s, ids, values, missing_mass="renormalize")
    with pytest.raises(ValueError, match="tvd needs the teacher's full distribution.*use fkl, rkl, jsd"):
        topk_divergence("tvd", s, ids, values, rest)


def test_sampled_estimator_is_unbiased():
    """Mean over many independent draws of n = 4 samples -> the full forward KL (value and gradient)."""
    s, t = _logits(n=6, v=13, seed=3, scale=1.5)
    temperature = 1.5
    lp = torch.log_softmax(t / temperature, -1)
    entropy = -(lp.exp() * lp).sum(-1)
    mask = torch.ones(s.shape[0], dtype=torch.bool)
    s_full = s.clone().requires_grad_(True)
    full, _ = logit_divergence("fkl", s_full, t, mask, temperature=temperature)
    full.backward()
    g = torch.Generator().manual_seed(0)
    draws, n = 4000, 4
    values, grads = [], torch.zeros_like(s)
    for _ in range(draws):
        ids = torch.multinomial(lp.exp(), n, replacement=True, generator=g)
        s1 = s.clone().requires_grad_(True)
        est, count = sampled_forward_kl(s1, ids, entropy, temperature=temperature)
        est.backward()
        values.append(float(est.detach()))
        grads += s1.grad
    values = torch.tensor(values, dtype=torch.float64)
    stderr = float(values.std() / draws ** 0.5)
    assert int(count) == s.shape[0]
    full = float(full.detach())
    assert abs(float(values.mean()) - full) < 4 * stderr, (float(values.mean()), full, stderr)
    torch.testing.assert_close(grads / draws, s_full.grad, atol=0.02, rtol=0)
    # A single draw is not the full loss: the test is not trivially true.
    assert float(values.std()) > 0.01


@pytest.mark.parametrize("kind,mode", [("topk", "rest"), ("topk", "renormalize"), ("sampled", "rest")])
@pytest.mark.parametrize("temperature,ce_weight,bias", [(1.0, 0.0, False), (2.0, 0.3, True)])
def test_chunked_path_equals_plain(kind, mode, temperature, ce_weight, bias):
    g = torch.Generator().manual_seed(7)
    n, h, v, k = 700, 12, 37, 6  # more rows than one chunk (512)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    lp = torch.log_softmax(torch.randn(n, v, generator=g) * 2 / temperature, -1)
    if kind == "topk":
        values, ids = lp.topk(k, -1)
        rows = {"ids": ids, "logp": values, "rest": lp.scatter(-1, ids, float("-inf")).logsumexp(-1)}
    else:
        rows = {"ids": torch.multinomial(lp.exp(), k, replacement=True, generator=g),
                "entropy": -(lp.exp() * lp).sum(-1)}
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight) + ((b,) if bias else ())]
    out = sparse_chunked_loss(leaves[0], leaves[1], leaves[2] if bias else None, targets, rows, kind=kind,
                              missing_mass=mode, temperature=temperature, kd_weight=0.7, ce_weight=ce_weight)
    out.weighted_sum.backward()
    ref_leaves = [x.clone().requires_grad_(True) for x in (hidden, weight) + ((b,) if bias else ())]
    z = ref_leaves[0] @ ref_leaves[1].T + (ref_leaves[2] if bias else 0)
    if kind == "topk":
        kd, _ = topk_divergence("fkl", z, rows["ids"], rows["logp"].double(), rows["rest"].double(),
                                missing_mass=mode, temperature=temperature)
    else:
        kd, _ = sampled_forward_kl(z, rows["ids"], rows["entropy"].double(), temperature=temperature)
    total = 0.7 * kd + (ce_weight * cross_entropy(z, targets)[0] if ce_weight else 0)
    total.backward()
    assert int(out.n_valid) == n
    torch.testing.assert_close(out.weighted_sum.double(), total.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.term_sums["kd"].double(), kd.detach(), rtol=1e-5, atol=1e-4)
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)
