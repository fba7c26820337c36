"""Cross-tokenizer losses (potstill.losses.aligned) against float64 references written from
the definitions: ULD's sorted closed form, and KL / JSD on hand-built coarse-grained
distributions (mapped ids + one bucket)."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.losses import logit_divergence
from potstill.losses.aligned import ALIGNED_MODES, aligned_divergence, mapped_topk_divergence, uld_distance

F64 = torch.float64


def _randn(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def _teacher_topk(teacher_logits, k, temperature=1.0):
    """Teacher top-k over its own vocab: (ids, logp sorted descending, log rest mass)."""
    lp = torch.log_softmax(teacher_logits / temperature, -1)
    values, ids = lp.topk(k, -1)
    rest = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, rest


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ---------------------------------------------------------------- references (float64, by hand)

def _ref_uld_full(student_logits, teacher_probs, temperature=1.0):
    """Σ_rows Σ_i |sort(p_s)_i − sort(p_t)_i|, both descending, shorter zero-padded (paper definition)."""
    total = torch.zeros((), dtype=F64)
    for r in range(student_logits.shape[0]):
        ps = torch.softmax(student_logits[r].to(F64) / temperature, -1).sort(descending=True).values
        pt = teacher_probs[r].to(F64).sort(descending=True).values
        n = max(ps.numel(), pt.numel())
        ps = torch.cat([ps, ps.new_zeros(n - ps.numel())])
        pt = torch.cat([pt, pt.new_zeros(n - pt.numel())])
        for i in range(n):
            total = total + (ps[i] - pt[i]).abs()
    return total


def _ref_uld_topk(student_logits, teacher_probs_topk, teacher_rest, temperature=1.0):
    """The documented top-K approximation: exact head, |student tail − teacher rest| for the tail."""
    total = torch.zeros((), dtype=F64)
    for r in range(student_logits.shape[0]):
        ps = torch.softmax(student_logits[r] / temperature, -1).sort(descending=True).values
        pt = teacher_probs_topk[r].sort(descending=True).values
        k = pt.numel()
        for i in range(k):
            total = total + (ps[i] - pt[i]).abs() if i < ps.numel() else total + pt[i]
        total = total + (ps[k:].sum() - teacher_rest[r]).abs()
    return total


def _kl(p, q):
    out = torch.zeros((), dtype=F64)
    for a, b in zip(p, q):
        if float(a.detach()) > 0:
            out = out + a * (a.log() - b.log())
    return out


def _divergence(name, p, q, beta):
    """fkl = KL(p‖q), rkl = KL(q‖p), jsd = beta KL(p‖m) + (1−beta) KL(q‖m), m = beta p + (1−beta) q (TRL)."""
    if name == "fkl" or (name == "jsd" and beta == 0.0):
        return _kl(p, q)
    if name == "rkl" or (name == "jsd" and beta == 1.0):
        return _kl(q, p)
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _ref_mapped(name, student_logits, ids, teacher_logp, teacher_rest_logp, temperature=1.0, beta=0.5):
    """Coarse-grain both sides onto (mapped ids of the row) + one bucket, by hand, then the divergence."""
    total = torch.zeros((), dtype=F64)
    for r in range(student_logits.shape[0]):
        qs = torch.softmax(student_logits[r] / temperature, -1)
        p, q, mapped = [], [], set()
        bucket_t = torch.exp(teacher_rest_logp[r].to(F64))
        for j in range(ids.shape[1]):
            pt = torch.exp(teacher_logp[r, j].to(F64))
            sid = int(ids[r, j])
            if sid < 0:
                bucket_t = bucket_t + pt
            else:
                p.append(pt)
                q.append(qs[sid])
                mapped.add(sid)
        bucket_s = torch.zeros((), dtype=F64)
        for v in range(qs.numel()):
            if v not in mapped:
                bucket_s = bucket_s + qs[v]
        p.append(bucket_t)
        q.append(bucket_s)
        z = sum(p)  # the teacher side is renormalized (topk_divergence convention)
        p = [a / z for a in p]
        total = total + _divergence(name, p, q, beta)
    return total


# ---------------------------------------------------------------- ULD

@pytest.mark.parametrize("vs,vt", [(7, 11), (11, 7), (9, 9)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_uld_full_vocab_teacher_is_the_closed_form(vs, vt, temperature):
    s = _randn(6, vs, seed=1).requires_grad_(True)
    t = _randn(6, vt, seed=2)
    _, lt, rest = _teacher_topk(t, vt)            # K = Vt: the whole teacher vocab, rest = -inf
    assert torch.isneginf(rest).all()
    loss, n = uld_distance(s, lt, rest, temperature=temperature)
    ref = _ref_uld_full(s, lt.exp(), temperature)
    assert loss.dtype == F64 and int(n) == 6
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, s), _grad(ref, s), rtol=1e-10, atol=1e-12)


def test_uld_floor_rest_and_unsorted_teacher_give_the_same():
    s = _randn(5, 8, seed=3)
    _, lt, rest = _teacher_topk(_randn(5, 10, seed=4), 10)
    a, _ = uld_distance(s, lt, rest)
    b, _ = uld_distance(s, lt.flip(-1), torch.full_like(rest, -1e30))   # log(0)-ish floor, ascending order
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_uld_of_a_permutation_of_itself_is_zero():
    s = _randn(4, 13, seed=5)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    lt = torch.log_softmax(s[:, perm], -1)
    loss, _ = uld_distance(s, lt, torch.full((4,), float("-inf"), dtype=F64))
    assert abs(float(loss)) < 1e-14
    # And not a trivially-zero function: a different distribution gives a positive distance.
    other, _ = uld_distance(s, torch.log_softmax(s[:, perm] * 1.5, -1), torch.full((4,), float("-inf"), dtype=F64))
    assert float(other) > 1e-3


@pytest.mark.parametrize("vs,k", [(12, 4), (12, 12), (5, 8)])
def test_uld_topk_teacher_is_the_documented_approximation(vs, k):
    vt = 16
    s = _randn(6, vs, seed=6).requires_grad_(True)
    t = _randn(6, vt, seed=7)
    _, lt, rest = _teacher_topk(t, k)
    loss, _ = uld_distance(s, lt, rest)
    ref = _ref_uld_topk(s, lt.exp(), rest.exp())
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, s), _grad(ref, s), rtol=1e-10, atol=1e-12)
    # A lower bound of the full closed form, exact when K >= Vs (the student's tail is padding).
    full = _ref_uld_full(s, torch.softmax(t, -1))
    assert float(loss.detach()) <= float(full.detach()) + 1e-12
    if k >= vs:
        torch.testing.assert_close(loss, full, rtol=1e-12, atol=1e-12)
    else:
        assert float(loss.detach()) < float(full.detach()) - 1e-6   # the approximation really is one here


def test_uld_temperature_changes_the_student_side_only():
    s = _randn(4, 9, seed=8)
    _, lt, rest = _teacher_topk(_randn(4, 9, seed=9), 9)
    a, _ = uld_distance(s, lt, rest, temperature=1.0)
    b, _ = uld_distance(s, lt, rest, temperature=3.0)
    torch.testing.assert_close(b, _ref_uld_full(s / 3.0, lt.exp()), rtol=1e-12, atol=1e-12)
    assert abs(float(a) - float(b)) > 1e-3


def test_uld_bf16_input_computes_in_float32():
    s = _randn(3, 9, seed=10).to(torch.bfloat16).requires_grad_(True)
    _, lt, rest = _teacher_topk(_randn(3, 9, seed=11), 4)
    loss, _ = uld_distance(s, lt.to(torch.bfloat16), rest.float())
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


# ---------------------------------------------------------------- mapped top-k

NAMES = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]


@pytest.mark.parametrize("name,beta", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_mapped_identity_map_full_vocab_is_the_full_divergence(name, beta, temperature):
    s = _randn(5, 10, seed=12).requires_grad_(True)
    t = _randn(5, 10, seed=13)
    ids, lt, rest = _teacher_topk(t, 10, temperature)   # identity map: teacher id == student id, K = V
    loss, n = mapped_topk_divergence(name, s, ids, lt, rest, temperature=temperature, beta=beta)
    assert int(n) == 5 and loss.dtype == F64
    # Independent reference: the divergence on the full vocab, no bucket (its masses are 0).
    ps = torch.softmax(s / temperature, -1)
    pt = torch.softmax(t / temperature, -1)
    ref = sum(_divergence(name, list(pt[r]), list(ps[r]), beta) for r in range(5))
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g = _grad(loss, s)
    torch.testing.assert_close(g, _grad(ref, s), rtol=1e-8, atol=1e-11)
    # And the library's full-vocabulary loss.
    full, _ = logit_divergence(name, s, t, torch.ones(5, dtype=torch.bool), temperature=temperature, beta=beta)
    torch.testing.assert_close(loss, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, _grad(full, s), rtol=1e-8, atol=1e-11)


def _hand_case(seed=14, rows=4, vs=9, vt=12, k=6):
    """Teacher top-k in its own vocab, translated by a partial map (some tokens -> -1)."""
    g = torch.Generator().manual_seed(seed)
    s = _randn(rows, vs, seed=seed)
    t = _randn(rows, vt, seed=seed + 1)
    tids, lt, rest = _teacher_topk(t, k)
    # Teacher id -> student id, -1 for teacher tokens without a counterpart; injective.
    table = torch.full((vt,), -1, dtype=torch.long)
    mapped_teacher = torch.randperm(vt, generator=g)[:vs - 2]
    table[mapped_teacher] = torch.randperm(vs, generator=g)[:vs - 2]
    ids = table[tids]
    return s, ids, lt, rest


@pytest.mark.parametrize("name,beta", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_mapped_with_unmapped_ids_matches_hand_built_coarse_graining(name, beta, temperature):
    s, ids, lt, rest = _hand_case()
    assert (ids == -1).any(dim=-1).all() and (ids >= 0).any()   # several -1 per row: duplicates of the dummy
    s = s.requires_grad_(True)
    loss, _ = mapped_topk_divergence(name, s, ids, lt, rest, temperature=temperature, beta=beta)
    ref = _ref_mapped(name, s, ids, lt, rest, temperature, beta)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(loss, s), _grad(ref, s), rtol=1e-8, atol=1e-11)


def test_mapped_temperature_changes_the_loss():
    s, ids, lt, rest = _hand_case(seed=20)
    a, _ = mapped_topk_divergence("fkl", s, ids, lt, rest, temperature=1.0)
    b, _ = mapped_topk_divergence("fkl", s, ids, lt, rest, temperature=3.0)
    assert abs(float(a) - float(b)) > 1e-3


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd"])
def test_mapped_all_unmapped_rows_are_bucket_against_bucket(name):
    s = _randn(3, 7, seed=21).requires_grad_(True)
    _, lt, rest = _teacher_topk(_randn(3, 11, seed=22), 5)
    ids = torch.full((3, 5), -1, dtype=torch.long)
    loss, _ = mapped_topk_divergence(name, s, ids, lt, rest)
    assert abs(float(loss.detach())) < 1e-12      # one outcome each side, both with mass 1
    g = _grad(loss, s)
    assert torch.isfinite(g).all() and float(g.abs().max()) < 1e-12


def test_mapped_bf16_and_float32_inputs():
    s, ids, lt, rest = _hand_case(seed=23)
    ref, _ = mapped_topk_divergence("jsd", s, ids, lt, rest)
    for dtype in (torch.float32, torch.bfloat16):
        x = s.to(dtype).requires_grad_(True)
        loss, _ = mapped_topk_divergence("jsd", x, ids, lt.float(), rest.float())
        assert loss.dtype == torch.float32
        loss.backward()
        assert torch.isfinite(x.grad.float()).all()
        torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=1e-3)


def test_mapped_rejects_bad_ids_and_names():
    s, ids, lt, rest = _hand_case()
    bad = ids.clone()
    bad[0, 0] = s.shape[1]          # == V would silently hit the dummy column
    with pytest.raises(ValueError, match=r"-1 \(no student counterpart\) or a student id in \[0, 9\)"):
        mapped_topk_divergence("fkl", s, bad, lt, rest)
    bad[0, 0] = -2
    with pytest.raises(ValueError, match="student id in"):
        mapped_topk_divergence("fkl", s, bad, lt, rest)
    dup = torch.tensor([[3, 3, -1, -1, 0, 1]])
    with pytest.raises(ValueError, match="repeats a student id"):
        mapped_topk_divergence("fkl", s[:1], dup, lt[:1], rest[:1])
    with pytest.raises(ValueError, match="support fkl, rkl, jsd"):
        mapped_topk_divergence("tvd", s, ids, lt, rest)
    with pytest.raises(TypeError, match="teacher_ids must be an integer"):
        mapped_topk_divergence("fkl", s, ids.double(), lt, rest)
    with pytest.raises(ValueError, match="teacher_ids shape"):
        mapped_topk_divergence("fkl", s, ids[:, :3], lt, rest)


# ---------------------------------------------------------------- aligned_divergence

def _batch(seed=30, rows=8, vs=9, vt=12, k=6):
    s, ids, lt, rest = _hand_case(seed=seed, rows=rows, vs=vs, vt=vt, k=k)
    exact = torch.tensor([True, False, True, True, False, False, True, False])[:rows]
    return s, ids, lt, rest, exact


@pytest.mark.parametrize("name,beta", [("fkl", 0.5), ("jsd", 0.3)])
def test_hybrid_is_weighted_exact_plus_uld(name, beta):
    s, ids, lt, rest, exact = _batch()
    s = s.requires_grad_(True)
    loss, n, terms = aligned_divergence(name, s, ids, lt, rest, exact, temperature=1.3, beta=beta,
                                        exact_weight=0.3, uld_weight=2.0)
    e = _ref_mapped(name, s[exact], ids[exact], lt[exact], rest[exact], 1.3, beta)
    u = _ref_uld_topk(s[~exact] / 1.3, lt[~exact].exp(), rest[~exact].exp())
    ref = 0.3 * e + 2.0 * u
    assert int(n) == s.shape[0] and n.dtype == torch.int64
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(loss, s), _grad(ref, s), rtol=1e-8, atol=1e-11)
    assert set(terms) == {"exact", "uld"}
    torch.testing.assert_close(terms["exact"], e.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["uld"], u.detach(), rtol=1e-10, atol=1e-12)
    assert not terms["exact"].requires_grad and not terms["uld"].requires_grad


def test_exact_mode_ignores_other_rows():
    s, ids, lt, rest, exact = _batch(seed=31)
    s = s.clone()
    s[~exact] = float("nan")          # garbage in the rows it must not read
    ids = ids.clone()
    ids[~exact] = 10_000              # out-of-range ids on ignored rows are not even looked at
    s = s.requires_grad_(True)
    loss, n, terms = aligned_divergence("rkl", s, ids, lt, rest, exact, mode="exact", uld_weight=5.0)
    ref = _ref_mapped("rkl", s.detach()[exact], ids[exact], lt[exact], rest[exact])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert int(n) == int(exact.sum())
    assert float(terms["uld"]) == 0.0
    g = _grad(loss, s)
    assert torch.isfinite(g).all() and float(g[~exact].abs().max()) == 0.0


def test_uld_mode_uses_every_row():
    s, ids, lt, rest, exact = _batch(seed=32)
    s = s.requires_grad_(True)
    loss, n, terms = aligned_divergence("fkl", s, ids, lt, rest, exact, mode="uld", exact_weight=7.0,
                                        uld_weight=0.5, temperature=2.0)
    ref = 0.5 * _ref_uld_topk(s / 2.0, lt.exp(), rest.exp())
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(loss, s), _grad(ref, s), rtol=1e-8, atol=1e-11)
    assert int(n) == s.shape[0]
    assert float(terms["exact"]) == 0.0
    torch.testing.assert_close(terms["uld"], (ref / 0.5).detach())


@pytest.mark.parametrize("mode", ALIGNED_MODES)
@pytest.mark.parametrize("which", ["all_exact", "none_exact", "no_rows"])
def test_zero_rows_of_a_kind_keep_the_graph_and_finite_gradients(mode, which):
    s, ids, lt, rest, exact = _batch(seed=33)
    if which == "all_exact":
        exact = torch.ones_like(exact)
    elif which == "none_exact":
        exact = torch.zeros_like(exact)
    else:
        s, ids, lt, rest, exact = s[:0], ids[:0], lt[:0], rest[:0], exact[:0]
    s = s.requires_grad_(True)
    loss, n, terms = aligned_divergence("jsd", s, ids, lt, rest, exact, mode=mode)
    assert loss.requires_grad and loss.dim() == 0 and loss.dtype == F64
    g = _grad(loss, s)
    assert g.shape == s.shape and torch.isfinite(g).all()
    if which == "no_rows" or (mode == "exact" and which == "none_exact"):
        assert float(loss.detach()) == 0.0 and int(n) == 0
    if mode == "hybrid" and which == "all_exact":
        assert float(terms["uld"]) == 0.0 and float(terms["exact"]) > 0
    if mode == "hybrid" and which == "none_exact":
        assert float(terms["exact"]) == 0.0 and float(terms["uld"]) > 0


def test_zero_row_kind_stays_zero_for_nonfinite_logits():
    s, ids, lt, rest, _ = _batch(seed=34)
    s = s.clone()
    s[0, 0] = float("inf")
    s = s.requires_grad_(True)
    exact = torch.zeros(s.shape[0], dtype=torch.bool)
    loss, n, _ = aligned_divergence("fkl", s, ids, lt, rest, exact, mode="exact")
    assert float(loss.detach()) == 0.0 and int(n) == 0
    assert float(_grad(loss, s).abs().max()) == 0.0    # not 0 * inf = NaN


def test_weights_change_the_loss():
    s, ids, lt, rest, exact = _batch(seed=35)
    base, _, t = aligned_divergence("fkl", s, ids, lt, rest, exact)
    torch.testing.assert_close(base, t["exact"] + t["uld"])
    only_exact, _, _ = aligned_divergence("fkl", s, ids, lt, rest, exact, uld_weight=0.0)
    torch.testing.assert_close(only_exact, t["exact"])
    assert not math.isclose(float(base), float(only_exact))


def test_aligned_rejects_bad_inputs_with_clear_messages():
    s, ids, lt, rest, exact = _batch(seed=36)
    with pytest.raises(ValueError, match="mode must be one of hybrid, exact, uld, got 'both'"):
        aligned_divergence("fkl", s, ids, lt, rest, exact, mode="both")
    with pytest.raises(ValueError, match="exact_weight must be >= 0, got -1.0"):
        aligned_divergence("fkl", s, ids, lt, rest, exact, exact_weight=-1.0)
    with pytest.raises(ValueError, match="uld_weight must be >= 0, got nan"):
        aligned_divergence("fkl", s, ids, lt, rest, exact, uld_weight=float("nan"))
    with pytest.raises(ValueError, match="support fkl, rkl, jsd, not 'tvd'"):
        aligned_divergence("tvd", s, ids, lt, rest, exact, mode="uld")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        aligned_divergence("fkl", s, ids, lt, rest, exact, temperature=0.0)
    with pytest.raises(ValueError, match=r"student_logits must be \(R, V\)"):
        aligned_divergence("fkl", s[None], ids, lt, rest, exact)
    with pytest.raises(ValueError, match=r"teacher_logp must be \(R, K\) with R = 8"):
        aligned_divergence("fkl", s, ids[:3], lt[:3], rest, exact)
    with pytest.raises(ValueError, match=r"teacher_rest_logp must be \(R,\) = \(8,\)"):
        aligned_divergence("fkl", s, ids, lt, rest[:3], exact)
    with pytest.raises(ValueError, match="teacher_ids shape"):
        aligned_divergence("fkl", s, ids[:, :2], lt, rest, exact)
    with pytest.raises(ValueError, match=r"exact must be \(R,\) = \(8,\)"):
        aligned_divergence("fkl", s, ids, lt, rest, exact[:3])
    with pytest.raises(TypeError, match="exact must be a bool tensor"):
        aligned_divergence("fkl", s, ids, lt, rest, exact.long())
