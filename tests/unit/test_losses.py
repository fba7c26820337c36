"""Tests for potstill.losses.logits.

References are written from the formulas in plain-Python float64 (math module,
explicit per-row loops), independent of the module's helpers.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from potstill.losses import (
    DIVERGENCES,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    logit_divergence,
    logit_mse,
    per_token_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

NAMES = ["fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "mse", "soft_ce", "soft_mse", "cos", "logsum", "cakld",
         "akl", "hinge", "logistic_ranking", "sinkhorn"]  # the last nine: tests/unit/test_divergences_more.py
# (name, specific kwargs) pairs covering endpoints and interior of beta/alpha.
CASES = [
    ("fkl", {}), ("rkl", {}), ("tvd", {}), ("mse", {}),
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}), ("jsd", {"beta": 1.0}),
    ("skew_fkl", {"alpha": 0.0}), ("skew_fkl", {"alpha": 0.1}), ("skew_fkl", {"alpha": 0.6}),
    ("skew_rkl", {"alpha": 0.1}), ("skew_rkl", {"alpha": 0.6}), ("skew_rkl", {"alpha": 1.0}),
]
CASE_IDS = [n + "".join(f"-{k}{v}" for k, v in kw.items()) for n, kw in CASES]
# One representative per divergence for the more expensive tests.
REPR = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}),
        ("skew_fkl", {"alpha": 0.1}), ("skew_rkl", {"alpha": 0.1}), ("mse", {})]
REPR_IDS = [n for n, _ in REPR]


def _data(shape=(2, 4, 7), scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    mask = torch.rand(*shape[:-1], generator=g) < 0.6
    mask.view(-1)[0] = True  # at least one valid and one masked position
    mask.view(-1)[-1] = False
    return s, t, mask


# ---------------------------------------------------------------- references
def _softmax(z):
    m = max(z)
    e = [math.exp(x - m) for x in z]
    tot = sum(e)
    return [x / tot for x in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _ref_token(name, zs, zt, T, beta=0.5, alpha=0.1):
    zs = [x / T for x in zs]
    zt = [x / T for x in zt]
    if name == "mse":
        return sum((a - b) ** 2 for a, b in zip(zs, zt)) / len(zs)
    ps, pt = _softmax(zs), _softmax(zt)
    if name == "fkl":
        return _kl(pt, ps)
    if name == "rkl":
        return _kl(ps, pt)
    if name == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))
    if name == "skew_fkl":
        return _kl(pt, [alpha * a + (1 - alpha) * b for a, b in zip(pt, ps)])
    if name == "skew_rkl":
        return _kl(ps, [alpha * b + (1 - alpha) * a for a, b in zip(pt, ps)])
    assert name == "jsd"
    if beta == 0:
        return _kl(pt, ps)
    if beta == 1:
        return _kl(ps, pt)
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    return beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)


def _ref_sum(name, s, t, mask, T, **kw):
    V = s.shape[-1]
    rows_s = s.double().reshape(-1, V).tolist()
    rows_t = t.double().reshape(-1, V).tolist()
    return sum(_ref_token(name, a, b, T, **kw)
               for a, b, m in zip(rows_s, rows_t, mask.reshape(-1).tolist()) if m)


# ------------------------------------------------------------ correctness
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_matches_float64_reference(name, kw, T):
    s, t, mask = _data(seed=sum(map(ord, name)) + int(T * 10))
    loss, n = DIVERGENCES[name](s, t, mask, temperature=T, **kw)
    ref = _ref_sum(name, s, t, mask, T, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert n.dtype == torch.int64 and n.dim() == 0 and n.item() == int(mask.sum())


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_entry_point_and_per_token_agree_with_named_functions(name, kw):
    s, t, mask = _data(seed=3)
    full = {"beta": 0.5, "alpha": 0.1, **kw}
    direct = DIVERGENCES[name](s, t, mask, temperature=1.5, **kw)
    via = logit_divergence(name, s, t, mask, temperature=1.5, **full)
    assert torch.equal(direct[0], via[0]) and torch.equal(direct[1], via[1])
    per_tok = per_token_divergence(name, s[mask], t[mask], temperature=1.5, **full)
    assert per_tok.shape == (int(mask.sum()),)
    torch.testing.assert_close(per_tok.sum(), direct[0])


def test_registry_names():
    assert set(DIVERGENCES) == set(NAMES)
    assert DIVERGENCES["fkl"] is forward_kl and DIVERGENCES["mse"] is logit_mse


@pytest.mark.parametrize("name,kw", REPR, ids=REPR_IDS)
def test_leading_shape_is_irrelevant(name, kw):
    s, t, mask = _data(shape=(3, 5, 6), seed=4)
    a = DIVERGENCES[name](s, t, mask, **kw)
    b = DIVERGENCES[name](s.reshape(15, 6), t.reshape(15, 6), mask.reshape(15), **kw)
    torch.testing.assert_close(a[0], b[0])
    assert a[1].item() == b[1].item() == int(mask.sum())


def test_cross_entropy_matches_reference_and_torch():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 5, 9, generator=g) * 2
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[0, :2] = -100
    labels[1, 4] = 7
    loss, n = cross_entropy(s, labels)
    ref = sum(-math.log(_softmax(row)[lab])
              for row, lab in zip(s.double().reshape(-1, 9).tolist(), labels.reshape(-1).tolist())
              if lab != -100)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(s.reshape(-1, 9), labels.reshape(-1), reduction="sum"))
    assert n.dtype == torch.int64 and n.item() == 8
    # custom ignore_index
    loss2, n2 = cross_entropy(s, labels.clamp_min(0), ignore_index=7)
    assert n2.item() == int((labels.clamp_min(0) != 7).sum())
    assert torch.isfinite(loss2)


# ---------------------------------------------------------------- identities
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_zero_at_equality_and_nonnegative(name, kw):
    s, t, mask = _data(seed=6)
    loss, _ = DIVERGENCES[name](s, s.clone(), mask, **kw)
    assert abs(loss.item()) < 1e-5
    full = {"beta": 0.5, "alpha": 0.1, **kw}
    per_tok = per_token_divergence(name, s.reshape(-1, 7), t.reshape(-1, 7), **full)
    assert (per_tok >= -1e-6).all()
    if not (name == "skew_rkl" and kw["alpha"] == 1.0):  # KL(p_s||p_s) == 0 by design
        assert (per_tok > 1e-4).all()


def test_jsd_endpoints_are_exactly_the_kls():
    s, t, mask = _data(seed=7)
    assert torch.equal(generalized_jsd(s, t, mask, beta=0.0)[0], forward_kl(s, t, mask)[0])
    assert torch.equal(generalized_jsd(s, t, mask, beta=1.0)[0], reverse_kl(s, t, mask)[0])


def test_jsd_trl_scaling_near_endpoints():
    # TRL convention: interior JSD ~ beta * KL(p_t||p_s) as beta -> 0 and
    # ~ (1-beta) * KL(p_s||p_t) as beta -> 1; continuous with the endpoints after
    # that rescaling (float64 so the tiny values are accurate).
    # The O(beta) correction grows with the max p_t/p_s ratio, so use moderate logits.
    s, t, mask = _data(seed=8, scale=1.0, dtype=torch.float64)
    fkl, rkl = forward_kl(s, t, mask)[0], reverse_kl(s, t, mask)[0]
    for eps in (1e-4, 1e-6):
        lo = generalized_jsd(s, t, mask, beta=eps)[0]
        hi = generalized_jsd(s, t, mask, beta=1 - eps)[0]
        torch.testing.assert_close(lo / eps, fkl, rtol=10 * eps, atol=0)
        torch.testing.assert_close(hi / eps, rkl, rtol=10 * eps, atol=0)
        # ...which means the raw interior value is NOT close to the endpoint value
        assert lo < 10 * eps * fkl and hi < 10 * eps * rkl
    # and the interior is continuous in beta
    a = generalized_jsd(s, t, mask, beta=0.5)[0]
    b = generalized_jsd(s, t, mask, beta=0.5 + 1e-7)[0]
    assert abs((a - b).item()) < 1e-5 * a.item()


def test_jsd_swap_symmetry_and_bound():
    s, t, mask = _data(seed=9)
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=0.5)[0], generalized_jsd(t, s, mask, beta=0.5)[0])
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=0.2)[0], generalized_jsd(t, s, mask, beta=0.8)[0])
    per_tok = per_token_divergence("jsd", s.reshape(-1, 7), t.reshape(-1, 7), beta=0.5)
    assert (per_tok <= math.log(2) + 1e-6).all()


def test_skew_limits_and_convexity_bound():
    s, t, mask = _data(seed=10)
    fkl, rkl = forward_kl(s, t, mask)[0], reverse_kl(s, t, mask)[0]
    assert torch.equal(skew_forward_kl(s, t, mask, alpha=0.0)[0], fkl)
    assert torch.equal(skew_reverse_kl(s, t, mask, alpha=0.0)[0], rkl)
    assert skew_forward_kl(s, t, mask, alpha=1.0)[0].item() == 0.0
    assert skew_reverse_kl(s, t, mask, alpha=1.0)[0].item() == 0.0
    for a in (0.1, 0.5, 0.9):  # KL is convex in its 2nd argument: skew <= (1-a) * KL
        assert skew_forward_kl(s, t, mask, alpha=a)[0] <= (1 - a) * fkl + 1e-6
        assert skew_reverse_kl(s, t, mask, alpha=a)[0] <= (1 - a) * rkl + 1e-6


def test_tvd_range():
    s, t, _ = _data(seed=11)
    per_tok = per_token_divergence("tvd", s, t)
    assert ((per_tok >= 0) & (per_tok <= 1)).all()
    # near-disjoint distributions -> TVD close to 1
    s2 = torch.full((3, 5), -30.0)
    t2 = torch.full((3, 5), -30.0)
    s2[:, 0] = 30.0
    t2[:, 1] = 30.0
    loss, n = total_variation(s2, t2, torch.ones(3, dtype=torch.bool))
    assert loss.item() == pytest.approx(3.0, abs=1e-5) and n.item() == 3


@pytest.mark.parametrize("name,kw", REPR, ids=REPR_IDS)
def test_large_temperature_shrinks_divergence(name, kw):
    # float64 so the tiny large-T values are not rounding noise. Divergences
    # between the tempered distributions decay like 1/T^2 (TVD like 1/T).
    s, t, mask = _data(seed=12, dtype=torch.float64)
    vals = [DIVERGENCES[name](s, t, mask, temperature=T, **kw)[0].item() for T in (1.0, 10.0, 1e4)]
    assert vals[0] > vals[1] > vals[2] >= 0
    assert vals[2] < 1e-3 * vals[0]


def test_mse_scales_as_inverse_temperature_squared():
    s, t, mask = _data(seed=13)
    base = logit_mse(s, t, mask)[0]
    torch.testing.assert_close(logit_mse(s, t, mask, temperature=4.0)[0] * 16.0, base)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name,kw", REPR + [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})],
                         ids=REPR_IDS + ["jsd-b0", "jsd-b1"])
def test_gradcheck_float64(name, kw):
    s, t, mask = _data(shape=(2, 3, 5), seed=14, dtype=torch.float64)
    s.requires_grad_(True)
    fn = DIVERGENCES[name]
    assert torch.autograd.gradcheck(lambda x: fn(x, t, mask, temperature=1.3, **kw)[0], (s,))


def test_gradcheck_cross_entropy():
    g = torch.Generator().manual_seed(15)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 4], [0, 2, -100]])
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, labels)[0], (s,))


@pytest.mark.parametrize("name,kw", REPR, ids=REPR_IDS)
def test_masked_garbage_gives_zero_grad_and_finite_loss(name, kw):
    s, t, mask = _data(seed=16)
    clean = s.clone().requires_grad_(True)
    ref_loss, _ = DIVERGENCES[name](clean, t, mask, **kw)
    ref_loss.backward()
    garbage = [float("nan"), float("inf"), -float("inf")]
    s_bad, t_bad = s.clone(), t.clone()
    for i, idx in enumerate((~mask).nonzero()):
        s_bad[tuple(idx)] = garbage[i % 3]
        t_bad[tuple(idx)] = garbage[(i + 1) % 3]
    s_bad.requires_grad_(True)
    loss, n = DIVERGENCES[name](s_bad, t_bad, mask, **kw)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss.detach())
    loss.backward()
    assert torch.equal(s_bad.grad[~mask], torch.zeros_like(s_bad.grad[~mask]))
    assert torch.isfinite(s_bad.grad).all()
    torch.testing.assert_close(s_bad.grad, clean.grad)


def test_cross_entropy_ignored_garbage_gets_zero_grad():
    s = torch.randn(2, 3, 6)
    labels = torch.tensor([[1, -100, 4], [-100, 2, 5]])
    s[0, 1] = float("nan")
    s[1, 0, 2] = float("inf")
    s.requires_grad_(True)
    loss, n = cross_entropy(s, labels)
    loss.backward()
    assert torch.isfinite(loss) and n.item() == 4
    assert torch.equal(s.grad[labels == -100], torch.zeros(2, 6))


@pytest.mark.parametrize("name,kw", [c for c in REPR if c[0] != "mse"], ids=[i for i in REPR_IDS if i != "mse"])
def test_padded_vocab_neg_inf_in_valid_rows(name, kw):
    # Padded vocab slots at -inf in both models must act as if absent: finite
    # loss equal to the truncated vocab, finite grads, zero grad on those slots.
    s, t, mask = _data(shape=(2, 3, 8), seed=17)
    s_pad, t_pad = s.clone(), t.clone()
    s_pad[..., 6:] = -float("inf")
    t_pad[..., 6:] = -float("inf")
    s_pad.requires_grad_(True)
    loss, _ = DIVERGENCES[name](s_pad, t_pad, mask, **kw)
    torch.testing.assert_close(loss, DIVERGENCES[name](s[..., :6], t[..., :6], mask, **kw)[0])
    loss.backward()
    assert torch.isfinite(s_pad.grad).all()
    assert torch.equal(s_pad.grad[..., 6:], torch.zeros_like(s_pad.grad[..., 6:]))


def test_teacher_receives_no_gradient():
    s, t, mask = _data(seed=18)
    s.requires_grad_(True)
    t.requires_grad_(True)
    generalized_jsd(s, t, mask)[0].backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("name,kw", REPR, ids=REPR_IDS)
def test_all_masked(name, kw):
    s, t, _ = _data(seed=19)
    s.requires_grad_(True)
    loss, n = DIVERGENCES[name](s, t, torch.zeros(2, 4, dtype=torch.bool), **kw)
    assert loss.dtype == torch.float32 and loss.item() == 0.0 and n.item() == 0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("name,kw", REPR, ids=REPR_IDS)
def test_bf16_inputs_give_float32_close_to_float32(name, kw):
    s, t, mask = _data(seed=20)
    s16, t16 = s.bfloat16().requires_grad_(True), t.bfloat16()
    loss, _ = DIVERGENCES[name](s16, t16, mask, temperature=2.0, **kw)
    assert loss.dtype == torch.float32
    # identical to the float32 computation on the bf16-rounded values ...
    torch.testing.assert_close(loss, DIVERGENCES[name](s16.detach().float(), t16.float(), mask, temperature=2.0, **kw)[0])
    # ... and close to the full-precision inputs (bf16 input rounding only)
    torch.testing.assert_close(loss, DIVERGENCES[name](s, t, mask, temperature=2.0, **kw)[0], rtol=3e-2, atol=1e-3)
    loss.backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()


# ---------------------------------------------------------------- bad args
def test_bad_temperature():
    s, t, mask = _data()
    for T in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            forward_kl(s, t, mask, temperature=T)
        with pytest.raises(ValueError, match="temperature"):
            per_token_divergence("mse", s, t, temperature=T)


def test_bad_beta_and_alpha():
    s, t, mask = _data()
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(s, t, mask, beta=bad)
        with pytest.raises(ValueError, match="alpha"):
            skew_forward_kl(s, t, mask, alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            logit_divergence("skew_rkl", s, t, mask, alpha=bad)


def test_unknown_name_lists_valid_names():
    s, t, mask = _data()
    with pytest.raises(ValueError, match="unknown divergence 'kl'.*fkl.*skew_rkl"):
        logit_divergence("kl", s, t, mask)
    with pytest.raises(ValueError, match="valid names"):
        per_token_divergence("nope", s, t)


def test_shape_mismatches():
    s, t, mask = _data()
    with pytest.raises(ValueError, match=r"\(2, 4, 7\).*\(2, 4, 6\)"):
        forward_kl(s, t[..., :6], mask)
    with pytest.raises(ValueError, match=r"mask shape \(2, 3\)"):
        forward_kl(s, t, mask[:, :3])
    with pytest.raises(TypeError, match="bool"):
        forward_kl(s, t, mask.long())
    with pytest.raises(ValueError, match="labels shape"):
        cross_entropy(s, torch.zeros(2, 3, dtype=torch.long))
