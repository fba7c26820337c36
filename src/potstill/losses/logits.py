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
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

LossOut = Tuple[torch.Tensor, torch.Tensor]
_NAMES = ("fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "mse", "token_rkl")


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


def per_token_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Unmasked per-token divergence: logits (N, V) (or (..., V)) -> (N,) (or (...)).

    Building block for the masked losses and for a chunked path that feeds row
    slices. Result is float32 (float64 for float64 inputs); teacher is detached.
    ``beta`` is used by ``jsd`` and ``alpha`` by the skew losses; both are
    validated regardless, so config errors surface early. ``targets`` (N,) (or (...))
    integer label ids in ``[0, V)``: required by ``token_rkl`` (ValueError without them),
    ignored by every other divergence.
    """
    _check_name(name)
    _check_temperature(temperature)
    _check_unit("beta", beta)
    _check_unit("alpha", alpha)
    if name == "token_rkl":
        targets = _check_targets(targets, student_logits)
    zs = _tempered(student_logits, temperature)
    zt = _tempered(teacher_logits.detach(), temperature)
    if name == "mse":
        return (zs - zt).pow(2).mean(-1)
    ls = torch.log_softmax(zs, dim=-1)
    lt = torch.log_softmax(zt, dim=-1)
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
) -> LossOut:
    """Masked divergence ``name`` (one of ``DIVERGENCES`` or ``token_rkl``) -> (loss_sum, n_valid).

    Shapes: logits (..., V), mask (...) bool, ``targets`` (...) integer label ids (needed
    by ``token_rkl`` only; read at the valid positions). See the module docstring.
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
        targets=None if targets is None else targets[mask],
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


DIVERGENCES: Dict[str, Callable[..., LossOut]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "skew_fkl": skew_forward_kl,
    "skew_rkl": skew_reverse_kl,
    "mse": logit_mse,
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
