"""Cross-tokenizer logit losses: a student and a teacher with different vocabularies.

When teacher and student tokenize the text differently, their next-token distributions live
on different outcome spaces and no KL between them is defined as is. The rows (valid
positions, student side) are split in two kinds by an upstream alignment step:

* **exact rows**: both tokenizers put a token boundary at the same place in the text, and
  the teacher's top-k tokens have been translated to student ids through a vocabulary map
  (-1 where a teacher token has no student counterpart). There both distributions are
  coarse-grained onto the same finite outcome space, the mapped ids plus one "rest" bucket,
  and any of fkl / rkl / jsd is computed on it (:func:`mapped_topk_divergence`):

  - teacher: its log-prob at each mapped id; its mass at unmapped ids and outside its top-k
    (``teacher_rest_logp``) both go into the bucket;
  - student: its log-prob at each mapped id; everything else it predicts goes into the bucket.

  Coarse-graining never increases a divergence (data processing inequality), so this is a
  lower bound of the divergence on the finer space, and with identical vocabularies, the
  identity map and k = V it is the full-vocabulary loss exactly (tested).

* **other rows** (boundaries disagree, or no map at all): the Universal Logit Distillation
  loss (ULD, Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss for LLMs", arXiv 2402.12030) compares the two distributions without any
  correspondence between ids: the Wasserstein-1 distance in its closed form for this setting,
  Σ_i |sort(p_s)_i − sort(p_t)_i|, both sorted descending and the shorter one zero-padded
  (:func:`uld_distance`). It is 0 iff one distribution is a permutation of the other.

:func:`aligned_divergence` dispatches rows by the ``exact`` flag (``mode="hybrid"``), or uses
only the exact rows (``"exact"``) or ULD on every row (``"uld"``).

Inputs are the *valid rows only* (``logits[mask]``), as in :mod:`potstill.losses.sparse`:

* ``student_logits``: (R, V) float, any dtype; tempered and softmaxed here in float32
  (float64 for float64 input) through :func:`potstill.losses.logits._tempered`.
* ``teacher_ids``: (R, K) int64 student ids (or -1), for exact rows.
* ``teacher_logp``: (R, K) the teacher's log-probs at its top-k tokens, already at the
  temperature (as a top-k cache stores them); for ULD, its K largest log-probs.
* ``teacher_rest_logp``: (R,) log of the teacher's mass outside its top-k (``-inf`` when the
  top-k is its whole vocabulary).

Every function returns sums over rows and a row count (``LossOut`` convention); the caller
normalizes. The teacher is always detached.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .logits import LossOut, _check_temperature, _check_unit, _tempered
from .sparse import topk_divergence

# The divergences defined on the mapped top-k outcomes (the others need parameters or full rows).
ALIGNED_DIVERGENCES = ("fkl", "rkl", "jsd")

ALIGNED_MODES = ("hybrid", "exact", "uld")
UNMAPPED = -1


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, float32 otherwise: the same rule as ``_tempered``."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_student(student_logits: torch.Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (R, V) valid rows, got shape {tuple(student_logits.shape)}")
    if not student_logits.is_floating_point():
        raise TypeError(f"student_logits must be floating point, got dtype {student_logits.dtype}")


def _check_teacher(student_logits: torch.Tensor, teacher_logp: torch.Tensor,
                   teacher_rest_logp: torch.Tensor) -> None:
    rows = student_logits.shape[0]
    if teacher_logp.dim() != 2 or teacher_logp.shape[0] != rows:
        raise ValueError(f"teacher_logp must be (R, K) with R = {rows} student rows, "
                         f"got shape {tuple(teacher_logp.shape)}")
    if tuple(teacher_rest_logp.shape) != (rows,):
        raise ValueError(f"teacher_rest_logp must be (R,) = ({rows},), got shape {tuple(teacher_rest_logp.shape)}")


def _check_arguments(name: str, what: str, student_logits: torch.Tensor, teacher_logp: torch.Tensor,
                     teacher_rest_logp: torch.Tensor, *, temperature: float, beta: float) -> None:
    """The divergence name (for ``what``), temperature, beta and the shapes of both sides."""
    if name not in ALIGNED_DIVERGENCES:
        raise ValueError(f"{what} support {', '.join(ALIGNED_DIVERGENCES)}, not {name!r}")
    _check_temperature(temperature)
    _check_unit("beta", beta)
    _check_student(student_logits)
    _check_teacher(student_logits, teacher_logp, teacher_rest_logp)


def _check_ids(teacher_ids: torch.Tensor, teacher_logp: torch.Tensor, vocab: int) -> torch.Tensor:
    """Validated (R, K) int64 ids: each -1 or a student id in [0, V), the mapped ones distinct per row."""
    if teacher_ids.is_floating_point() or teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor, got dtype {teacher_ids.dtype}")
    if teacher_ids.shape != teacher_logp.shape:
        raise ValueError(f"teacher_ids shape {tuple(teacher_ids.shape)} must equal teacher_logp shape "
                         f"{tuple(teacher_logp.shape)}")
    ids = teacher_ids.long()
    if ids.numel() == 0:
        return ids
    # One host sync, worth it: an id == V would silently hit the dummy column below, and a
    # repeated id would count the student's mass at it twice (q would sum to more than 1).
    out_of_range = (ids < UNMAPPED) | (ids >= vocab)
    ordered = ids.sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != UNMAPPED)
    if bool(out_of_range.any() | repeated.any()):
        if bool(out_of_range.any()):
            raise ValueError(f"teacher_ids holds {int(ids[out_of_range][0])}: ids must be -1 (no student "
                             f"counterpart) or a student id in [0, {vocab})")
        raise ValueError("teacher_ids repeats a student id within a row: merge teacher tokens that map to the "
                         "same student id (log-sum-exp their log-probs) or mark the extra ones -1")
    return ids


def mapped_topk_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_rest_logp: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> LossOut:
    """Sum over exact rows of ``name`` (fkl | rkl | jsd) on mapped ids + one bucket -> (loss_sum, n_valid).

    Shapes: student_logits (R, V), teacher_ids (R, K) int64 student ids or -1 (unmapped; the
    mapped ids distinct within a row), teacher_logp (R, K) at the temperature, teacher_rest_logp (R,).

    Teacher: mapped ids keep their log-prob; the mass at -1 entries joins ``teacher_rest_logp``
    in the bucket (log-sum-exp). Student: its log-prob at the mapped ids, the rest of its mass in
    the bucket. Conventions (fkl = KL(p_t ‖ p_s), TRL's jsd with ``beta``) as in
    :mod:`potstill.losses.logits`; the teacher side is renormalized like ``topk_divergence``.
    """
    _check_arguments(name, "mapped top-k targets", student_logits, teacher_logp, teacher_rest_logp,
                     temperature=temperature, beta=beta)
    rows, vocab = student_logits.shape
    ids = _check_ids(teacher_ids, teacher_logp, vocab)
    dtype = _work_dtype(student_logits)
    floor = torch.finfo(dtype).min
    unmapped = ids == UNMAPPED

    # Rows keep a fixed K (no ragged per-row id lists): every -1 is pointed at ONE extra
    # student column V whose logit is so negative that its probability is exactly 0 after
    # the softmax, so it adds nothing to the student's bucket, and its gathered log-prob is
    # paired with a teacher log-prob at the floor, i.e. teacher mass 0, so the term is 0
    # (``_kl`` zeroes p == 0 entries, value and gradient). Several -1 in a row give duplicate
    # ids V: each duplicate is such a zero-mass outcome and ``topk_divergence``'s scatter
    # writes the same floor for all of them, so duplicates of the dummy column are harmless.
    # The value stays finite after division by the temperature (T < 1 multiplies it), so no
    # inf - inf appears anywhere; the factor 1/2 leaves room for the log-softmax shift.
    dummy = floor / 2 * min(temperature, 1.0)
    logits = student_logits.to(dtype)
    logits = torch.cat([logits, logits.new_full((rows, 1), dummy)], dim=-1)      # (R, V + 1)
    ids = torch.where(unmapped, torch.full_like(ids, vocab), ids)

    lt = teacher_logp.detach().to(dtype).clamp_min(floor)
    # Unmapped teacher mass moves into the bucket: log(rest + Σ_unmapped p_t).
    lt_unmapped = lt.masked_fill(~unmapped, floor)
    lt_rest = torch.cat([lt_unmapped, teacher_rest_logp.detach().to(dtype).clamp_min(floor).unsqueeze(-1)], -1)
    lt_rest = lt_rest.logsumexp(-1)                                                # (R,)
    lt = lt.masked_fill(unmapped, floor)
    return topk_divergence(name, logits, ids, lt, lt_rest, missing_mass="rest",
                           temperature=temperature, beta=beta)


def uld_distance(
    student_logits: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_rest_logp: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> LossOut:
    """Sum over rows of the ULD (sorted Wasserstein-1) distance -> (loss_sum, n_valid).

    Shapes: student_logits (R, Vs); teacher_logp (R, K), the teacher's K largest log-probs
    (sorted here, any order accepted), already at the temperature; teacher_rest_logp (R,) the
    log of its remaining mass. Temperature divides the student logits (``_tempered``).

    Per row, with k = min(K, Vs) and both sides sorted descending::

        Σ_{i<k} |p_s(i) − p_t(i)|  +  Σ_{k≤i<K} p_t(i)  +  |S_s − r_t|

    where S_s is the student's mass outside its top-k and r_t = exp(teacher_rest_logp). The
    middle term pairs teacher entries with the student's zero padding (K > Vs). The last term
    stands for the tail Σ_{i≥K} |p_s(i) − p_t(i)|, whose teacher entries are unknown:

    * exact when r_t = 0 (the top-K is the teacher's whole support, e.g. K = its vocab: the
      remaining teacher entries are 0 and the tail is Σ p_s = S_s), or when K ≥ Vs (the
      student's tail is its zero padding and the tail is Σ p_t = r_t); then this is the full
      closed form;
    * otherwise the top-K approximation: by the triangle inequality |S_s − r_t| ≤ the exact
      tail, so the result is a lower bound of the full ULD distance.

    Probabilities in float32 (float64 for float64 input); differentiable through the values
    of ``torch.topk`` (ties get a subgradient, as with any sort).
    """
    _check_temperature(temperature)
    _check_student(student_logits)
    _check_teacher(student_logits, teacher_logp, teacher_rest_logp)
    n_valid = torch.tensor(student_logits.shape[0], dtype=torch.int64)
    ps = torch.softmax(_tempered(student_logits, temperature), dim=-1)              # (R, Vs)
    dtype = ps.dtype
    k = min(teacher_logp.shape[-1], ps.shape[-1])
    # Sorting the (detached, small) teacher side makes the closed form hold for any order.
    pt = teacher_logp.detach().to(dtype).exp().sort(dim=-1, descending=True).values  # (R, K)
    ps_top, top_idx = ps.topk(k, dim=-1)                                           # (R, k), sorted
    head = (ps_top - pt[:, :k]).abs().sum(-1)
    padded = pt[:, k:].sum(-1)                     # teacher entries against the student's padding
    # The student's tail summed from its entries (not 1 - Σ top): exactly 0, with a zero
    # gradient through |.|, when its top-k is its whole vocab.
    ps_tail = ps.scatter(-1, top_idx, 0.0).sum(-1)
    tail = (ps_tail - teacher_rest_logp.detach().to(dtype).exp()).abs()
    return (head + padded + tail).sum(), n_valid


def _empty_sum(student_logits: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero in the student's graph (working dtype) with an exactly-zero gradient.

    Sums an empty row slice, so no element is read: unlike ``0 * logits.sum()`` it stays 0
    (and its gradient 0) when the logits hold inf/NaN.
    """
    return _tempered(student_logits[:0], 1.0).sum()


def aligned_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_rest_logp: torch.Tensor,
    exact: torch.Tensor,
    *,
    mode: str = "hybrid",
    temperature: float = 1.0,
    beta: float = 0.5,
    exact_weight: float = 1.0,
    uld_weight: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Cross-tokenizer loss over R rows -> (loss_sum, n_rows, {"exact": ..., "uld": ...}).

    Shapes: student_logits (R, V), teacher_ids (R, K) (read on exact rows only), teacher_logp
    (R, K), teacher_rest_logp (R,), exact (R,) bool. ``mode``:

    * ``"hybrid"``: exact rows -> :func:`mapped_topk_divergence` (``name``, ``beta``), the
      other rows -> :func:`uld_distance`; n_rows = R.
    * ``"exact"``: exact rows only, the others contribute nothing (no value, no gradient);
      n_rows = number of exact rows, the rows that have a term.
    * ``"uld"``: :func:`uld_distance` on every row; n_rows = R.

    loss_sum = exact_weight * exact_sum + uld_weight * uld_sum. The dict holds the two
    unweighted sums, detached, for logging (0 for a kind with no rows or not used by ``mode``).
    A kind with no rows adds a zero that stays in the graph, so backward always works.
    """
    if mode not in ALIGNED_MODES:
        raise ValueError(f"mode must be one of {', '.join(ALIGNED_MODES)}, got {mode!r}")
    for label, weight in (("exact_weight", exact_weight), ("uld_weight", uld_weight)):
        # `not w >= 0` also rejects NaN.
        if not weight >= 0:
            raise ValueError(f"{label} must be >= 0, got {weight!r}")
    _check_arguments(name, "aligned exact rows", student_logits, teacher_logp, teacher_rest_logp,
                     temperature=temperature, beta=beta)
    rows = student_logits.shape[0]
    if teacher_ids.shape != teacher_logp.shape:
        raise ValueError(f"teacher_ids shape {tuple(teacher_ids.shape)} must equal teacher_logp shape "
                         f"{tuple(teacher_logp.shape)}")
    if exact.dtype != torch.bool:
        # A long tensor would silently be used as row indices by `x[exact]`.
        raise TypeError(f"exact must be a bool tensor, got dtype {exact.dtype}")
    if tuple(exact.shape) != (rows,):
        raise ValueError(f"exact must be (R,) = ({rows},), got shape {tuple(exact.shape)}")

    zero = _empty_sum(student_logits)
    exact_sum, uld_sum = zero, zero
    n_rows = torch.tensor(rows, dtype=torch.int64)
    if mode in ("hybrid", "exact"):
        # Row selection by indexing (not multiply-by-mask): rows of the other kind never
        # enter this math and get exactly zero gradient from it.
        s = student_logits[exact]
        if mode == "exact":
            n_rows = torch.tensor(s.shape[0], dtype=torch.int64)
        if s.shape[0]:
            exact_sum, _ = mapped_topk_divergence(
                name, s, teacher_ids[exact], teacher_logp[exact], teacher_rest_logp[exact],
                temperature=temperature, beta=beta)
    if mode == "uld":
        uld_sum, _ = uld_distance(student_logits, teacher_logp, teacher_rest_logp, temperature=temperature)
    elif mode == "hybrid":
        other = ~exact
        s = student_logits[other]
        if s.shape[0]:
            uld_sum, _ = uld_distance(s, teacher_logp[other], teacher_rest_logp[other], temperature=temperature)
    loss = exact_weight * exact_sum + uld_weight * uld_sum
    return loss, n_rows, {"exact": exact_sum.detach(), "uld": uld_sum.detach()}
