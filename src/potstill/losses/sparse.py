"""Sparse logit losses: the student against a teacher known only at a few token ids.

Inputs are the *valid rows only* (what ``logits[mask]`` gives, in row-major order):

* ``student_logits``: (N, V) float, any dtype; tempered and log-softmaxed here in fp32.
* top-k: ``teacher_ids`` (N, K) int64 (distinct ids per row), ``teacher_logp`` (N, K) the
  teacher's log-probabilities at those ids, already at the cache's temperature, and
  ``teacher_rest_logp`` (N,) the log of the mass outside them (needed for ``missing_mass="rest"``).
* sampled: ``sample_ids`` (N, n) int64, n draws *with replacement* from the teacher's
  distribution at the temperature, and ``teacher_entropy`` (N,) its entropy H(p).

Every function returns ``(loss_sum, n_valid)`` like :mod:`potstill.losses.logits`.

Top-k, two ways to handle the mass outside the k ids:

* ``renormalize``: the teacher's top-k probabilities renormalized to sum to 1 against the
  student's full-vocabulary distribution, KL(p̂ ‖ q) = Σ_k p̂_k (log p̂_k − log q_k). This is the
  common recipe (and the one "Sparse Logit Sampling", ACL 2025, finds biased: it pushes all
  the student's mass into the k ids). Only forward KL is defined (p̂ is 0 outside the ids).
* ``rest``: both distributions coarse-grained onto k + 1 outcomes, the k ids and one "rest"
  bucket holding everything else; fkl / rkl / jsd / soft_ce / cakld / akl on those k + 1
  outcomes (same formulas as :mod:`potstill.losses.logits`), hinge / logistic_ranking on the
  pairs of the k ids (``rank_k`` is ignored: the cache's k ids are the ranked set).
  ``renormalize`` supports fkl and soft_ce (-Σ_k p̂_k log q_k).

With k = V both equal the full-vocabulary losses exactly (tested). The other divergences need
what a top-k cache does not hold (the teacher's full distribution or logits): refused in one line.

Sampled ("Sparse Logit Sampling", random-sampling KD): with x_1..x_n ~ p (the teacher),
(1/n) Σ_j −log q(x_j) is an unbiased estimate of the cross-entropy H(p, q), so subtracting
the stored H(p) gives an unbiased estimate of KL(p ‖ q), and its gradient is the unbiased
gradient of the full forward KL. ``soft_ce`` (:func:`sampled_divergence`) is that
cross-entropy estimate itself, (1/n) Σ_j −log q(x_j), no entropy subtracted. No other
divergence has such an estimator here.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .logits import (
    LossOut,
    _akl,
    _check_name,
    _check_temperature,
    _check_unit,
    _kl,
    _log_mix,
    _soft_ce,
    _tempered,
    _weighted_kl,
    check_divergence_params,
    ranking_per_row,
)

# What a top-k teacher with the rest bucket supports; a renormalized one; a sampled one.
SPARSE_DIVERGENCES = ("fkl", "rkl", "jsd", "soft_ce", "cakld", "akl", "hinge", "logistic_ranking")
RENORMALIZED_DIVERGENCES = ("fkl", "soft_ce")
SAMPLED_DIVERGENCES = ("fkl", "soft_ce")
MISSING_MASS = ("rest", "renormalize")
_WHY_NOT_TOPK = {
    "tvd": "the teacher's full distribution", "skew_fkl": "the teacher's full distribution",
    "skew_rkl": "the teacher's full distribution", "soft_mse": "the teacher's full distribution",
    "sinkhorn": "the teacher's full distribution", "mse": "the teacher's logits",
    "cos": "the teacher's logits", "logsum": "the teacher's logits",
    "token_rkl": "the teacher's log-prob at the label token",
}


def check_sparse_divergence(name: str, kind: str, missing_mass: str = "rest") -> None:
    """Refuse, in one line, a divergence that a sparse teacher of ``kind`` ('topk' | 'sampled')
    with ``missing_mass`` cannot feed exactly."""
    _check_name(name)
    if kind == "sampled":
        if name not in SAMPLED_DIVERGENCES:
            raise ValueError(f"{name} is not defined for sampled teacher tokens (samples give an unbiased "
                             f"estimate of the cross-entropy only): use {' or '.join(SAMPLED_DIVERGENCES)}, or a "
                             "top-k or local teacher")
        return
    if kind != "topk":
        raise ValueError(f"sparse teacher kind must be 'topk' or 'sampled', got {kind!r}")
    if missing_mass not in MISSING_MASS:
        raise ValueError(f"missing_mass must be one of {', '.join(MISSING_MASS)}, got {missing_mass!r}")
    if missing_mass == "renormalize" and name not in RENORMALIZED_DIVERGENCES:
        raise ValueError(f"{name} is not defined against a renormalized top-k teacher (it is 0 outside the k ids): "
                         f"use {' or '.join(RENORMALIZED_DIVERGENCES)}, or missing_mass='rest'")
    if name not in SPARSE_DIVERGENCES:
        raise ValueError(f"{name} needs {_WHY_NOT_TOPK.get(name, 'more than k log-probs')}, and a top-k teacher holds k "
                         f"log-probs: use {', '.join(SPARSE_DIVERGENCES)}, or a local teacher")


def _student_logp(student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, V) -> (N, V) log-softmax of logits / T in float32 (float64 for float64 input)."""
    _check_temperature(temperature)
    return torch.log_softmax(_tempered(student_logits, temperature), dim=-1)


def _check_rows(student_logits: torch.Tensor, *others: torch.Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (N, V) valid rows, got shape {tuple(student_logits.shape)}")
    for t in others:
        if t.shape[0] != student_logits.shape[0]:
            raise ValueError(f"row count {t.shape[0]} != student rows {student_logits.shape[0]}")


def topk_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_rest_logp: torch.Tensor | None = None,
    *,
    missing_mass: str = "rest",
    temperature: float = 1.0,
    beta: float = 0.5,
    params: Optional[Mapping[str, Any]] = None,
) -> LossOut:
    """Sum over rows of the sparse divergence ``name`` (one of ``SPARSE_DIVERGENCES``; with
    ``renormalize``, fkl or soft_ce) -> (loss_sum, n_valid).

    Shapes: student_logits (N, V), teacher_ids (N, K), teacher_logp (N, K), teacher_rest_logp (N,).
    The teacher side is renormalized with a log-softmax (over the K values, or the K + 1 values
    with the rest bucket), which also absorbs the error of quantized values. ``params``: the
    divergence's own parameters, as for :func:`potstill.losses.logits.logit_divergence`.
    """
    per_row, n_valid = topk_per_row(name, student_logits, teacher_ids, teacher_logp, teacher_rest_logp,
                                    missing_mass=missing_mass, temperature=temperature, beta=beta, params=params)
    return per_row.sum(), n_valid


def topk_per_row(
    name: str,
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_rest_logp: torch.Tensor | None = None,
    *,
    missing_mass: str = "rest",
    temperature: float = 1.0,
    beta: float = 0.5,
    params: Optional[Mapping[str, Any]] = None,
) -> LossOut:
    """:func:`topk_divergence` per row: -> ((N,) values, n_valid)."""
    check_sparse_divergence(name, "topk", missing_mass)
    _check_unit("beta", beta)
    par = check_divergence_params(name, params)
    _check_rows(student_logits, teacher_ids, teacher_logp)
    n_valid = torch.tensor(student_logits.shape[0], dtype=torch.int64)
    ls = _student_logp(student_logits, temperature)
    dtype = ls.dtype
    ids = teacher_ids.long()
    ls_k = ls.gather(-1, ids)                                          # (N, K)
    lt_k = teacher_logp.detach().to(dtype)
    if missing_mass == "renormalize":
        lt = torch.log_softmax(lt_k, dim=-1)
        return (_soft_ce(lt, ls_k) if name == "soft_ce" else _kl(lt, ls_k)), n_valid
    if teacher_rest_logp is None:
        raise ValueError("missing_mass='rest' needs teacher_rest_logp")
    floor = torch.finfo(dtype).min
    # The student's mass outside the ids, in log space: the finite floor (not -inf) on the
    # gathered columns keeps logsumexp's gradient finite when the ids cover the whole vocab.
    ls_rest = ls.scatter(-1, ids, floor).logsumexp(-1, keepdim=True)  # (N, 1)
    lt_rest = teacher_rest_logp.detach().to(dtype).clamp_min(floor).unsqueeze(-1)
    lq = torch.cat([ls_k, ls_rest], dim=-1)                          # (N, K + 1)
    lp = torch.log_softmax(torch.cat([lt_k.clamp_min(floor), lt_rest], dim=-1), dim=-1)
    if name == "fkl" or (name == "jsd" and beta == 0.0):
        per_row = _kl(lp, lq)
    elif name == "rkl" or (name == "jsd" and beta == 1.0):
        per_row = _kl(lq, lp)
    elif name == "soft_ce":
        per_row = _soft_ce(lp, lq)
    elif name == "cakld":
        per_row = _weighted_kl(lp, lq, float(par["cakld_confidence"]))
    elif name == "akl":
        per_row = _akl(lp, lq, float(par["akl_head_mass"]))
    elif name in ("hinge", "logistic_ranking"):
        # The k ids' teacher probabilities on the k + 1 outcomes (the order of the cache's
        # log-probs); student log-prob differences equal tempered logit differences.
        per_row = ranking_per_row(name, lp[:, :-1].exp(), ls_k.exp(), ls_k, par["hinge_margin"])
    else:
        lm = _log_mix(lp, lq, beta)
        per_row = beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
    return per_row, n_valid


def sampled_forward_kl(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    teacher_entropy: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> LossOut:
    """Unbiased estimate of Σ_rows KL(p ‖ q) from n teacher samples per row -> (loss_sum, n_valid).

    Shapes: student_logits (N, V), sample_ids (N, n) with repeats (a token drawn c times
    weighs c / n), teacher_entropy (N,) = H(p) at the temperature.
    """
    _check_rows(student_logits, sample_ids, teacher_entropy)
    ls = _student_logp(student_logits, temperature)
    cross = -ls.gather(-1, sample_ids.long()).mean(-1)               # (N,) estimate of H(p, q)
    per_row = cross - teacher_entropy.detach().to(ls.dtype)
    return per_row.sum(), torch.tensor(student_logits.shape[0], dtype=torch.int64)


def sampled_divergence(
    name: str,
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    teacher_entropy: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    params: Optional[Mapping[str, Any]] = None,
) -> LossOut:
    """Unbiased estimate of Σ_rows ``name`` from n teacher samples per row -> (loss_sum, n_valid).

    ``fkl``: :func:`sampled_forward_kl` (needs ``teacher_entropy`` (N,)); ``soft_ce``: the
    cross-entropy estimate (1/n) Σ_j −log q(x_j) (no entropy needed). Shapes: student_logits
    (N, V), sample_ids (N, n). Any other name: a one-line ValueError.
    """
    check_sparse_divergence(name, "sampled")
    check_divergence_params(name, params)
    if name == "fkl":
        if teacher_entropy is None:
            raise ValueError("sampled fkl needs teacher_entropy (N,), the teacher's entropy at the temperature")
        return sampled_forward_kl(student_logits, sample_ids, teacher_entropy, temperature=temperature)
    _check_rows(student_logits, sample_ids)
    ls = _student_logp(student_logits, temperature)
    cross = -ls.gather(-1, sample_ids.long()).mean(-1)
    return cross.sum(), torch.tensor(student_logits.shape[0], dtype=torch.int64)
