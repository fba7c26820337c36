"""The training objective: a weighted sum of loss terms, normalized in exactly one place.

One shift, one mask: ``logits[:, :-1]`` predicts ``labels[:, 1:]``; positions whose label
is -100 (padding, non-assistant chat tokens) do not count.

Normalization: every term returns a *sum* over valid tokens. The trainer counts the valid
tokens of all micro-batches of an optimizer step on all processes first, and each
micro-batch's loss is ``weighted_sum / n_valid_step * world_size`` (DDP averages
gradients over processes). So gradient accumulation and multi-process training give the
same gradient as one big batch, however the tokens fall (the bug TRL issue 4719 fixed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import LossConfig
from .losses import chunked_distill_loss, logit_divergence
from .losses.chunked import DEFAULT_MEMORY_BUDGET_MB
from .losses.fused_logits import fused_logit_loss

IGNORE_INDEX = -100


@dataclass
class ObjectiveOutput:
    """Sums over the valid tokens of one micro-batch.

    ``weighted_sum``: the differentiable total (weights and T^2 applied, not normalized).
    ``term_sums``: each term's raw sum, detached, for logging (divide by ``n_valid``).
    """

    weighted_sum: torch.Tensor
    n_valid: torch.Tensor
    term_sums: dict[str, torch.Tensor] = field(default_factory=dict)


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
    carry extra padding rows); divergences use only those columns.
    """

    def __init__(self, cfg: LossConfig, shared_vocab: int | None = None):
        self.cfg = cfg
        self.shared_vocab = shared_vocab
        self.kd_scale = cfg.logits.weight * (cfg.logits.temperature ** 2 if cfg.logits.t2_scaling else 1.0)

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
                                temperature=lc.temperature, beta=lc.beta, alpha=lc.alpha)

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
            chunk_size=self.cfg.chunk_size, memory_budget_mb=self.cfg.memory_budget_mb)
        return ObjectiveOutput(weighted_sum=out.weighted_sum, n_valid=out.n_valid, term_sums=dict(out.term_sums))

    def fused(self, student_hidden: torch.Tensor, student_head, labels: torch.Tensor,
              teacher_hidden: torch.Tensor | None = None, teacher_head=None, *,
              chunk_size: int | None = None, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> ObjectiveOutput:
        """The same objective from final hidden states and heads, never holding B x T x V logits.

        student_hidden (B, T, Hs), teacher_hidden (B, T, Ht), labels (B, T); heads are
        :class:`~potstill.heads.HeadParams`. Equal to ``__call__`` on the models' logits.
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
            chunk_size=chunk_size, memory_budget_mb=memory_budget_mb)
        return ObjectiveOutput(weighted_sum=out.weighted_sum, n_valid=out.n_valid, term_sums=dict(out.term_sums))


def step_loss(weighted_sum: torch.Tensor, n_valid_step: torch.Tensor | int, world_size: int) -> torch.Tensor:
    """The micro-batch loss to backpropagate, normalized by the step's valid tokens everywhere."""
    n = n_valid_step if isinstance(n_valid_step, torch.Tensor) else torch.tensor(n_valid_step)
    return weighted_sum * world_size / n.clamp(min=1).to(weighted_sum.dtype)
