"""The training objective: a weighted sum of loss terms, normalized in exactly one place.

:meth:`Objective.compute` takes what the student's forward gave (:class:`StudentOutput`:
final hidden states + head on the chunked path, logits on the plain path) and the teacher's
:class:`~potstill.teachers.signal.TeacherSignal`, and picks the loss form from the two:

    student | teacher    dense                      sparse (top-k / sampled)    aligned                none
    hidden + head        chunked_distill_loss       sparse_chunked_loss         aligned_divergence     chunked CE
    logits               fused_logit_loss           topk / sampled divergence   aligned_divergence     fused CE

(``aligned``: a teacher with another tokenizer, compared at the aligned rows only; the hidden
path makes the student's logits for those rows a block at a time, recomputed in backward.)

then adds the feature terms (hidden states, attention relations) when the run has them.

One shift, one mask: ``logits[:, :-1]`` predicts ``labels[:, 1:]``; positions whose label
is -100 (padding, non-assistant chat tokens) do not count.

Normalization: every term returns a *sum* over valid tokens. The trainer counts the valid
tokens of all micro-batches of an optimizer step on all processes first, and each
micro-batch's loss is ``weighted_sum / n_valid_step * world_size`` (DDP averages
gradients over processes). So gradient accumulation and multi-process training give the
same gradient as one big batch, however the tokens fall (the bug TRL issue 4719 fixed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..config import LossConfig
from ..data.batching import MicroBatch
from ..features.distiller import FeatureDistiller
from ..features.hooks import Captured
from ..losses import chunked_distill_loss, cross_entropy, logit_divergence
from ..losses.aligned import aligned_divergence
from ..losses.chunked import DEFAULT_MEMORY_BUDGET_MB
from ..losses.fused_logits import fused_logit_loss
from ..losses.sparse import sampled_divergence, topk_divergence
from ..losses.sparse_chunked import sparse_chunked_loss
from ..models.heads import HeadParams
from ..teachers.signal import SparseTargets, TeacherSignal

IGNORE_INDEX = -100
ALIGNED_COPIES = 12  # float32 (rows, V) tensors one block of the aligned loss holds at its peak


@dataclass
class ObjectiveOutput:
    """Sums over the valid tokens of one micro-batch.

    ``weighted_sum``: the differentiable total (weights and T^2 applied, not normalized).
    ``term_sums``: each term's raw sum, detached, for logging (divide by ``n_valid``).
    """

    weighted_sum: torch.Tensor
    n_valid: torch.Tensor
    term_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    # The differentiable, weighted parts of ``weighted_sum`` by balanced term ('logits', 'hidden',
    # 'attention'; see potstill.training.balance), for a balancer that needs each term's gradient.
    term_losses: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StudentOutput:
    """What the student's forward gave for one micro-batch.

    Chunked path: ``hidden`` (B, T, H) final hidden states and ``head`` (its output layer);
    plain path: ``logits`` (B, T, V). ``activations``: the layers feature terms need, or None.
    """

    hidden: Optional[torch.Tensor] = None
    head: Optional[HeadParams] = None
    logits: Optional[torch.Tensor] = None
    activations: Optional[Captured] = None

    @property
    def form(self) -> str:
        return "hidden" if self.hidden is not None else "logits"


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, V), (B, T) -> logits (B, T-1, V), targets (B, T-1), mask (B, T-1) bool."""
    targets = labels[:, 1:]
    return logits[:, :-1], targets, targets != IGNORE_INDEX


def count_valid(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that count in the loss, after the shift: int64 scalar."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


class Objective:
    """Builds the weighted terms from the loss config.

    ``shared_vocab`` is the number of logit columns teacher and student share (heads may
    carry extra padding rows); divergences use only those columns. ``features``: the run's
    hidden-state / attention-relation terms, or None. ``autocast``: a zero-argument factory
    of the compute-precision context the chunked forms run their matmuls in.
    """

    def __init__(self, cfg: LossConfig, shared_vocab: int | None = None, *,
                 features: FeatureDistiller | None = None, autocast: Callable[[], Any] = contextlib.nullcontext,
                 divergence_params: dict | None = None):
        self.cfg = cfg
        self.set_divergence_params(divergence_params)
        self.shared_vocab = shared_vocab
        self.features = features
        self.autocast = autocast
        self.kd_scale = cfg.logits.weight * (cfg.logits.temperature ** 2 if cfg.logits.t2_scaling else 1.0)
        # (student form, teacher signal form) -> the loss form; see the module docstring's table.
        self._forms = {
            ("hidden", "dense-hidden"): self._dense_chunked, ("hidden", "none"): self._dense_chunked,
            ("hidden", "sparse"): self._sparse_chunked,
            ("logits", "dense-logits"): self._dense_plain, ("logits", "none"): self._dense_plain,
            ("logits", "sparse"): self._sparse_plain,
            ("hidden", "aligned"): self._aligned, ("logits", "aligned"): self._aligned,
        }

    def set_divergence_params(self, params: dict | None) -> None:
        """The divergence's own parameters (:meth:`potstill.config.LogitLossConfig.divergence_params`;
        for cakld the measured confidence): passed to every loss form as ``params=``."""
        if params is None:
            params = self.cfg.logits.divergence_params() if self.cfg.logits.divergence != "cakld" else {}
        self.params = dict(params)
        self._params_kw = {"params": self.params} if self.params else {}

    def compute(self, student: StudentOutput, teacher: TeacherSignal, batch: MicroBatch) -> ObjectiveOutput:
        """Every term of one micro-batch, as sums over its valid tokens (not yet normalized)."""
        form = self._forms.get((student.form, teacher.form))
        if form is None:
            raise ValueError(f"no loss form for a student giving {student.form} and a teacher signal "
                             f"{teacher.form}: the student and the teacher must be on the same loss path")
        out = form(student, teacher, batch.labels)
        if out.weighted_sum.requires_grad:
            out.term_losses["logits"] = out.weighted_sum
        if self.features is not None:  # hidden-state / attention-relation terms, float32, outside autocast
            weights = {"hidden": self.cfg.hidden.weight, "attention": self.cfg.attention.weight}
            for name, value in self.features.terms(student.activations, teacher.activations, batch.labels,
                                                   batch.attention_mask).items():
                weighted = weights[name] * value
                out.weighted_sum = out.weighted_sum + weighted
                out.term_sums[name] = value.detach()
                out.term_losses[name] = weighted
        return out

    # -- the forms ----------------------------------------------------------------------------
    def _dense_chunked(self, student: StudentOutput, teacher: TeacherSignal, labels: torch.Tensor):
        with self.autocast():
            return self.fused(student.hidden, student.head, labels, teacher.hidden, teacher.head,
                              chunk_size=self.cfg.chunk_size, memory_budget_mb=self.cfg.memory_budget_mb)

    def _dense_plain(self, student: StudentOutput, teacher: TeacherSignal, labels: torch.Tensor):
        return self(student.logits, labels, teacher.logits)

    def _sparse_chunked(self, student: StudentOutput, teacher: TeacherSignal, labels: torch.Tensor):
        with self.autocast():
            return self.sparse_fused(student.hidden, student.head, labels, teacher.sparse)

    def _sparse_plain(self, student: StudentOutput, teacher: TeacherSignal, labels: torch.Tensor):
        return self.sparse(student.logits, labels, teacher.sparse)

    def _aligned(self, student: StudentOutput, teacher: TeacherSignal, labels: torch.Tensor) -> ObjectiveOutput:
        """A teacher with another tokenizer (:class:`~potstill.teachers.signal.AlignedTargets`): the
        cross-tokenizer divergence at the aligned rows, hard-label CE on every valid row."""
        lc, xc, a = self.cfg.logits, self.cfg.cross_tokenizer, teacher.aligned
        mask = labels[:, 1:] != IGNORE_INDEX
        terms: dict[str, torch.Tensor] = {}
        if student.hidden is not None:
            hidden = student.hidden[:, :-1]
            head = student.head
            ce_out = None
            if self.cfg.ce.weight > 0:
                with self.autocast():
                    ce_out = chunked_distill_loss(
                        hidden.reshape(-1, hidden.shape[-1]), head.weight, labels[:, 1:].reshape(-1), kd_weight=0.0,
                        ce_weight=self.cfg.ce.weight, student_bias=head.bias, student_softcap=head.softcap,
                        chunk_size=self.cfg.chunk_size, memory_budget_mb=self.cfg.memory_budget_mb)
            total = ce_out.weighted_sum if ce_out is not None else hidden.new_zeros((), dtype=torch.float32)
            if ce_out is not None:
                terms.update(ce_out.term_sums)
            if lc.weight > 0:
                rows = hidden[mask][a.rows]
                kd, parts = self._aligned_blocks(rows, head, a)
                total = total + self.kd_scale * kd
                terms.update(parts)
            return ObjectiveOutput(weighted_sum=total, n_valid=count_valid(labels), term_sums=terms)
        s, shifted, _ = shift(student.logits, labels)
        total = s.new_zeros((), dtype=torch.float32)
        if lc.weight > 0:
            kd, _, parts = aligned_divergence(lc.divergence, s[mask][a.rows], a.ids, a.logp, a.rest, a.exact,
                                              mode=xc.mode, temperature=lc.temperature, beta=lc.beta,
                                              exact_weight=xc.exact_weight, uld_weight=xc.uld_weight)
            total = total + self.kd_scale * kd
            terms.update(kd=kd.detach(), **{f"kd_{k}": v for k, v in parts.items()})
        if self.cfg.ce.weight > 0:
            ce, _ = cross_entropy(s, shifted, ignore_index=IGNORE_INDEX)
            terms["ce"] = ce.detach()
            total = total + self.cfg.ce.weight * ce
        return ObjectiveOutput(weighted_sum=total, n_valid=count_valid(labels), term_sums=terms)

    def _aligned_blocks(self, rows: torch.Tensor, head: HeadParams, a) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The aligned divergence from hidden rows (A, H) and the head, in blocks of rows whose
        logits fit ``loss.memory_budget_mb``; each block's logits are recomputed in backward
        (activation checkpointing), so no (A, V) tensor outlives its block."""
        from torch.utils.checkpoint import checkpoint

        lc, xc = self.cfg.logits, self.cfg.cross_tokenizer
        vocab = head.weight.shape[0]
        # ~12 float32 copies of a block's (rows, V) logits live at once in the divergence (its
        # softmaxes, the mapped rows' extra column, the sort for ULD) and again in backward.
        block = max(1, int(self.cfg.memory_budget_mb * 2**20 // (vocab * 4 * ALIGNED_COPIES)))

        def part(h, ids, logp, rest, exact):
            with self.autocast():
                logits = h @ head.weight.T
                if head.bias is not None:
                    logits = logits + head.bias
            if head.softcap is not None:
                logits = head.softcap * torch.tanh(logits.float() / head.softcap)
            kd, _, parts = aligned_divergence(lc.divergence, logits, ids, logp, rest, exact, mode=xc.mode,
                                              temperature=lc.temperature, beta=lc.beta,
                                              exact_weight=xc.exact_weight, uld_weight=xc.uld_weight)
            return kd, parts["exact"], parts["uld"]

        total = rows.new_zeros((), dtype=torch.float32)
        exact_sum = torch.zeros(())
        uld_sum = torch.zeros(())
        for lo in range(0, max(len(rows), 1), block):
            sl = slice(lo, lo + block)
            args = (rows[sl], a.ids[sl], a.logp[sl], a.rest[sl], a.exact[sl])
            kd, e, u = checkpoint(part, *args, use_reentrant=False) if rows.requires_grad else part(*args)
            total = total + kd
            exact_sum = exact_sum + e.detach().float().cpu()
            uld_sum = uld_sum + u.detach().float().cpu()
        return total, {"kd": total.detach(), "kd_exact": exact_sum, "kd_uld": uld_sum}

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.logits.weight > 0

    def kd_sum(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted divergence sum and n_valid. Logits (B, T, V*), labels (B, T)."""
        s, targets, mask = shift(student_logits, labels)
        t = teacher_logits[:, :-1]
        v = self.shared_vocab or min(s.shape[-1], t.shape[-1])
        lc = self.cfg.logits
        return logit_divergence(lc.divergence, s[..., :v], t[..., :v], mask,
                                temperature=lc.temperature, beta=lc.beta, alpha=lc.alpha, targets=targets,
                                **self._params_kw)

    def __call__(self, student_logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None) -> ObjectiveOutput:
        """student_logits (B, T, Vs), labels (B, T), teacher_logits (B, T, Vt) or None.

        The same terms as :meth:`kd_sum` and ``cross_entropy``, computed by the fused
        logits loss (row blocks, gradient written in the forward) so that no float32
        copies of the ``B x T x V`` logits are kept for backward.
        """
        lc = self.cfg.logits
        if lc.weight > 0 and teacher_logits is None:
            raise ValueError("loss.logits.weight > 0 but no teacher logits were given")
        # Shift the targets, not the logits: position i predicts labels[i + 1]; the last
        # position has no target. The logits are then viewed (B*T, V) without a copy.
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        out = fused_logit_loss(
            student_logits.reshape(-1, student_logits.shape[-1]), targets.reshape(-1),
            teacher_logits.reshape(-1, teacher_logits.shape[-1]) if lc.weight > 0 else None,
            divergence=lc.divergence, temperature=lc.temperature, beta=lc.beta, alpha=lc.alpha,
            kd_weight=self.kd_scale if lc.weight > 0 else 0.0, ce_weight=self.cfg.ce.weight,
            shared_vocab=self.shared_vocab if lc.weight > 0 else None,
            chunk_size=self.cfg.chunk_size, memory_budget_mb=self.cfg.memory_budget_mb, **self._params_kw)
        return ObjectiveOutput(weighted_sum=out.weighted_sum, n_valid=out.n_valid, term_sums=dict(out.term_sums))

    def fused(self, student_hidden: torch.Tensor, student_head, labels: torch.Tensor,
              teacher_hidden: torch.Tensor | None = None, teacher_head=None, *,
              chunk_size: int | None = None, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> ObjectiveOutput:
        """The same objective from final hidden states and heads, never holding B x T x V logits.

        student_hidden (B, T, Hs), teacher_hidden (B, T, Ht), labels (B, T); heads are
        :class:`~potstill.models.heads.HeadParams`. Equal to ``__call__`` on the models' logits.
        """
        lc = self.cfg.logits
        use_teacher = lc.weight > 0
        if use_teacher and (teacher_hidden is None or teacher_head is None):
            raise ValueError("loss.logits.weight > 0 but no teacher hidden states were given")
        out = chunked_distill_loss(
            student_hidden[:, :-1].reshape(-1, student_hidden.shape[-1]), student_head.weight,
            labels[:, 1:].reshape(-1),
            teacher_hidden=teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]) if use_teacher else None,
            teacher_head=teacher_head.weight if use_teacher else None,
            divergence=lc.divergence, temperature=lc.temperature, beta=lc.beta, alpha=lc.alpha,
            kd_weight=self.kd_scale, ce_weight=self.cfg.ce.weight, shared_vocab=self.shared_vocab,
            student_bias=student_head.bias, teacher_bias=teacher_head.bias if use_teacher else None,
            student_softcap=student_head.softcap, teacher_softcap=teacher_head.softcap if use_teacher else None,
            chunk_size=chunk_size, memory_budget_mb=memory_budget_mb, **self._params_kw)
        return ObjectiveOutput(weighted_sum=out.weighted_sum, n_valid=out.n_valid, term_sums=dict(out.term_sums))

    def sparse_fused(self, student_hidden: torch.Tensor, student_head: HeadParams, labels: torch.Tensor,
                     targets: SparseTargets) -> ObjectiveOutput:
        """:meth:`sparse` from hidden states (B, T, H) and the student's head, never holding
        B x T x V logits (:func:`potstill.losses.sparse_chunked.sparse_chunked_loss`)."""
        if student_head.softcap is not None:
            raise ValueError("the sparse-teacher chunked path has no logit soft-capping: use loss.path=plain")
        lc = self.cfg.logits
        mask = labels[:, 1:] != IGNORE_INDEX
        rows = {k: v for k, v in (("ids", targets.ids), ("logp", targets.logp), ("rest", targets.rest),
                                  ("entropy", targets.entropy)) if v is not None}
        v = min(student_head.weight.shape[0], targets.vocab)
        out = sparse_chunked_loss(student_hidden[:, :-1][mask], student_head.weight, student_head.bias,
                                  labels[:, 1:][mask], rows, kind=targets.kind, missing_mass=lc.missing_mass,
                                  temperature=lc.temperature, kd_weight=self.kd_scale if lc.weight > 0 else 0.0,
                                  ce_weight=self.cfg.ce.weight, vocab=v, divergence=lc.divergence, beta=lc.beta,
                                  **self._params_kw)
        return ObjectiveOutput(weighted_sum=out.weighted_sum, n_valid=out.n_valid, term_sums=dict(out.term_sums))

    def sparse(self, student_logits: torch.Tensor, labels: torch.Tensor, targets: SparseTargets) -> ObjectiveOutput:
        """The objective with the sparse logit term: student_logits (B, T, V), labels (B, T), the
        teacher's rows at the valid positions (:class:`~potstill.teachers.signal.SparseTargets`)."""
        lc = self.cfg.logits
        terms: dict[str, torch.Tensor] = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        s, shifted, mask = shift(student_logits, labels)
        if lc.weight > 0:
            v = min(s.shape[-1], targets.vocab)
            rows = s[mask][:, :v]
            if targets.kind == "topk":
                kd, _ = topk_divergence(lc.divergence, rows, targets.ids, targets.logp, targets.rest,
                                        missing_mass=lc.missing_mass, temperature=lc.temperature, beta=lc.beta,
                                        **self._params_kw)
            else:
                kd, _ = sampled_divergence(lc.divergence, rows, targets.ids, targets.entropy,
                                           temperature=lc.temperature, **self._params_kw)
            terms["kd"] = kd.detach()
            total = total + self.kd_scale * kd
        if self.cfg.ce.weight > 0:
            ce, _ = cross_entropy(s, shifted, ignore_index=IGNORE_INDEX)
            terms["ce"] = ce.detach()
            total = total + self.cfg.ce.weight * ce
        return ObjectiveOutput(weighted_sum=total, n_valid=count_valid(labels), term_sums=terms)


def step_loss(weighted_sum: torch.Tensor, n_valid_step: torch.Tensor | int, world_size: int) -> torch.Tensor:
    """The micro-batch loss to backpropagate, normalized by the step's valid tokens everywhere."""
    n = n_valid_step if isinstance(n_valid_step, torch.Tensor) else torch.tensor(n_valid_step)
    return weighted_sum * world_size / n.clamp(min=1).to(weighted_sum.dtype)
