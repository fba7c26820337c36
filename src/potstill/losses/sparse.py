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
  bucket holding everything else; any of fkl / rkl / jsd on those k + 1 outcomes.

With k = V both equal the full-vocabulary losses exactly (tested).

Sampled ("Sparse Logit Sampling", random-sampling KD): with x_1..x_n ~ p (the teacher),
(1/n) Σ_j −log q(x_j) is an unbiased estimate of the cross-entropy H(p, q), so subtracting
the stored H(p) gives an unbiased estimate of KL(p ‖ q), and its gradient is the unbiased
gradient of the full forward KL. Only forward KL has such an estimator here.
"""

from __future__ import annotations

import torch

from .logits import LossOut, _check_temperature, _check_unit, _kl, _log_mix, _tempered

SPARSE_DIVERGENCES = ("fkl", "rkl", "jsd")
MISSING_MASS = ("rest", "renormalize")


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
) -> LossOut:
    """Sum over rows of the sparse divergence ``name`` (fkl | rkl | jsd) -> (loss_sum, n_valid).

    Shapes: student_logits (N, V), teacher_ids (N, K), teacher_logp (N, K), teacher_rest_logp (N,).
    The teacher side is renormalized with a log-softmax (over the K values, or the K + 1 values
    with the rest bucket), which also absorbs the error of quantized values.
    """
    if name not in SPARSE_DIVERGENCES:
        raise ValueError(f"sparse teacher targets support {', '.join(SPARSE_DIVERGENCES)}, not {name!r}")
    if missing_mass not in MISSING_MASS:
        raise ValueError(f"missing_mass must be one of {', '.join(MISSING_MASS)}, got {missing_mass!r}")
    _check_unit("beta", beta)
    _check_rows(student_logits, teacher_ids, teacher_logp)
    n_valid = torch.tensor(student_logits.shape[0], dtype=torch.int64)
    ls = _student_logp(student_logits, temperature)
    dtype = ls.dtype
    ids = teacher_ids.long()
    ls_k = ls.gather(-1, ids)                                          # (N, K)
    lt_k = teacher_logp.detach().to(dtype)
    if missing_mass == "renormalize":
        if name != "fkl":
            raise ValueError(f"{name} is not defined against a renormalized top-k teacher (it is 0 outside the "
                             "k ids): use missing_mass='rest'")
        lt = torch.log_softmax(lt_k, dim=-1)
        return _kl(lt, ls_k).sum(), n_valid
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
    else:
        lm = _log_mix(lp, lq, beta)
        per_row = beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
    return per_row.sum(), n_valid


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
