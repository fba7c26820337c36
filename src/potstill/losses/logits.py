"""Token-level logit distillation losses.

Every masked loss has the signature::

    fn(student_logits, teacher_logits, mask, *, temperature=1.0, **specific)
        -> (loss_sum, n_valid)

* ``student_logits`` / ``teacher_logits``: float tensors of identical shape
  ``(..., V)`` (typically ``(B, T, V)`` already shifted, or ``(N, V)``), any
  float dtype (bf16 included).
* ``mask``: bool tensor of the leading shape ``(...)``; True where the token
  counts.
* ``loss_sum``: 0-dim tensor, the *sum* of the per-token divergence over valid
  positions, differentiable w.r.t. ``student_logits``. It is float32 (float64
  only when the inputs are float64, so that ``gradcheck`` works).
* ``n_valid``: 0-dim int64 tensor, ``mask.sum()``.

Callers average (``loss_sum / n_valid``) after reducing across micro-batches /
ranks, which is why a sum and a count are returned instead of a mean.

Valid rows are gathered with boolean indexing *before* any math, so masked
positions contribute exactly zero loss and exactly zero gradient even when they
hold inf/NaN garbage (a multiply-by-mask would turn ``NaN * 0`` into NaN).
``teacher_logits`` is detached: the teacher never receives gradient.

Temperature divides student and teacher logits before the softmax (in
``_tempered`` only). The conventional ``T**2`` gradient-scale correction is NOT
applied here; the objective multiplies by it.

Conventions (p_t = teacher probs, p_s = student probs, both after temperature):

* ``fkl``: KL(p_t || p_s);  ``rkl``: KL(p_s || p_t).
* ``jsd`` (TRL ``GKDTrainer.generalized_jsd_loss`` / GKD paper Eq. 1):
  M = beta*p_t + (1-beta)*p_s,  JSD = beta*KL(p_t||M) + (1-beta)*KL(p_s||M);
  beta=0 is special-cased to fkl and beta=1 to rkl, exactly as TRL does. Note
  the interior tends to 0 at both ends (JSD ~ beta*fkl as beta->0 and
  ~ (1-beta)*rkl as beta->1), so it is continuous with the endpoints only after
  dividing by beta (resp. 1-beta); that is TRL's behaviour, kept on purpose.
* ``skew_fkl`` (DistiLLM, arXiv 2402.03898): KL(p_t || alpha*p_t + (1-alpha)*p_s).
  ``skew_rkl``: KL(p_s || alpha*p_s + (1-alpha)*p_t). DistiLLM's code computes
  skew-FKL as a cross-entropy (it omits the constant teacher entropy); here it is
  the true KL, so it is 0 at p_s == p_t. Gradients are identical. At ``alpha=1``
  skew-FKL is KL(p_t || p_t) == 0 for any student: the loss is an exact 0 still tied to
  the student's graph, so backward gives an all-zero gradient (skew-RKL at ``alpha=1`` is
  KL(p_s || p_s), also 0 with zero gradient).
* ``tvd``: 0.5 * sum |p_t - p_s|, in [0, 1].
* ``mse``: mean over the vocab of (z_s - z_t)^2 with z = logits / temperature.
* ``token_rkl``: the single-sample estimate of reverse KL on the label token x,
  k = log p_s(x) - log p_t(x), with a REINFORCE gradient: the per-token term is
  ``sg(k) * log p_s(x) - sg(k * log p_s(x)) + sg(k)`` (sg = stop-gradient), whose *value*
  is k (so logs show the reverse-KL estimate) and whose *gradient* w.r.t. the student
  logits is ``sg(k) * d log p_s(x) / d logits``. The "on-policy distillation" loss of
  Thinking Machines, "On-Policy Distillation" (2025), as a per-token penalty; on-policy
  training as in GKD (Agarwal et al., arXiv 2306.13649). It needs the label ids: pass
  ``targets`` (the only divergence that reads them; the others ignore them). It is an
  unbiased estimate of KL(p_s || p_t), value and gradient, ONLY when the labels were
  sampled from the student itself at the same temperature; on data tokens (or samples from
  any other policy or temperature) it is a different, biased objective, and a single
  token's value may be negative. Not in ``DIVERGENCES`` (whose functions take no labels):
  call it through ``logit_divergence`` / ``per_token_divergence``. No sparse (top-k teacher)
  version: a top-k teacher need not hold the label's log-prob.

More divergences, their parameters passed as one mapping ``params=`` (keys as in the config,
checked by :func:`check_divergence_params`; z = logits / T):

* ``soft_ce``: -sum_v p_t log p_s = fkl + H(p_t) (same gradient as fkl; not 0 at p_s == p_t).
  Distily's ``ce`` passes the *probabilities* as logits to ``F.cross_entropy`` (a softmax of
  probabilities); this is the textbook soft cross-entropy.
* ``soft_mse``: sum_v (p_s - p_t)^2, in [0, 2]. Distily's ``soft_mse`` is this divided by V
  (a mean over the vocab).
* ``cos``: 1 - cos(z_s, z_t) on the logit vectors; temperature does not change it (scale
  invariant).
* ``logsum`` (Miles & Mikolajczyk, arXiv 2303.11098, the LogSum loss; Distily ``logsum``):
  log(eps + sum_v |z_s - z_t|^a) - log eps, a = ``logsum_power`` (4.0), eps = 1e-6 fixed: the
  paper's log sum |d|^a up to a constant, 0 and finite at equal inputs. Computed as a logsumexp
  of a log|d| (and log eps), with d = 0 entries as exact -inf through ``torch.where``, so the
  gradient is finite (0 at d = 0) for any a > 0, a < 1 included.
* ``cakld`` (BitDistiller, arXiv 2402.10631): g * KL(p_s||p_t) + (1 - g) * KL(p_t||p_s),
  g = ``cakld_confidence`` (required, in [0, 1]; 0 is exactly fkl and 1 exactly rkl).
* ``akl`` (Adaptive KL, Wu et al., arXiv 2404.02657): sort p_t descending; the head is the
  smallest prefix whose teacher mass reaches ``akl_head_mass`` (0.5; at least the top token,
  ties by sort order); g_head / g_tail = sum |p_t - p_s| over head / tail (detached, as the
  authors' code); akl = g_head/(g_head+g_tail) * fkl + g_tail/(g_head+g_tail) * rkl (0.5/0.5
  when both are 0). The authors' code puts in the head the tokens whose *inclusive* cumulative
  mass is <= mu (so the token that crosses mu is tail); here it is head. At head mass 1 every
  token of nonzero teacher mass is head: akl == fkl. O(V log V) per row (the sort).
* ``hinge`` / ``logistic_ranking`` (DistillKit v1's ranking losses, there for a sparse top-k
  teacher only): on the teacher's top ``rank_k`` (16) ids, the ordered pairs (i, j) with
  p_t(i) > p_t(j): hinge = relu(m_ij - (p_s(i) - p_s(j))), m_ij = ``hinge_margin`` or, when
  None, p_t(i) - p_t(j); logistic = softplus(-(z_s(i) - z_s(j))). Per token the mean over its
  pairs (0 if none); DistillKit averages over all pairs of the batch instead. K x K per row.
* ``sinkhorn`` (SinKD, Cui et al. 2024; Distily ``sinkhorn``): a batch-wise entropic transport
  cost between the student's and the teacher's rows, in consecutive groups of
  ``sinkhorn_rows`` rows: see :mod:`potstill.losses.sinkhorn` (``sinkhorn_epsilon`` 0.1,
  ``sinkhorn_iterations`` 20, ``sinkhorn_rows`` 64). The only divergence whose per-token value
  depends on other rows: every path groups the same valid rows.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from potstill.losses.sinkhorn import sinkhorn_per_row

LossOut = Tuple[torch.Tensor, torch.Tensor]
_NAMES = ("fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "mse", "token_rkl",
          "soft_ce", "soft_mse", "cos", "logsum", "cakld", "akl", "hinge", "logistic_ranking", "sinkhorn")
# The divergences' own parameters (config names) and their defaults; None for cakld_confidence
# means "required".
PARAM_DEFAULTS: Dict[str, Any] = {
    "cakld_confidence": None, "akl_head_mass": 0.5, "rank_k": 16, "hinge_margin": None,
    "logsum_power": 4.0, "sinkhorn_epsilon": 0.1, "sinkhorn_iterations": 20, "sinkhorn_rows": 64,
}
LOGSUM_EPS = 1e-6


def _check_temperature(temperature: float) -> None:
    # `not t > 0` also rejects NaN.
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_name(name: str) -> None:
    if name not in _NAMES:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(_NAMES)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_divergence_params(name: str, params: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Validate the divergence parameters ``params`` for divergence ``name``; -> all of them,
    defaults filled in. The one check every loss path runs. Unknown keys, bad values, and a
    missing ``cakld_confidence`` for cakld raise a one-line ValueError."""
    given = dict(params or {})
    unknown = sorted(set(given) - set(PARAM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown divergence parameter(s) {', '.join(unknown)}; valid keys: "
                         f"{', '.join(PARAM_DEFAULTS)}")
    out = {**PARAM_DEFAULTS, **given}

    def bad(key: str, rule: str) -> ValueError:
        return ValueError(f"{key} must be {rule}, got {out[key]!r}")

    c = out["cakld_confidence"]
    if c is not None and not (_is_number(c) and 0.0 <= c <= 1.0):
        raise bad("cakld_confidence", "a number in [0, 1]")
    if name == "cakld" and c is None:
        raise ValueError("divergence 'cakld' needs params['cakld_confidence'] (the teacher's confidence, in [0, 1])")
    if not (_is_number(out["akl_head_mass"]) and 0.0 < out["akl_head_mass"] <= 1.0):
        raise bad("akl_head_mass", "a number in (0, 1]")
    if not (_is_int(out["rank_k"]) and out["rank_k"] >= 2):
        raise bad("rank_k", "an integer >= 2")
    m = out["hinge_margin"]
    if m is not None and not (_is_number(m) and 0.0 <= m < math.inf):
        raise bad("hinge_margin", "None or a finite number >= 0")
    if not (_is_number(out["logsum_power"]) and 0.0 < out["logsum_power"] < math.inf):
        raise bad("logsum_power", "a finite number > 0")
    if not (_is_number(out["sinkhorn_epsilon"]) and 0.0 < out["sinkhorn_epsilon"] < math.inf):
        raise bad("sinkhorn_epsilon", "> 0")
    if not (_is_int(out["sinkhorn_iterations"]) and out["sinkhorn_iterations"] >= 1):
        raise bad("sinkhorn_iterations", "an integer >= 1")
    if not (_is_int(out["sinkhorn_rows"]) and out["sinkhorn_rows"] >= 2):
        raise bad("sinkhorn_rows", "an integer >= 2")
    return out


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The single place temperature is applied. (..., V) -> (..., V) float32/64."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.to(dtype) / temperature


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probs (N, V) -> (N,).

    Entries with p == 0 (logit -inf, e.g. a padded vocab slot) contribute 0 by
    the 0*log0 convention. The log-ratio is zeroed *before* multiplying so that
    neither the forward (0 * -inf) nor the backward produces NaN.
    """
    p = logp.exp()
    log_ratio = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * log_ratio).sum(-1)


def _log_mix(loga: torch.Tensor, logb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w*a + (1-w)*b) from log-probs, computed in log space (logaddexp).

    w == 0 / w == 1 return the exact endpoint so that skew(alpha=0) equals plain KL
    bit-for-bit.
    """
    if w == 0.0:
        return logb
    if w == 1.0:
        return loga
    # logaddexp(-inf, -inf) has a NaN gradient; flooring at the dtype's min keeps
    # it finite (clamp passes zero gradient to the floored -inf entries).
    floor = torch.finfo(loga.dtype).min
    return torch.logaddexp(loga.clamp_min(floor) + math.log(w), logb.clamp_min(floor) + math.log1p(-w))


def _zero_anchor(z: torch.Tensor) -> torch.Tensor:
    """Zeros of shape ``z.shape[:-1]`` in the graph of ``z`` (..., V), gradient exactly zero.

    Sums an empty slice of the vocab dimension, so no element of ``z`` is read: the value
    is 0 and the gradient 0 whatever ``z`` holds (a ``0 * z`` would give NaN for inf).
    """
    return z[..., :0].sum(-1)


def _check_targets(targets: Optional[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """The label ids ``targets`` (...) for ``token_rkl``, checked against logits (..., V)."""
    if targets is None:
        raise ValueError("divergence 'token_rkl' needs the label ids: pass targets= (int64, the logits' "
                         "leading shape), e.g. the shifted labels at the valid positions")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal the logits' leading shape "
                         f"{tuple(logits.shape[:-1])} (logits shape {tuple(logits.shape)})")
    vocab = logits.shape[-1]
    bad = (targets < 0) | (targets >= vocab)
    if targets.numel() and bool(bad.any()):
        raise ValueError(f"token_rkl: label id {int(targets[bad][0])} is outside the {vocab} logit columns "
                         "the divergence sees (ignored positions must be masked out first; a label beyond "
                         "the shared vocab has no teacher log-prob)")
    return targets.long()


def _token_rkl(ls: torch.Tensor, lt: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token reverse-KL estimate on the label, REINFORCE gradient: (N, V) log-probs -> (N,).

    ``k = log p_s(x) - log p_t(x)``; returns ``sg(k) + sg(k) * (log p_s(x) - sg(log p_s(x)))``,
    i.e. the module docstring's ``sg(k) log p_s(x) - sg(k log p_s(x)) + sg(k)`` written so the
    value is exactly k (the bracket is an exact 0) and the gradient ``sg(k) * grad log p_s(x)``.
    """
    idx = targets.unsqueeze(-1)
    ls_x = ls.gather(-1, idx).squeeze(-1)
    lt_x = lt.gather(-1, idx).squeeze(-1)
    k = (ls_x - lt_x).detach()
    return k + k * (ls_x - ls_x.detach())


def _soft_ce(lt: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """-sum p_t log p_s per row from log-probs (N, V) -> (N,); p_t == 0 entries give 0."""
    p = lt.exp()
    return -(p * torch.where(p > 0, ls, torch.zeros_like(ls))).sum(-1)


def _cos(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """1 - cos(zs, zt) per row (N, V) -> (N,) (norms floored at 1e-12)."""
    tiny = 1e-12
    return 1.0 - ((zs / zs.norm(dim=-1, keepdim=True).clamp_min(tiny))
                  * (zt / zt.norm(dim=-1, keepdim=True).clamp_min(tiny))).sum(-1)


def _logsum(zs: torch.Tensor, zt: torch.Tensor, power: float) -> torch.Tensor:
    """log(eps + sum |zs - zt|^a) - log eps per row (N, V) -> (N,), eps = LOGSUM_EPS.

    As logsumexp([a log|d|, log eps]): d == 0 entries are an exact -inf through ``torch.where``
    (the log reads a safe 1 there), so neither the value nor the gradient (0 there) is NaN."""
    d = (zs - zt).abs()
    nonzero = d > 0
    log_d = torch.where(nonzero, torch.where(nonzero, d, torch.ones_like(d)).log() * power,
                        torch.full_like(d, -math.inf))
    log_eps = math.log(LOGSUM_EPS)
    both = torch.cat([log_d, torch.full_like(d[..., :1], log_eps)], dim=-1)
    return both.logsumexp(-1) - log_eps


def _weighted_kl(lt: torch.Tensor, ls: torch.Tensor, w_rkl) -> torch.Tensor:
    """w * KL(p_s||p_t) + (1 - w) * KL(p_t||p_s) (N, V) -> (N,); ``w`` a float or (N,) tensor.
    A float 0 / 1 gives exactly fkl / rkl."""
    if isinstance(w_rkl, float) and w_rkl == 0.0:
        return _kl(lt, ls)
    if isinstance(w_rkl, float) and w_rkl == 1.0:
        return _kl(ls, lt)
    return w_rkl * _kl(ls, lt) + (1.0 - w_rkl) * _kl(lt, ls)


def _akl(lt: torch.Tensor, ls: torch.Tensor, head_mass: float) -> torch.Tensor:
    """Adaptive KL per row from log-probs (N, V) -> (N,) (module docstring)."""
    pt = lt.detach().exp()
    ps = ls.detach().exp()
    pt_sorted, order = pt.sort(dim=-1, descending=True, stable=True)
    before = pt_sorted.cumsum(-1) - pt_sorted          # teacher mass of the tokens ranked above
    head = before < head_mass                          # smallest prefix reaching head_mass; top token always
    err = (pt_sorted - ps.gather(-1, order)).abs()
    g_head = torch.where(head, err, torch.zeros_like(err)).sum(-1)
    g_tail = torch.where(head, torch.zeros_like(err), err).sum(-1)
    total = g_head + g_tail
    w_head = torch.where(total > 0, g_head / torch.where(total > 0, total, torch.ones_like(total)),
                         torch.full_like(total, 0.5))
    return w_head * _kl(lt, ls) + (1.0 - w_head) * _kl(ls, lt)


def ranking_per_row(name: str, teacher_probs: torch.Tensor, student_probs: torch.Tensor,
                    student_z: torch.Tensor, margin: Optional[float]) -> torch.Tensor:
    """``hinge`` / ``logistic_ranking`` on K ids per row: teacher_probs, student_probs and the
    tempered student logits (or log-probs: only differences are used) at those ids, (N, K)
    each -> (N,): the mean over the ordered pairs with p_t(i) > p_t(j) (0 without pairs)."""
    pt = teacher_probs.detach()
    pairs = pt.unsqueeze(-1) > pt.unsqueeze(-2)                           # (N, K, K): i above j
    if name == "hinge":
        gap_s = student_probs.unsqueeze(-1) - student_probs.unsqueeze(-2)
        m = (pt.unsqueeze(-1) - pt.unsqueeze(-2)) if margin is None else margin
        term = torch.relu(m - gap_s)
    else:
        term = F.softplus(-(student_z.unsqueeze(-1) - student_z.unsqueeze(-2)))
    total = torch.where(pairs, term, torch.zeros_like(term)).sum((-2, -1))
    return total / pairs.sum((-2, -1)).clamp_min(1).to(total.dtype)


def _ranking(name: str, zs: torch.Tensor, zt: torch.Tensor, ls: torch.Tensor, lt: torch.Tensor,
             params: Dict[str, Any]) -> torch.Tensor:
    """Dense teacher: the pairs among the teacher's top min(rank_k, V) ids. (N, V) -> (N,)."""
    k = min(params["rank_k"], zt.shape[-1])
    ids = zt.topk(k, dim=-1).indices
    return ranking_per_row(name, lt.gather(-1, ids).exp(), ls.gather(-1, ids).exp(), zs.gather(-1, ids),
                           params["hinge_margin"])


def per_token_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    targets: Optional[torch.Tensor] = None,
    params: Optional[Mapping[str, Any]] = None,
) -> torch.Tensor:
    """Unmasked per-token divergence: logits (N, V) (or (..., V)) -> (N,) (or (...)).

    Building block for the masked losses and for a chunked path that feeds row
    slices. Result is float32 (float64 for float64 inputs); teacher is detached.
    ``beta`` is used by ``jsd`` and ``alpha`` by the skew losses; both are
    validated regardless, so config errors surface early. ``targets`` (N,) (or (...))
    integer label ids in ``[0, V)``: required by ``token_rkl`` (ValueError without them),
    ignored by every other divergence. ``params``: the new divergences' parameters (see
    :func:`check_divergence_params`; validated for every divergence). ``sinkhorn`` groups the
    rows of the flattened (N, V) input in consecutive groups of ``sinkhorn_rows``.
    """
    _check_name(name)
    _check_temperature(temperature)
    _check_unit("beta", beta)
    _check_unit("alpha", alpha)
    par = check_divergence_params(name, params)
    if name == "token_rkl":
        targets = _check_targets(targets, student_logits)
    zs = _tempered(student_logits, temperature)
    zt = _tempered(teacher_logits.detach(), temperature)
    if name == "mse":
        return (zs - zt).pow(2).mean(-1)
    if name == "cos":
        return _cos(zs, zt)
    if name == "logsum":
        return _logsum(zs, zt, float(par["logsum_power"]))
    ls = torch.log_softmax(zs, dim=-1)
    lt = torch.log_softmax(zt, dim=-1)
    if name == "soft_ce":
        return _soft_ce(lt, ls)
    if name == "soft_mse":
        return (ls.exp() - lt.exp()).pow(2).sum(-1)
    if name == "cakld":
        return _weighted_kl(lt, ls, float(par["cakld_confidence"]))
    if name == "akl":
        return _akl(lt, ls, float(par["akl_head_mass"]))
    if name in ("hinge", "logistic_ranking"):
        return _ranking(name, zs, zt, ls, lt, par)
    if name == "sinkhorn":
        v = zs.shape[-1]
        values = sinkhorn_per_row(ls.exp().reshape(-1, v), lt.exp().reshape(-1, v),
                                  epsilon=float(par["sinkhorn_epsilon"]),
                                  iterations=par["sinkhorn_iterations"], rows=par["sinkhorn_rows"])
        return values.reshape(zs.shape[:-1])
    if name == "token_rkl":
        return _token_rkl(ls, lt, targets)
    if name == "fkl":
        return _kl(lt, ls)
    if name == "rkl":
        return _kl(ls, lt)
    if name == "tvd":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    if name == "skew_fkl":
        if alpha == 1.0:
            # The mixture is p_t itself: KL(p_t || p_t) == 0 and nothing depends on the
            # student, so the result would have no grad_fn and backward would fail. Tie the
            # zero to the student's graph through an empty slice: its value is exactly 0 and
            # its gradient exactly zero, even for inf/NaN student logits.
            return _kl(lt, lt) + _zero_anchor(zs)
        return _kl(lt, _log_mix(lt, ls, alpha))
    if name == "skew_rkl":
        return _kl(ls, _log_mix(ls, lt, alpha))
    # jsd, TRL convention; endpoints special-cased like TRL (the interior
    # formula would give exactly 0 there, see module docstring).
    if beta == 0.0:
        return _kl(lt, ls)
    if beta == 1.0:
        return _kl(ls, lt)
    lm = _log_mix(lt, ls, beta)
    return beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)


def _check_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> None:
    if student_logits.dim() < 1:
        raise ValueError("logits need a trailing vocab dimension, got a 0-dim tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} != "
            f"teacher_logits shape {tuple(teacher_logits.shape)}"
        )
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise TypeError("student_logits and teacher_logits must be floating point tensors")
    if mask.dtype != torch.bool:
        # A long mask would silently be used as gather indices by `x[mask]`.
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])} (logits shape {tuple(student_logits.shape)})"
        )


def logit_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    targets: Optional[torch.Tensor] = None,
    params: Optional[Mapping[str, Any]] = None,
) -> LossOut:
    """Masked divergence ``name`` (one of ``DIVERGENCES`` or ``token_rkl``) -> (loss_sum, n_valid).

    Shapes: logits (..., V), mask (...) bool, ``targets`` (...) integer label ids (needed
    by ``token_rkl`` only; read at the valid positions). ``params``: the divergence's own
    parameters (:func:`check_divergence_params`). ``sinkhorn`` groups the valid rows in
    row-major order. See the module docstring.
    """
    _check_name(name)
    _check_shapes(student_logits, teacher_logits, mask)
    if targets is not None and targets.shape != mask.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal the mask shape {tuple(mask.shape)}")
    # Index selection (not multiply-by-mask): garbage rows never enter the math,
    # and the backward of indexing scatters exact zeros to them.
    per_token = per_token_divergence(
        name, student_logits[mask], teacher_logits[mask],
        temperature=temperature, beta=beta, alpha=alpha,
        targets=None if targets is None else targets[mask], params=params,
    )
    return per_token.sum(), mask.sum()


def forward_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0) -> LossOut:
    """Sum over valid tokens of KL(p_t || p_s). Logits (..., V), mask (...)."""
    return logit_divergence("fkl", student_logits, teacher_logits, mask, temperature=temperature)


def reverse_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0) -> LossOut:
    """Sum over valid tokens of KL(p_s || p_t). Logits (..., V), mask (...)."""
    return logit_divergence("rkl", student_logits, teacher_logits, mask, temperature=temperature)


def generalized_jsd(student_logits, teacher_logits, mask, *, temperature: float = 1.0, beta: float = 0.5) -> LossOut:
    """TRL/GKD generalized JSD, beta in [0, 1] (0 -> fkl, 1 -> rkl). Logits (..., V)."""
    return logit_divergence("jsd", student_logits, teacher_logits, mask, temperature=temperature, beta=beta)


def total_variation(student_logits, teacher_logits, mask, *, temperature: float = 1.0) -> LossOut:
    """Sum over valid tokens of 0.5 * sum_v |p_t - p_s|. Logits (..., V)."""
    return logit_divergence("tvd", student_logits, teacher_logits, mask, temperature=temperature)


def skew_forward_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0, alpha: float = 0.1) -> LossOut:
    """DistiLLM skew KL: KL(p_t || alpha*p_t + (1-alpha)*p_s). Logits (..., V)."""
    return logit_divergence("skew_fkl", student_logits, teacher_logits, mask, temperature=temperature, alpha=alpha)


def skew_reverse_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0, alpha: float = 0.1) -> LossOut:
    """DistiLLM skew reverse KL: KL(p_s || alpha*p_s + (1-alpha)*p_t). Logits (..., V)."""
    return logit_divergence("skew_rkl", student_logits, teacher_logits, mask, temperature=temperature, alpha=alpha)


def logit_mse(student_logits, teacher_logits, mask, *, temperature: float = 1.0) -> LossOut:
    """Sum over valid tokens of mean_v (z_s - z_t)^2, z = logits / T. Logits (..., V)."""
    return logit_divergence("mse", student_logits, teacher_logits, mask, temperature=temperature)


def soft_cross_entropy(student_logits, teacher_logits, mask, *, temperature: float = 1.0, params=None) -> LossOut:
    """Sum over valid tokens of -sum_v p_t log p_s (= fkl + H(p_t)). Logits (..., V)."""
    return logit_divergence("soft_ce", student_logits, teacher_logits, mask, temperature=temperature, params=params)


def soft_mse(student_logits, teacher_logits, mask, *, temperature: float = 1.0, params=None) -> LossOut:
    """Sum over valid tokens of sum_v (p_s - p_t)^2. Logits (..., V)."""
    return logit_divergence("soft_mse", student_logits, teacher_logits, mask, temperature=temperature, params=params)


def cosine_divergence(student_logits, teacher_logits, mask, *, temperature: float = 1.0, params=None) -> LossOut:
    """Sum over valid tokens of 1 - cos(z_s, z_t). Logits (..., V)."""
    return logit_divergence("cos", student_logits, teacher_logits, mask, temperature=temperature, params=params)


def logsum_divergence(student_logits, teacher_logits, mask, *, temperature: float = 1.0, params=None) -> LossOut:
    """Sum over valid tokens of log(eps + sum_v |z_s - z_t|^a) - log eps (params: logsum_power)."""
    return logit_divergence("logsum", student_logits, teacher_logits, mask, temperature=temperature, params=params)


def cakld_divergence(student_logits, teacher_logits, mask, *, temperature: float = 1.0, params=None) -> LossOut:
    """BitDistiller CAKLD: g*rkl + (1-g)*fkl, g = params['cakld_confidence'] (required). Logits (..., V)."""
    return logit_divergence("cakld", student_logits, teacher_logits, mask, temperature=temperature, params=params)


def adaptive_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0, params=None) -> LossOut:
    """Adaptive KL (head/tail-weighted fkl + rkl; params: akl_head_mass). Logits (..., V)."""
    return logit_divergence("akl", student_logits, teacher_logits, mask, temperature=temperature, params=params)


def hinge_ranking(student_logits, teacher_logits, mask, *, temperature: float = 1.0, params=None) -> LossOut:
    """Pairwise hinge ranking on the teacher's top rank_k ids (params: rank_k, hinge_margin)."""
    return logit_divergence("hinge", student_logits, teacher_logits, mask, temperature=temperature, params=params)


def logistic_ranking(student_logits, teacher_logits, mask, *, temperature: float = 1.0, params=None) -> LossOut:
    """Pairwise logistic ranking on the teacher's top rank_k ids (params: rank_k)."""
    return logit_divergence("logistic_ranking", student_logits, teacher_logits, mask, temperature=temperature,
                            params=params)


def sinkhorn_distance(student_logits, teacher_logits, mask, *, temperature: float = 1.0, params=None) -> LossOut:
    """SinKD batch-wise Sinkhorn distance over groups of valid rows (params: sinkhorn_*)."""
    return logit_divergence("sinkhorn", student_logits, teacher_logits, mask, temperature=temperature, params=params)


DIVERGENCES: Dict[str, Callable[..., LossOut]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "skew_fkl": skew_forward_kl,
    "skew_rkl": skew_reverse_kl,
    "mse": logit_mse,
    "soft_ce": soft_cross_entropy,
    "soft_mse": soft_mse,
    "cos": cosine_divergence,
    "logsum": logsum_divergence,
    "cakld": cakld_divergence,
    "akl": adaptive_kl,
    "hinge": hinge_ranking,
    "logistic_ranking": logistic_ranking,
    "sinkhorn": sinkhorn_distance,
}


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> LossOut:
    """Hard-label CE summed over tokens with ``labels != ignore_index``.

    Shapes: student_logits (..., V) float, labels (...) integer. No temperature.
    Returns (loss_sum float32/64 0-dim, n_valid int64 0-dim).
    """
    if student_logits.dim() < 1 or labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading shape "
            f"(logits shape {tuple(student_logits.shape)})"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    valid = labels != ignore_index
    # Select rows first so ignored positions (possibly garbage) get zero gradient.
    logp = torch.log_softmax(_tempered(student_logits[valid], 1.0), dim=-1)
    nll = -logp.gather(-1, labels[valid].long().unsqueeze(-1)).squeeze(-1)
    return nll.sum(), valid.sum()
