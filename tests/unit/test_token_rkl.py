"""``token_rkl``: the single-sample reverse-KL estimate on the label token, REINFORCE gradient.

Per valid token with label x (q = student, p = teacher, both softmax(logits / T)):
value ``k = log q(x) - log p(x)``, gradient w.r.t. the student logits ``sg(k) * d log q(x)``.
The gradient is NOT the gradient of the value (that would be ``d log q(x)``, no factor k), so
``gradcheck`` does not apply; the gradient is checked against its definition instead.

Checked here: the float64 definition (values and gradients, mask, T != 1), the identity
student == teacher, the REINFORCE form, a Monte-Carlo check that with labels sampled from the
student the mean value and gradient approach the exact reverse KL, the chunked and fused-logits
paths against the plain path, the Objective's plain and chunked paths, and the refusals.
"""

from __future__ import annotations

import math

import pytest
import torch

import potstill.losses.chunked as chunked_mod
from potstill.config import LogitLossConfig, LossConfig
from potstill.errors import ConfigError
from potstill.losses import chunked_distill_loss, cross_entropy, logit_divergence, per_token_divergence
from potstill.losses.fused_logits import fused_logit_loss
from potstill.losses.logits import _NAMES
from potstill.losses.sparse import SPARSE_DIVERGENCES, topk_divergence
from potstill.models.heads import HeadParams
from potstill.teachers.signal import check_sparse_loss
from potstill.training.objective import Objective


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # A few rows per softmax block: every chunk is split into several blocks (as test_chunked.py).
    monkeypatch.setattr(chunked_mod, "BLOCK_ELEMENTS", {"closed_form": 320, "autograd": 320})
    monkeypatch.setattr(chunked_mod, "HEAD_BLOCK_ELEMENTS", 160)
    monkeypatch.setattr(chunked_mod, "ADD_BLOCK_ELEMENTS", 112)


def _data(shape=(3, 5, 9), scale=2.0, seed=0, dtype=torch.float32):
    """Student/teacher logits (..., V), labels (...) with -100 at ignored positions, mask."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    mask = torch.rand(*shape[:-1], generator=g) < 0.6
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False
    labels[~mask] = -100
    return s, t, labels, mask


def _reference(s, t, labels, T):
    """From the definition, float64: per-row value k and the REINFORCE gradient w.r.t. s."""
    s64, t64 = s.detach().double(), t.detach().double()
    value = torch.zeros(labels.shape, dtype=torch.float64)
    grad = torch.zeros_like(s64)
    for idx in (labels != -100).nonzero().tolist():
        idx = tuple(idx)
        x = int(labels[idx])
        ls = torch.log_softmax(s64[idx] / T, -1)
        lt = torch.log_softmax(t64[idx] / T, -1)
        k = (ls[x] - lt[x]).item()
        value[idx] = k
        onehot = torch.zeros_like(ls)
        onehot[x] = 1.0
        grad[idx] = k * (onehot - ls.exp()) / T  # d log q(x) / d s = (onehot - q) / T
    return value, grad


# --------------------------------------------------------------------------- the definition
@pytest.mark.parametrize("T", [0.7, 1.0, 2.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_float64_definition(T, dtype, tol):
    s, t, labels, mask = _data(seed=int(T * 10), dtype=dtype)
    s.requires_grad_(True)
    loss, n = logit_divergence("token_rkl", s, t, mask, temperature=T, targets=labels)
    ref_value, ref_grad = _reference(s, t, labels, T)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    assert n.dtype == torch.int64 and int(n) == int(mask.sum())
    assert loss.item() == pytest.approx(ref_value.sum().item(), rel=tol, abs=tol)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))  # ignored positions: exactly 0
    # per token: the value is k itself (logs show the estimate), one per valid row
    per_tok = per_token_divergence("token_rkl", s[mask], t[mask], temperature=T, targets=labels[mask])
    assert per_tok.shape == (int(mask.sum()),)
    torch.testing.assert_close(per_tok.detach().double(), ref_value[mask], rtol=tol, atol=tol)
    assert (per_tok < 0).any() and (per_tok > 0).any()  # a single-sample estimate: either sign


def test_masked_garbage_gives_zero_grad_and_finite_loss():
    s, t, labels, mask = _data(seed=1)
    clean = s.clone().requires_grad_(True)
    ref, _ = logit_divergence("token_rkl", clean, t, mask, targets=labels)
    (ref_grad,) = torch.autograd.grad(ref, clean)
    garbage = [float("nan"), float("inf"), -float("inf")]
    s_bad, t_bad = s.clone(), t.clone()
    for i, idx in enumerate((~mask).nonzero()):
        s_bad[tuple(idx)] = garbage[i % 3]
        t_bad[tuple(idx)] = garbage[(i + 1) % 3]
    s_bad.requires_grad_(True)
    loss, _ = logit_divergence("token_rkl", s_bad, t_bad, mask, targets=labels)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref.detach())
    (grad,) = torch.autograd.grad(loss, s_bad)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])) and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref_grad)


def test_all_masked_gives_exact_zero():
    s, t, labels, _ = _data(seed=2)
    s.requires_grad_(True)
    none = torch.zeros(labels.shape, dtype=torch.bool)
    loss, n = logit_divergence("token_rkl", s, t, none, targets=torch.full_like(labels, -100))
    assert loss.item() == 0.0 and int(n) == 0
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.count_nonzero(grad) == 0


def test_identity_equal_logits_gives_zero_value_and_gradient():
    s, _, labels, mask = _data(seed=3)
    s.requires_grad_(True)
    loss, _ = logit_divergence("token_rkl", s, s.detach().clone(), mask, temperature=1.7, targets=labels)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.count_nonzero(grad) == 0


def test_gradient_is_reinforce_not_gradient_of_value():
    s, t, labels, mask = _data(seed=4)
    T = 1.3
    s.requires_grad_(True)
    loss, _ = logit_divergence("token_rkl", s, t, mask, temperature=T, targets=labels)
    (grad,) = torch.autograd.grad(loss, s)
    # sg(k) * grad log q(x), written independently
    logq = torch.log_softmax(s[mask].float() / T, -1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    logp = torch.log_softmax(t[mask].float() / T, -1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    k = (logq - logp).detach()
    (want,) = torch.autograd.grad((k * logq).sum(), s, retain_graph=True)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss.detach(), k.sum())
    # ... which is not the pathwise gradient of the value sum_t k_t (that has no factor k).
    (pathwise,) = torch.autograd.grad((logq - logp).sum(), s)
    assert not torch.allclose(grad, pathwise, rtol=1e-2, atol=1e-3)


def test_teacher_receives_no_gradient():
    s, t, labels, mask = _data(seed=5)
    s.requires_grad_(True)
    t.requires_grad_(True)
    logit_divergence("token_rkl", s, t, mask, targets=labels)[0].backward()
    assert t.grad is None and s.grad is not None and torch.count_nonzero(s.grad) > 0


def test_bf16_inputs():
    s, t, labels, mask = _data(seed=6)
    s16, t16 = s.bfloat16().requires_grad_(True), t.bfloat16()
    loss, _ = logit_divergence("token_rkl", s16, t16, mask, temperature=2.0, targets=labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, logit_divergence("token_rkl", s16.detach().float(), t16.float(), mask, temperature=2.0,
                               targets=labels)[0])
    (grad,) = torch.autograd.grad(loss, s16)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


# --------------------------------------------------------------------------- Monte Carlo
def test_on_policy_samples_estimate_reverse_kl_value_and_gradient():
    """Labels sampled from the student at the same temperature: the mean value is an unbiased
    estimate of KL(q || p) and the mean gradient of its gradient. S samples per row; the
    deviation is checked against the standard error estimated from the same samples (the
    sample mean is within 5 standard errors with probability > 1 - 6e-7 per quantity, so with
    the seed fixed this is not flaky by construction, yet a bias of a few SE is caught; the
    SE itself is asserted small so that the check is tight)."""
    rows, V, S, T = 4, 6, 40000, 1.5
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(rows, V, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    t = torch.randn(rows, V, generator=g, dtype=torch.float64) * 1.5
    q = torch.softmax(s.detach() / T, -1)
    x = torch.multinomial(q, S, replacement=True, generator=g)  # (rows, S) from the student
    s_rep = s.repeat_interleave(S, 0)
    t_rep = t.repeat_interleave(S, 0)
    labels = x.reshape(-1)
    per_tok = per_token_divergence("token_rkl", s_rep, t_rep, temperature=T, targets=labels).view(rows, S)
    (grad_sum,) = torch.autograd.grad(per_tok.sum(), s)
    mc_value, mc_grad = per_tok.detach().mean(1), grad_sum / S

    exact = per_token_divergence("rkl", s, t, temperature=T)
    (exact_grad,) = torch.autograd.grad(exact.sum(), s)

    k = per_tok.detach()
    se_value = k.std(1) / math.sqrt(S)
    assert (se_value < 0.02).all(), se_value
    assert ((mc_value - exact.detach()).abs() <= 5 * se_value).all(), (mc_value, exact, se_value)
    # Per-sample gradient k * (onehot - q) / T, from the definition, for the element-wise SE.
    onehot = torch.nn.functional.one_hot(x, V).double()
    per_sample = k.unsqueeze(-1) * (onehot - q.unsqueeze(1)) / T  # (rows, S, V)
    torch.testing.assert_close(per_sample.mean(1), mc_grad)  # the library's gradient is this
    se_grad = per_sample.std(1) / math.sqrt(S)
    assert ((mc_grad - exact_grad).abs() <= 5 * se_grad + 1e-12).all()
    cosine = torch.nn.functional.cosine_similarity(mc_grad, exact_grad, dim=-1)
    assert (cosine > 0.99).all(), cosine


# --------------------------------------------------------------------------- chunked path
N, HS, HT, V = 37, 16, 24, 101


def _inputs(dtype=torch.float32, *, vs=V, vt=V, n=N, seed=0, bias=True, masked=0.3, label_vocab=None):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    d = dict(
        student_hidden=rnd(n, HS).requires_grad_(),
        student_head=rnd(vs, HS, scale=0.6).requires_grad_(),
        teacher_hidden=rnd(n, HT),
        teacher_head=rnd(vt, HT, scale=0.5),
        student_bias=rnd(vs, scale=0.5).requires_grad_() if bias else None,
        teacher_bias=rnd(vt, scale=0.5) if bias else None,
    )
    targets = torch.randint(0, label_vocab or min(vs, vt), (n,), generator=g)
    targets[torch.rand(n, generator=g) < masked] = -100
    targets[0] = 3
    d["targets"] = targets
    return d


def _params(d):
    return [p for p in (d["student_hidden"], d["student_head"], d["student_bias"]) if p is not None]


def _logits(hidden, head, bias, softcap=None):
    z = hidden @ head.T
    if bias is not None:
        z = z + bias
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def _plain(d, *, temperature=1.0, kd_weight=1.0, ce_weight=0.0, shared_vocab=None, student_softcap=None,
           teacher_softcap=None, **_):
    s = _logits(d["student_hidden"], d["student_head"], d["student_bias"], student_softcap)
    t = _logits(d["teacher_hidden"], d["teacher_head"], d["teacher_bias"], teacher_softcap)
    mask = d["targets"] != -100
    v = shared_vocab or min(s.shape[-1], t.shape[-1])
    kd, _ = logit_divergence("token_rkl", s[:, :v], t[:, :v], mask, temperature=temperature,
                             targets=d["targets"])
    total, terms = kd_weight * kd, {"kd": kd.detach()}
    if ce_weight > 0:
        ce, _ = cross_entropy(s, d["targets"])
        total, terms["ce"] = total + ce_weight * ce, ce.detach()
    return total, terms


def _chunked(d, **kw):
    return chunked_distill_loss(
        d["student_hidden"], d["student_head"], d["targets"], teacher_hidden=d["teacher_hidden"],
        teacher_head=d["teacher_head"], student_bias=d["student_bias"], teacher_bias=d["teacher_bias"],
        divergence="token_rkl", **kw)


def _compare_chunked(d, tol, grad_tol, **kw):
    out = _chunked(d, **kw)
    ref, ref_terms = _plain(d, **kw)
    assert out.weighted_sum.dtype == torch.float32
    assert int(out.n_valid) == int((d["targets"] != -100).sum())
    assert set(out.term_sums) == set(ref_terms)
    torch.testing.assert_close(out.weighted_sum, ref.detach().float(), rtol=tol, atol=tol)
    for key in ref_terms:
        torch.testing.assert_close(out.term_sums[key], ref_terms[key].float(), rtol=tol, atol=tol)
    got = torch.autograd.grad(out.weighted_sum, _params(d))
    want = torch.autograd.grad(ref, _params(d))
    for name, a, b in zip(("hidden", "head", "bias"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = b.float().abs().max().clamp_min(1e-6)
        err = ((a.float() - b.float()).abs().max() / scale).item()
        assert err <= grad_tol, f"grad {name}: max error {err:.2e} of max |grad| {scale:.2e}"
    return out


FP32 = (2e-5, 2e-5)
BF16 = (1e-2, 3e-2)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_chunked_equals_plain_fp32(temperature, ce_weight):
    d = _inputs(vs=V + 5, vt=V + 2)  # padded heads of different sizes; V = min by default
    _compare_chunked(d, *FP32, temperature=temperature, kd_weight=0.7, ce_weight=ce_weight, chunk_size=8)


def test_chunked_equals_plain_bf16():
    _compare_chunked(_inputs(torch.bfloat16), *BF16, kd_weight=1.0, ce_weight=0.5, chunk_size=10)


@pytest.mark.parametrize("ce_weight", [0.0, 0.4])
def test_chunked_shared_vocab_smaller_than_heads(ce_weight):
    sv = V - 11
    d = _inputs(vs=V + 7, vt=V + 3, label_vocab=sv)  # labels in the shared vocab
    _compare_chunked(d, *FP32, shared_vocab=sv, ce_weight=ce_weight, temperature=1.5, chunk_size=9)
    if ce_weight == 0:  # the student's rows beyond the shared vocab get exactly zero gradient
        d["student_head"].grad = None
        _chunked(d, shared_vocab=sv, chunk_size=9).weighted_sum.backward()
        assert torch.count_nonzero(d["student_head"].grad[sv:]) == 0


def test_chunked_softcap_and_no_bias():
    d = _inputs(bias=False)
    _compare_chunked(d, *FP32, student_softcap=3.0, teacher_softcap=5.0, ce_weight=0.2, temperature=1.5,
                     chunk_size=7)


@pytest.mark.parametrize("chunk_size", [1, N, None])
def test_chunked_chunk_sizes(chunk_size):
    _compare_chunked(_inputs(), *FP32, ce_weight=0.5, chunk_size=chunk_size)


def test_chunked_masked_rows_get_zero_gradient():
    d = _inputs(masked=0.0)
    d["targets"][5:25] = -100
    _compare_chunked(d, *FP32, ce_weight=0.5, chunk_size=5)
    d["student_hidden"].data[5:25] = float("nan")
    d["student_hidden"].grad = None
    out = _chunked(d, ce_weight=0.5, chunk_size=5)
    out.weighted_sum.backward()
    assert torch.isfinite(out.weighted_sum)
    assert torch.count_nonzero(d["student_hidden"].grad[5:25]) == 0


def test_chunked_stays_on_the_autograd_path():
    d = _inputs()
    spec = chunked_mod._Spec("token_rkl", 1.0, 0.5, 0.1, 1.0, 0.0, V, None, None, None, 512.0, None)
    assert not spec.closed_form
    with pytest.raises(ValueError, match="label id .* outside"):  # a label beyond the shared vocab
        _chunked({**d, "targets": torch.where(d["targets"] >= 0, V - 1, -100)}, shared_vocab=V - 1)


# --------------------------------------------------------------------------- fused logits
NF, VS, VT = 37, 109, 101


@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_fused_logit_loss_equals_plain(ce_weight, chunk_size):
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(NF, VS, generator=g, dtype=torch.float64) * 2).float().requires_grad_()
    t = (torch.randn(NF, VT, generator=g, dtype=torch.float64) * 2).float()
    targets = torch.randint(0, VT, (NF,), generator=g)
    targets[torch.rand(NF, generator=g) < 0.3] = -100
    mask = targets != -100
    kd, _ = logit_divergence("token_rkl", s[:, :VT], t, mask, temperature=1.7, targets=targets)
    ref = 0.9 * kd
    if ce_weight:
        ref = ref + ce_weight * cross_entropy(s, targets)[0]
    (g_ref,) = torch.autograd.grad(ref, s)
    out = fused_logit_loss(s, targets, t, divergence="token_rkl", temperature=1.7, kd_weight=0.9,
                           ce_weight=ce_weight, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(out.weighted_sum * 3.0, s)
    torch.testing.assert_close(out.weighted_sum, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.term_sums["kd"], kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, 3.0 * g_ref, rtol=1e-4, atol=1e-6)
    if not ce_weight:
        assert torch.count_nonzero(grad[:, VT:]) == 0
    assert torch.count_nonzero(grad[~mask]) == 0


# --------------------------------------------------------------------------- Objective
@pytest.mark.parametrize("loss", [
    {"logits": {"divergence": "token_rkl", "temperature": 1.5}},
    {"logits": {"divergence": "token_rkl", "temperature": 2.0, "t2_scaling": True, "weight": 0.6},
     "ce": {"weight": 0.4}},
])
def test_objective_plain_and_chunked_agree(loss):
    B, T, Vocab = 3, 9, 40
    g = torch.Generator().manual_seed(12)
    s_hidden = torch.randn(B, T, HS, generator=g, dtype=torch.float64).float().requires_grad_()
    s_head = HeadParams((torch.randn(Vocab, HS, generator=g) * 0.5).requires_grad_(), None, None)
    t_hidden = torch.randn(B, T, HT, generator=g)
    t_head = HeadParams(torch.randn(Vocab + 4, HT, generator=g) * 0.5, None, None)  # padded teacher
    labels = torch.randint(0, Vocab, (B, T), generator=g)
    labels[0, :5] = -100
    labels[2, 7:] = -100
    objective = Objective(LossConfig.model_validate(loss), shared_vocab=Vocab)
    s_logits = s_hidden @ s_head.weight.T
    t_logits = t_hidden @ t_head.weight.T
    plain = objective(s_logits, labels, t_logits)
    chunked = objective.fused(s_hidden, s_head, labels, t_hidden, t_head, chunk_size=4)
    kd, n = objective.kd_sum(s_logits, t_logits, labels)
    assert int(plain.n_valid) == int(chunked.n_valid) == int(n)
    torch.testing.assert_close(chunked.weighted_sum, plain.weighted_sum.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(plain.term_sums["kd"], kd.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(chunked.term_sums["kd"], kd.detach(), rtol=2e-5, atol=2e-5)
    params = [s_hidden, s_head.weight]
    want = torch.autograd.grad(plain.weighted_sum, params, retain_graph=True)
    got = torch.autograd.grad(chunked.weighted_sum, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # kd_sum's gradient is the same REINFORCE gradient the loss paths give (kd term only).
    if "ce" not in loss:
        (kd_grad,) = torch.autograd.grad(objective.kd_scale * kd, s_hidden)
        torch.testing.assert_close(kd_grad, want[0], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- refusals
def test_missing_targets_is_a_value_error():
    s, t, labels, mask = _data(seed=13)
    with pytest.raises(ValueError, match="targets"):
        per_token_divergence("token_rkl", s[mask], t[mask])
    with pytest.raises(ValueError, match="targets"):
        logit_divergence("token_rkl", s, t, mask)


def test_bad_targets_are_refused():
    s, t, labels, mask = _data(seed=14)
    with pytest.raises(ValueError, match="targets shape"):
        logit_divergence("token_rkl", s, t, mask, targets=labels[:, :-1])
    with pytest.raises(ValueError, match="targets shape"):
        per_token_divergence("token_rkl", s[mask], t[mask], targets=labels[mask][:-1])
    with pytest.raises(TypeError, match="integer"):
        per_token_divergence("token_rkl", s[mask], t[mask], targets=labels[mask].float())
    with pytest.raises(ValueError, match="label id -100 is outside"):  # ignored positions not masked
        logit_divergence("token_rkl", s, t, torch.ones_like(mask), targets=labels)
    with pytest.raises(ValueError, match="label id 9 is outside the 9 logit columns"):
        per_token_divergence("token_rkl", s[mask], t[mask], targets=torch.full_like(labels[mask], 9))


def test_other_divergences_ignore_targets():
    s, t, labels, mask = _data(seed=15)
    for name in _NAMES:
        if name == "token_rkl":
            continue
        params = {"cakld_confidence": 0.3} if name == "cakld" else None  # cakld's confidence is required
        a = logit_divergence(name, s, t, mask, temperature=1.3, params=params)[0]
        b = logit_divergence(name, s, t, mask, temperature=1.3, targets=labels, params=params)[0]
        assert torch.equal(a, b), name
        c = per_token_divergence(name, s[mask], t[mask], temperature=1.3, targets=labels[mask], params=params)
        torch.testing.assert_close(c.sum(), a)


def test_no_sparse_version():
    assert "token_rkl" in _NAMES and "token_rkl" not in SPARSE_DIVERGENCES
    for kind, missing_mass, what in (("topk", "rest", "a top-k teacher holds k log-probs"),
                                     ("topk", "renormalize", "renormalized top-k"),
                                     ("sampled", "rest", "sampled teacher tokens")):
        lc = LogitLossConfig(divergence="token_rkl", missing_mass=missing_mass)
        with pytest.raises(ConfigError, match=what) as err:
            check_sparse_loss(lc, kind=kind, where="cache.dir")
        message = str(err.value)
        assert "\n" not in message and "token_rkl" in message and "use fkl" in message
    # weight 0: no logit loss, nothing to refuse
    check_sparse_loss(LogitLossConfig(divergence="token_rkl", weight=0.0), kind="topk", where="x")
    s = torch.randn(4, 9)
    ids = torch.topk(torch.randn(4, 9), 3).indices
    with pytest.raises(ValueError, match="token_rkl needs the teacher's log-prob at the label token"):
        topk_divergence("token_rkl", s, ids, torch.log_softmax(torch.randn(4, 3), -1), torch.zeros(4))
