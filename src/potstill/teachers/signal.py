"""What a teacher gives the objective for one micro-batch, whatever produced it.

A :class:`TeacherSignal` has one ``kind``, and the objective picks its loss form from it
(:meth:`potstill.training.objective.Objective.compute`):

``dense``   the teacher's whole distribution at every position: its final hidden states
            ``hidden`` (B, T, Ht) with its output ``head`` (the chunked loss path makes the
            logits a chunk at a time), or its ``logits`` (B, T, Vt) (the plain path).
``sparse``  a few numbers per valid position (:class:`SparseTargets`): the top-k ids with
            their log-probs and the log of the mass outside them, or k ids sampled from the
            teacher with its entropy. A teacher cache gives these; so will a served teacher.
``aligned`` a teacher with another tokenizer (:class:`AlignedTargets`): its top-k at the
            positions where its tokens and the student's start at the same character, with
            the ids translated into the student's vocabulary where they exist there.
``none``    no logit signal: the run trains on hard labels (and feature terms) only.

Any kind may carry ``activations``: the teacher's hidden states / q-k-v projections at the
layers that feature terms need (:class:`potstill.features.hooks.Captured`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ..errors import ConfigError
from ..features.hooks import Captured
from ..losses.sparse import SPARSE_DIVERGENCES, check_sparse_divergence
from ..models.heads import HeadParams

SignalKind = Literal["dense", "sparse", "aligned", "none"]


@dataclass
class SparseTargets:
    """Teacher log-probs at the R valid positions of a micro-batch.

    Rows are row-major over ``logits[:, :-1][labels[:, 1:] != -100]``: the same order in
    which the objective visits the student's valid positions.

    ``kind='topk'``: ``ids`` (R, k) int64 sorted by ``logp`` (R, k) float32 descending,
    ``rest`` (R,) the log of the teacher's mass outside those ids.
    ``kind='sampled'``: ``ids`` (R, k) drawn from the teacher (with repeats), ``entropy`` (R,).
    ``vocab`` is the number of logit columns the ids index (teacher and student share them).
    """

    kind: Literal["topk", "sampled"]
    ids: torch.Tensor
    vocab: int
    logp: Optional[torch.Tensor] = None
    rest: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "SparseTargets":
        move = (lambda t: None if t is None else t.to(device))
        return SparseTargets(self.kind, self.ids.to(device), self.vocab, move(self.logp), move(self.rest),
                             move(self.entropy))


@dataclass
class AlignedTargets:
    """A teacher with another tokenizer, at the A student positions aligned with one of its own.

    ``rows`` (A,) int64: indices into the student's valid rows (the order of
    ``logits[:, :-1][labels[:, 1:] != -100]``). ``ids`` (A, k) int64: the teacher's top-k ids
    translated to student ids, -1 where the teacher's token has no student twin; ``logp`` (A, k)
    float32 the teacher's log-probs at the temperature, sorted descending; ``rest`` (A,) the log of
    its mass outside the k; ``exact`` (A,) bool: the two tokens have the same span and bytes
    (:mod:`potstill.data.alignment`).
    """

    rows: torch.Tensor
    ids: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor
    exact: torch.Tensor

    def to(self, device: torch.device) -> "AlignedTargets":
        return AlignedTargets(*(t.to(device) for t in (self.rows, self.ids, self.logp, self.rest, self.exact)))


@dataclass
class TeacherSignal:
    """The teacher's signal for one micro-batch (see the module docstring for the kinds)."""

    kind: SignalKind
    hidden: Optional[torch.Tensor] = None       # dense, chunked path: (B, T, Ht) final hidden states
    head: Optional[HeadParams] = None           # dense, chunked path: the head that turns them into logits
    logits: Optional[torch.Tensor] = None       # dense, plain path: (B, T, Vt)
    sparse: Optional[SparseTargets] = None      # sparse: rows of the valid positions
    aligned: Optional[AlignedTargets] = None    # aligned: a teacher with another tokenizer
    activations: Optional[Captured] = None      # feature terms' layers, any kind

    @property
    def form(self) -> str:
        """``kind`` plus, for dense signals, which path it feeds: 'dense-hidden', 'dense-logits',
        'sparse' or 'none'."""
        if self.kind != "dense":
            return self.kind
        return "dense-hidden" if self.hidden is not None else "dense-logits"


def topk_rows(logits: torch.Tensor, *, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher's top-k rows: logits (R, V) -> ids (R, k') with k' = min(k, V), log-probs (R, k')
    at ``temperature`` sorted descending, and ``rest`` (R,) the log of the mass outside them,
    summed directly rather than as 1 - (top-k mass): no rounding noise, exactly -inf when k >= V.
    Computed in float32 at least (float64 logits stay float64)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return ids, values, logp.scatter(-1, ids, float("-inf")).logsumexp(-1)


def check_sparse_loss(lc, *, kind: str, where: str) -> None:
    """Refuse, in one line, a logit loss (``loss.logits`` config ``lc``) that a sparse teacher
    signal of ``kind`` ('topk' | 'sampled') from ``where`` cannot feed exactly."""
    if lc.weight <= 0:
        return
    try:
        check_sparse_divergence(lc.divergence, kind, lc.missing_mass if kind == "topk" else "rest")
    except ValueError as err:
        raise ConfigError(f"loss.logits.divergence={lc.divergence} with {where}: {err}") from None
    if lc.divergence == "cakld" and lc.cakld_confidence is None:
        raise ConfigError(f"loss.logits.divergence=cakld with {where}: the teacher's confidence cannot be measured "
                          "from k log-probs; set loss.logits.cakld_confidence (e.g. measured once with the local "
                          "teacher: it is in that run's summary.json)")


def sparse_chunked_problem(needs_logits: bool, divergence: str, source: str) -> str | None:
    """Why a sparse signal cannot feed the chunked (hidden-state) loss path, or None: that path has
    every sparse divergence (forward KL in closed form, the others by autograd per row block)."""
    if needs_logits and divergence not in SPARSE_DIVERGENCES:
        return f"{source} with loss.logits.divergence={divergence}: the sparse loss has no chunked form"
    return None
