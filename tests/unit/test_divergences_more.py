"""The nine added divergences (soft_ce, soft_mse, cos, logsum, cakld, akl, hinge, logistic_ranking,
sinkhorn): float64 references written from the papers' definitions (loops, no module helpers),
identities, chunked == plain, the sparse forms, bad parameters, and sinkhorn's memory."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import potstill.losses.chunked as chunked_mod
from potstill.losses.chunked import chunked_distill_loss
from potstill.losses.fused_logits import fused_logit_loss
from potstill.losses.logits import DIVERGENCES, _NAMES, logit_divergence, per_token_divergence
from potstill.losses.sinkhorn import COST_BLOCK_ELEMENTS, l1_cost, sinkhorn_plan
from potstill.losses.sparse import (
    SPARSE_DIVERGENCES,
    sampled_divergence,
    topk_divergence,
)
from potstill.losses.sparse_chunked import sparse_chunked_loss

NEW = ("soft_ce", "soft_mse", "cos", "logsum", "cakld", "akl", "hinge", "logistic_ranking", "sinkhorn")
PARAMS = {
    "soft_ce": {}, "soft_mse": {}, "cos": {}, "logsum": {"logsum_power": 4.0},
    "cakld": {"cakld_confidence": 0.3}, "akl": {"akl_head_mass": 0.5},
    "hinge": {"rank_k": 5, "hinge_margin": None}, "logistic_ranking": {"rank_k": 5},
    "sinkhorn": {"sinkhorn_epsilon": 0.1, "sinkhorn_iterations": 20, "sinkhorn_rows": 3},
}
T = 2.0


# --- float64 references, one row at a time, from the definitions --------------------------------
def _p(z):
    e = torch.exp(z - z.max())
    return e / e.sum()


def _kl(p, q):
    return sum(p[v] * (torch.log(p[v]) - torch.log(q[v])) if p[v] > 0 else 0.0 for v in range(len(p)))


def ref_row(name, zs, zt, prm):
    """One row: tempered logits zs (V,) (grad), zt (V,) -> scalar."""
    ps, pt = _p(zs), _p(zt.detach())
    V = zs.shape[0]
    if name == "soft_ce":
        return -sum(pt[v] * torch.log(ps[v]) for v in range(V))
    if name == "soft_mse":
        return sum((ps[v] - pt[v]) ** 2 for v in range(V))
    if name == "cos":
        return 1 - (zs @ zt) / (torch.sqrt(zs @ zs) * torch.sqrt(zt @ zt))
    if name == "logsum":
        a = prm["logsum_power"]
        return torch.log(1e-6 + sum((zs[v] - zt[v]).abs() ** a for v in range(V))) - math.log(1e-6)
    if name == "cakld":
        g = prm["cakld_confidence"]
        return g * _kl(ps, pt) + (1 - g) * _kl(pt, ps)
    if name == "akl":
        order = sorted(range(V), key=lambda v: -float(pt[v]))
        head, mass = [], 0.0
        for v in order:
            if mass >= prm["akl_head_mass"]:
                break
            head.append(v)
            mass += float(pt[v])
        psd = ps.detach()
        gh = sum(abs(float(pt[v] - psd[v])) for v in head)
        gt = sum(abs(float(pt[v] - psd[v])) for v in range(V) if v not in head)
        wh, wt = (gh / (gh + gt), gt / (gh + gt)) if gh + gt > 0 else (0.5, 0.5)
        return wh * _kl(pt, ps) + wt * _kl(ps, pt)
    if name in ("hinge", "logistic_ranking"):
        k = min(prm["rank_k"], V)
        top = sorted(range(V), key=lambda v: -float(zt[v]))[:k]
        terms = []
        for i in top:
            for j in top:
                if pt[i] > pt[j]:
                    if name == "hinge":
                        m = prm.get("hinge_margin")
                        m = pt[i] - pt[j] if m is None else m
                        terms.append(torch.relu(m - (ps[i] - ps[j])))
                    else:
                        terms.append(torch.log1p(torch.exp(-(zs[i] - zs[j]))))
        return sum(terms) / len(terms) if terms else zs.sum() * 0
    raise AssertionError(name)


def ref_sinkhorn(zs, zt, prm):
    """Rows (N, V) tempered -> (N,): groups, L1 cost by loops, plain-division Sinkhorn."""
    g = prm["sinkhorn_rows"]
    out = []
    for r0 in range(0, zs.shape[0], g):
        rows = range(r0, min(r0 + g, zs.shape[0]))
        if len(rows) < 2:
            out.append(zs[r0].sum() * 0)
            continue
        ps = [_p(zs[i]) for i in rows]
        pt = [_p(zt[j].detach()) for j in rows]
        C = torch.stack([torch.stack([(ps[i] - pt[j]).abs().sum() for j in range(len(rows))])
                         for i in range(len(rows))])
        P = torch.exp(-C / prm["sinkhorn_epsilon"])
        for _ in range(prm["sinkhorn_iterations"]):
            P = P / P.sum(1, keepdim=True)
            P = P / P.sum(0, keepdim=True)
        out.extend((P * C).sum(1))
    return torch.stack(out)


def ref_sum(name, s_valid, t_valid, prm, temperature=T):
    zs, zt = s_valid / temperature, t_valid / temperature
    if name == "sinkhorn":
        return ref_sinkhorn(zs, zt, prm).sum()
    return sum(ref_row(name, zs[i], zt[i], prm) for i in range(zs.shape[0]))


def _batch(seed=0, B=2, L=6, V=9, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, L, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(B, L, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[0, 0] = True
    mask[1, -1] = False
    s[~mask] = float("nan")        # garbage in masked rows
    t[~mask] = float("inf")
    s[1, -1, 0] = float("inf")
    return s.requires_grad_(), t, mask


@pytest.mark.parametrize("name", NEW)
def test_value_and_gradient_match_reference(name):
    s, t, mask = _batch(seed=NEW.index(name))
    prm = PARAMS[name]
    loss, n = logit_divergence(name, s, t, mask, temperature=T, params=prm)
    (grad,) = torch.autograd.grad(loss, s)
    s_ref = s.detach()[mask].clone().requires_grad_()
    ref = ref_sum(name, s_ref, t[mask], {**{"hinge_margin": None}, **prm})
    (grad_ref,) = torch.autograd.grad(ref, s_ref)
    assert loss.dtype == torch.float64 and int(n) == int(mask.sum())
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad[mask], grad_ref, rtol=1e-7, atol=1e-10)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))  # garbage rows: exact zeros


def test_float32_inputs_give_float32():
    s, t, mask = _batch(dtype=torch.float32)
    for name in NEW:
        loss, _ = logit_divergence(name, s, t, mask, temperature=T, params=PARAMS[name])
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(torch.autograd.grad(loss, s)[0]).all()


def test_hinge_with_fixed_margin_matches_reference():
    s, t, mask = _batch(seed=11)
    prm = {"rank_k": 4, "hinge_margin": 0.05}
    loss, _ = logit_divergence("hinge", s, t, mask, temperature=T, params=prm)
    ref = ref_sum("hinge", s.detach()[mask], t[mask], prm)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["soft_mse", "cos", "logsum", "cakld", "hinge", "logistic_ranking", "sinkhorn"])
def test_gradcheck(name):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    prm = {**PARAMS[name], "rank_k": 4} if name in ("hinge", "logistic_ranking") else PARAMS[name]
    assert torch.autograd.gradcheck(
        lambda x: per_token_divergence(name, x, t, temperature=T, params=prm), (s,))


def test_logsum_gradient_finite_at_equal_inputs_for_small_powers():
    z = torch.randn(3, 7, dtype=torch.float64)
    for a in (0.5, 1.0, 2.0, 4.0):
        s = z.clone().requires_grad_()
        s_half = torch.cat([z[:, :3], z[:, 3:] + 1.0], 1).requires_grad_()  # some d == 0, some not
        for x in (s, s_half):
            v = per_token_divergence("logsum", x, z, params={"logsum_power": a}).sum()
            (g,) = torch.autograd.grad(v, x)
            assert torch.isfinite(v) and torch.isfinite(g).all()
        assert float(per_token_divergence("logsum", z, z, params={"logsum_power": a}).abs().max()) == 0.0


# --- identities -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["soft_mse", "cos", "logsum", "cakld", "akl", "hinge"])
def test_zero_at_equal_inputs(name):
    z = torch.randn(5, 11, dtype=torch.float64) * 2
    v = per_token_divergence(name, z, z, temperature=T, params=PARAMS[name])
    assert float(v.abs().max()) < 1e-12


def test_soft_ce_is_fkl_plus_teacher_entropy():
    s, t, mask = _batch(seed=3)
    s, t = s.detach()[mask], t[mask]
    diff = per_token_divergence("soft_ce", s, t, temperature=T) - per_token_divergence("fkl", s, t, temperature=T)
    lp = torch.log_softmax(t / T, -1)
    torch.testing.assert_close(diff, -(lp.exp() * lp).sum(-1))


def test_cos_ignores_temperature():
    s, t, mask = _batch(seed=4)
    s, t = s.detach()[mask], t[mask]
    torch.testing.assert_close(per_token_divergence("cos", s, t, temperature=0.3),
                               per_token_divergence("cos", s, t, temperature=7.0))


def test_cakld_endpoints_are_fkl_and_rkl_exactly():
    s, t, mask = _batch(seed=6, dtype=torch.float32)
    fkl, _ = logit_divergence("fkl", s, t, mask, temperature=T)
    rkl, _ = logit_divergence("rkl", s, t, mask, temperature=T)
    c0, _ = logit_divergence("cakld", s, t, mask, temperature=T, params={"cakld_confidence": 0.0})
    c1, _ = logit_divergence("cakld", s, t, mask, temperature=T, params={"cakld_confidence": 1})
    assert torch.equal(c0, fkl) and torch.equal(c1, rkl)


def test_akl_at_full_head_mass_is_fkl():
    """head_mass = 1: every token with teacher mass is in the head, g_tail = 0, weights (1, 0)."""
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    akl = per_token_divergence("akl", s, t, temperature=T, params={"akl_head_mass": 1.0})
    torch.testing.assert_close(akl, per_token_divergence("fkl", s, t, temperature=T), rtol=1e-12, atol=1e-14)
    # a tiny head mass: the head is the top token alone, and the weights differ from (1, 0)
    small = per_token_divergence("akl", s, t, temperature=T, params={"akl_head_mass": 1e-9})
    assert not torch.allclose(small, akl)


def test_akl_head_mass_changes_the_value():
    s, t, mask = _batch(seed=9)
    a, _ = logit_divergence("akl", s, t, mask, params={"akl_head_mass": 0.2})
    b, _ = logit_divergence("akl", s, t, mask, params={"akl_head_mass": 0.9})
    assert abs(float(a.detach()) - float(b.detach())) > 1e-6


def test_hinge_zero_when_student_gaps_exceed_margin():
    t = torch.log(torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64))
    s = torch.log(torch.tensor([[0.7, 0.25, 0.05]], dtype=torch.float64))  # gaps 0.45, 0.65, 0.2
    prm = {"rank_k": 3, "hinge_margin": 0.1}
    assert float(per_token_divergence("hinge", s, t, params=prm)) == 0.0
    worse = torch.log(torch.tensor([[0.4, 0.35, 0.25]], dtype=torch.float64))  # gap 0.05 < 0.1
    assert float(per_token_divergence("hinge", worse, t, params=prm)) > 0.0
    assert float(per_token_divergence("hinge", s, t, params={"rank_k": 3, "hinge_margin": 0.5})) > 0.0


def test_logistic_ranking_decreases_with_agreement_and_is_nonnegative():
    t = torch.randn(4, 12, dtype=torch.float64)
    values = [float(per_token_divergence("logistic_ranking", a * t, t, temperature=T, params={"rank_k": 6}).sum())
              for a in (-2.0, 0.0, 1.0, 4.0, 16.0)]
    assert all(v >= 0 for v in values)
    assert all(x > y for x, y in zip(values, values[1:]))
    # no pairs (all teacher probs equal at the top k): 0
    flat = torch.zeros(2, 5, dtype=torch.float64)
    assert float(per_token_divergence("logistic_ranking", torch.randn(2, 5, dtype=torch.float64), flat).abs().max()) == 0


def test_rank_k_changes_ranking_losses():
    s, t, mask = _batch(seed=12, V=20)
    for name in ("hinge", "logistic_ranking"):
        a, _ = logit_divergence(name, s, t, mask, params={"rank_k": 2})
        b, _ = logit_divergence(name, s, t, mask, params={"rank_k": 10})
        assert abs(float(a.detach()) - float(b.detach())) > 1e-6


def test_sinkhorn_identical_rows_shrink_with_epsilon_and_equal_plan_times_cost():
    z = torch.randn(6, 10, dtype=torch.float64) * 2
    prm = {"sinkhorn_rows": 6, "sinkhorn_iterations": 50}
    values = [float(per_token_divergence("sinkhorn", z, z, params={**prm, "sinkhorn_epsilon": e}).sum())
              for e in (1.0, 0.1, 0.01)]
    assert values[0] > values[1] > values[2] >= 0 and values[2] < 1e-6
    # and it is Σ P∘C of the explicit plan
    s = torch.randn(6, 10, dtype=torch.float64)
    ps, pt = torch.softmax(s, -1), torch.softmax(z, -1)
    C = l1_cost(ps, pt)
    P = sinkhorn_plan(C, 0.1, 50)
    torch.testing.assert_close(per_token_divergence("sinkhorn", s, z, params={**prm, "sinkhorn_epsilon": 0.1}).sum(),
                               (P * C).sum())


def test_sinkhorn_groups_and_lone_row():
    z, s = torch.randn(7, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    v = per_token_divergence("sinkhorn", s, z, params={"sinkhorn_rows": 3})
    assert v[6] == 0 and (v[:6] > 0).all()
    whole = per_token_divergence("sinkhorn", s[:3], z[:3], params={"sinkhorn_rows": 3})
    torch.testing.assert_close(v[:3], whole)
    assert not torch.allclose(per_token_divergence("sinkhorn", s, z, params={"sinkhorn_rows": 7}), v)


def test_sinkhorn_convergence_bound():
    """Defaults (64 rows, epsilon 0.1, 20 rounds) on random data: columns are normalized last
    (measured <= 2e-7); measured max |row sum - 1| 3e-7 / 2e-7 in float32; asserted < 1e-4."""
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.0):
        ps = torch.softmax(torch.randn(64, 1000, generator=g) * scale, -1)
        pt = torch.softmax(torch.randn(64, 1000, generator=g) * scale, -1)
        P = sinkhorn_plan(l1_cost(ps, pt), 0.1, 20)
        assert float((P.sum(0) - 1).abs().max()) < 1e-5
        assert float((P.sum(1) - 1).abs().max()) < 1e-4


def test_sinkhorn_cost_never_forms_g_by_g_by_v():
    g_rows, V = 64, 4096
    ps = torch.softmax(torch.randn(g_rows, V), -1).requires_grad_()
    pt = torch.softmax(torch.randn(g_rows, V), -1)
    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    sizes.append(o.numel())
            return out

    with Record():
        C = l1_cost(ps, pt)
        (grad,) = torch.autograd.grad((C * torch.randn_like(C)).sum(), ps)
    assert max(sizes) <= max(g_rows * V, COST_BLOCK_ELEMENTS) < g_rows * g_rows * V
    assert grad.shape == ps.shape and torch.isfinite(grad).all()


# --- chunked and fused paths == plain --------------------------------------------------------------
N, HS, HT, V = 23, 8, 6, 24


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(chunked_mod, "BLOCK_ELEMENTS", {"closed_form": 2 * V, "autograd": 2 * V})
    monkeypatch.setattr(chunked_mod, "POOL_MIN_BLOCKS", 1)


def _hidden(seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(N, HS, generator=g).requires_grad_()
    sw = (torch.randn(V, HS, generator=g) * 0.7).requires_grad_()
    th, tw = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.7
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.25] = -100
    return sh, sw, th, tw, targets


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("name", NEW)
def test_chunked_and_fused_equal_plain(name, ce_weight, small_blocks):
    sh, sw, th, tw, targets = _hidden(NEW.index(name))
    prm = PARAMS[name]
    mask = targets != -100
    assert name != "sinkhorn" or int(mask.sum()) % 3 != 0  # sinkhorn: the last group is short
    s, t = sh @ sw.T, th @ tw.T
    kd, _ = logit_divergence(name, s, t, mask, temperature=T, params=prm)
    ce = torch.nn.functional.cross_entropy(s, targets, ignore_index=-100, reduction="sum")
    plain = 1.5 * kd + ce_weight * ce
    g_ref = torch.autograd.grad(plain, (sh, sw))
    out = chunked_distill_loss(sh, sw, targets, teacher_hidden=th, teacher_head=tw, divergence=name,
                               temperature=T, kd_weight=1.5, ce_weight=ce_weight, chunk_size=5, params=prm)
    g_chunk = torch.autograd.grad(out.weighted_sum, (sh, sw))
    torch.testing.assert_close(out.weighted_sum, plain.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(g_chunk, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    s_leaf = s.detach().requires_grad_()
    fused = fused_logit_loss(s_leaf, targets, t, divergence=name, temperature=T, kd_weight=1.5,
                             ce_weight=ce_weight, chunk_size=4, params=prm)
    (g_fused,) = torch.autograd.grad(fused.weighted_sum, s_leaf)
    s2 = s.detach().requires_grad_()
    kd2, _ = logit_divergence(name, s2, t, mask, temperature=T, params=prm)
    (g_plain,) = torch.autograd.grad(1.5 * kd2 + ce_weight * torch.nn.functional.cross_entropy(
        s2, targets, ignore_index=-100, reduction="sum"), s2)
    torch.testing.assert_close(fused.weighted_sum, plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


def test_chunked_sinkhorn_rows_are_rounded_to_groups(small_blocks):
    spec = chunked_mod._Spec("sinkhorn", 1.0, 0.5, 0.1, 1.0, 0.0, V, None, None, 5, 512.0, None,
                             (("sinkhorn_rows", 4),))
    assert chunked_mod.group_aligned_rows(spec, 5, 2) == (8, 4)
    assert chunked_mod.group_aligned_rows(spec, 16, 9) == (16, 8)
    fkl = chunked_mod._Spec("fkl", 1.0, 0.5, 0.1, 1.0, 0.0, V, None, None, 5, 512.0, None)
    assert chunked_mod.group_aligned_rows(fkl, 5, 2) == (5, 2)


def test_chunked_params_are_validated():
    sh, sw, th, tw, targets = _hidden()
    with pytest.raises(ValueError, match="cakld_confidence"):
        chunked_distill_loss(sh, sw, targets, teacher_hidden=th, teacher_head=tw, divergence="cakld")
    with pytest.raises(ValueError, match="sinkhorn_epsilon must be > 0, got -1"):
        fused_logit_loss(sh @ sw.T, targets, th @ tw.T, divergence="sinkhorn", params={"sinkhorn_epsilon": -1})


# --- sparse teachers ---------------------------------------------------------------------------
def _sparse(seed=0, n=5, v=7):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    return s, t


@pytest.mark.parametrize("name", ["soft_ce", "cakld", "akl", "hinge", "logistic_ranking"])
def test_topk_with_k_equal_v_is_dense(name):
    s, t = _sparse(seed=2)
    prm = {**PARAMS[name], "rank_k": 64} if name in ("hinge", "logistic_ranking") else PARAMS[name]
    lp = torch.log_softmax(t / T, -1)
    logp, ids = lp.sort(-1, descending=True)
    rest = torch.full((s.shape[0],), -math.inf, dtype=torch.float64)
    sparse, _ = topk_divergence(name, s, ids, logp, rest, temperature=T, params=prm)
    dense, _ = logit_divergence(name, s, t, torch.ones(s.shape[0], dtype=torch.bool), temperature=T, params=prm)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(sparse, s)[0], torch.autograd.grad(dense, s)[0],
                               rtol=1e-8, atol=1e-12)
    if name == "soft_ce":
        renorm, _ = topk_divergence(name, s, ids, logp, missing_mass="renormalize", temperature=T)
        torch.testing.assert_close(renorm, dense, rtol=1e-9, atol=1e-12)


def test_sparse_hinge_ignores_rank_k_and_uses_the_k_ids():
    s, t = _sparse(seed=3)
    lp = torch.log_softmax(t, -1)
    logp, ids = lp.topk(4, -1)
    rest = lp.scatter(-1, ids, -math.inf).logsumexp(-1)
    a, _ = topk_divergence("hinge", s, ids, logp, rest, params={"rank_k": 2})
    b, _ = topk_divergence("hinge", s, ids, logp, rest, params={"rank_k": 4})
    assert torch.equal(a, b) and float(a) > 0


def test_sampled_soft_ce_is_unbiased():
    s, t = _sparse(seed=4, n=3, v=6)
    pt = torch.softmax(t, -1)
    dense, _ = logit_divergence("soft_ce", s, t, torch.ones(3, dtype=torch.bool))
    ids = torch.multinomial(pt, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    est, n = sampled_divergence("soft_ce", s, ids)
    assert int(n) == 3
    torch.testing.assert_close(est, dense, rtol=0.02, atol=0.0)
    g_est, g_dense = torch.autograd.grad(est, s)[0], torch.autograd.grad(dense, s)[0]
    assert float((g_est - g_dense).abs().max()) < 0.03
    entropy = -(pt * pt.log()).sum(-1)
    fkl, _ = sampled_divergence("fkl", s, ids, entropy)
    torch.testing.assert_close(est.detach() - fkl.detach(), entropy.sum())


@pytest.mark.parametrize("name", [n for n in _NAMES if n not in SPARSE_DIVERGENCES])
def test_topk_refuses_in_one_line(name):
    s, t = _sparse()
    lp = torch.log_softmax(t, -1)
    logp, ids = lp.topk(3, -1)
    rest = lp.scatter(-1, ids, -math.inf).logsumexp(-1)
    with pytest.raises(ValueError, match="a top-k teacher holds k log-probs") as info:
        topk_divergence(name, s, ids, logp, rest)
    assert "\n" not in str(info.value) and "use fkl, rkl, jsd, soft_ce" in str(info.value)


def test_renormalized_and_sampled_refusals():
    s, t = _sparse()
    lp = torch.log_softmax(t, -1)
    logp, ids = lp.topk(3, -1)
    for name in ("rkl", "jsd", "cakld", "akl", "hinge", "logistic_ranking"):
        with pytest.raises(ValueError, match="renormalized top-k teacher.*use fkl or soft_ce"):
            topk_divergence(name, s, ids, logp, missing_mass="renormalize", params=PARAMS.get(name))
    for name in [n for n in _NAMES if n not in ("fkl", "soft_ce")]:
        with pytest.raises(ValueError, match="sampled teacher tokens.*use fkl or soft_ce") as info:
            sampled_divergence(name, s, ids)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind,name", [("topk", "soft_ce"), ("topk", "cakld"), ("topk", "akl"), ("topk", "hinge"),
                                       ("topk", "logistic_ranking"), ("topk", "rkl"), ("sampled", "soft_ce"),
                                       ("renormalize", "soft_ce")])
def test_sparse_chunked_falls_back_to_autograd(kind, name, monkeypatch):
    import potstill.losses.sparse_chunked as sc
    monkeypatch.setattr(sc, "BLOCK_ELEMENTS", 3 * V)   # several row blocks
    monkeypatch.setattr(sc, "CHUNK_ROWS", 7)           # several chunks
    g = torch.Generator().manual_seed(1)
    h = torch.randn(17, HS, generator=g).requires_grad_()
    w = torch.randn(V, HS, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    targets = torch.randint(0, V, (17,), generator=g)
    tl = torch.log_softmax(torch.randn(17, V, generator=g) * 2 / T, -1)
    prm = PARAMS.get(name, {})
    logits = h @ w.T + b
    if kind == "sampled":
        ids = torch.multinomial(tl.exp(), 5, replacement=True, generator=g)
        rows = {"ids": ids, "entropy": -(tl.exp() * tl).sum(-1)}
        kd, _ = sampled_divergence(name, logits, ids, temperature=T, params=prm)
    else:
        logp, ids = tl.topk(6, -1)
        rows = {"ids": ids, "logp": logp, "rest": tl.scatter(-1, ids, -math.inf).logsumexp(-1)}
        mm = "renormalize" if kind == "renormalize" else "rest"
        kd, _ = topk_divergence(name, logits, ids, logp, rows["rest"] if mm == "rest" else None,
                                missing_mass=mm, temperature=T, params=prm)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    plain = 2.0 * kd + 0.5 * ce
    g_ref = torch.autograd.grad(plain, (h, w, b))
    out = sparse_chunked_loss(h, w, b, targets, rows, kind="sampled" if kind == "sampled" else "topk",
                              missing_mass="renormalize" if kind == "renormalize" else "rest", temperature=T,
                              kd_weight=2.0, ce_weight=0.5, divergence=name, params=prm)
    torch.testing.assert_close(out.weighted_sum, plain.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.term_sums["kd"], kd.detach(), rtol=1e-5, atol=1e-4)
    for a, r in zip(torch.autograd.grad(out.weighted_sum, (h, w, b)), g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_sparse_chunked_refuses_in_one_line():
    h, w = torch.randn(3, HS), torch.randn(V, HS)
    rows = {"ids": torch.zeros(3, 2, dtype=torch.long), "logp": torch.zeros(3, 2), "rest": torch.zeros(3)}
    with pytest.raises(ValueError, match="sinkhorn needs the teacher's full distribution"):
        sparse_chunked_loss(h, w, None, torch.zeros(3, dtype=torch.long), rows, kind="topk", divergence="sinkhorn")
    with pytest.raises(ValueError, match="sampled teacher tokens"):
        sparse_chunked_loss(h, w, None, torch.zeros(3, dtype=torch.long), rows, kind="sampled", divergence="akl")


# --- parameters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params,match", [
    ("sinkhorn", {"sinkhorn_epsilon": -1}, "sinkhorn_epsilon must be > 0, got -1"),
    ("sinkhorn", {"sinkhorn_epsilon": 0.0}, "sinkhorn_epsilon must be > 0"),
    ("sinkhorn", {"sinkhorn_iterations": 0}, "sinkhorn_iterations must be an integer >= 1"),
    ("sinkhorn", {"sinkhorn_rows": 1}, "sinkhorn_rows must be an integer >= 2"),
    ("cakld", {}, "needs params\\['cakld_confidence'\\]"),
    ("cakld", None, "cakld_confidence"),
    ("cakld", {"cakld_confidence": 1.5}, "cakld_confidence must be a number in \\[0, 1\\], got 1.5"),
    ("cakld", {"cakld_confidence": -0.1}, "cakld_confidence must be"),
    ("hinge", {"rank_k": 1}, "rank_k must be an integer >= 2, got 1"),
    ("hinge", {"rank_k": 2.5}, "rank_k must be an integer"),
    ("hinge", {"hinge_margin": -0.1}, "hinge_margin must be"),
    ("akl", {"akl_head_mass": 0.0}, "akl_head_mass must be a number in \\(0, 1\\]"),
    ("logsum", {"logsum_power": 0}, "logsum_power must be"),
    ("fkl", {"sinkhorn_eps": 0.1}, "unknown divergence parameter\\(s\\) sinkhorn_eps"),
    ("soft_ce", {"temperature": 2.0, "beta": 1}, "unknown divergence parameter\\(s\\) beta, temperature"),
])
def test_bad_params_raise_one_line(name, params, match):
    s, t, mask = _batch()
    with pytest.raises(ValueError, match=match) as info:
        logit_divergence(name, s, t, mask, params=params)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=match):
        per_token_divergence(name, s.detach()[mask], t[mask], params=params)


def test_registry_and_old_defaults_unchanged():
    assert set(NEW) <= set(_NAMES) and set(NEW) <= set(DIVERGENCES)
    s, t, mask = _batch(dtype=torch.float32)
    for name in ("fkl", "rkl", "jsd", "tvd", "mse"):
        a, _ = logit_divergence(name, s, t, mask, temperature=T)
        b, _ = logit_divergence(name, s, t, mask, temperature=T, params={})
        assert torch.equal(a, b)
    for name in NEW:
        a, _ = DIVERGENCES[name](s, t, mask, temperature=T, params=PARAMS[name])
        b, _ = logit_divergence(name, s, t, mask, temperature=T, params=PARAMS[name])
        assert torch.equal(a, b)
