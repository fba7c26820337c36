"""The plain path's loss from full logits, with the chunked path's row-block machinery.

Models that cannot give hidden states to the chunked path still give ``(N, V)`` logits. The
textbook loss on them (gather the valid rows, float32 ``log_softmax`` of both, KL, autograd)
keeps several float32 ``N x V`` temporaries alive for backward. ``fused_logit_loss`` walks
the valid rows in chunks and small row blocks instead (the same ``_chunk_logit_grads`` as
:mod:`potstill.losses.chunked`: closed-form gradient for forward KL and CE, autograd on one
block for every other divergence), writes the gradient w.r.t. the student logits during the
forward, and keeps only that one ``N x V`` gradient, in the logits' dtype.

Equal to ``kd_weight * logit_divergence(...) + ce_weight * cross_entropy(...)`` on the same
logits (tests), like the chunked path.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from potstill.losses.chunked import (
    BLOCK_ELEMENTS,
    DEFAULT_MEMORY_BUDGET_MB,
    IGNORE_INDEX,
    ChunkedLossOutput,
    _chunk_logit_grads,
    check_loss_options,
    loss_output,
    _Spec,
    _view,
    _workers,
    choose_chunk_size,
    group_aligned_rows,
    spec_params,
)


class _FusedLogits(torch.autograd.Function):
    """Inputs: student_logits (N, Vs), teacher_logits (N, Vt) | None, targets (N,), spec.
    Outputs: weighted_sum, kd_sum, ce_sum (0-dim; the last two not differentiable)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, targets, spec: _Spec):
        device = student_logits.device
        acc_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        use_kd, use_ce = spec.kd_weight > 0, spec.ce_weight > 0
        v = spec.shared_vocab
        vz = student_logits.shape[1] if use_ce else v  # columns that receive gradient
        closed = spec.closed_form and acc_dtype == torch.float32
        rows_all = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        n = rows_all.numel()
        chunk = choose_chunk_size(n, vz, v if use_kd else 0, element_size=student_logits.element_size(),
                                  memory_budget_mb=spec.memory_budget_mb, chunk_size=spec.chunk_size)
        width = max(vz, v)
        block_rows = max(1, min(chunk, BLOCK_ELEMENTS["closed_form" if closed else "autograd"] // width)) \
            if device.type == "cpu" else chunk
        chunk, block_rows = group_aligned_rows(spec, chunk, block_rows)  # whole sinkhorn groups
        workers = _workers(device)
        scratch = [[torch.empty(block_rows * width, dtype=torch.float32, device=device)
                    for _ in range(3 if use_kd else 1)] if closed else None
                   for _ in range(min(workers, -(-max(chunk, 1) // block_rows)))]
        raw_buf = torch.empty(min(chunk, n) * vz, dtype=student_logits.dtype, device=device)
        grad = torch.zeros_like(student_logits)
        kd_total = torch.zeros((), dtype=acc_dtype, device=device)
        ce_total = torch.zeros((), dtype=acc_dtype, device=device)
        for start in range(0, n, chunk):
            rows = rows_all[start:start + chunk]
            raw = _view(raw_buf, rows.numel(), vz)
            torch.index_select(student_logits[:, :vz], 0, rows, out=raw)
            traw = teacher_logits[:, :v].index_select(0, rows) if use_kd else None
            scale, kd, ce = _chunk_logit_grads(raw, traw, targets.index_select(0, rows), spec, closed,
                                               block_rows, scratch, workers)
            if kd is not None:
                kd_total += kd.to(acc_dtype)
            if ce is not None:
                ce_total += ce.to(acc_dtype)
            if scale != 1.0:
                raw.mul_(scale)
            grad[:, :vz].index_copy_(0, rows, raw)
            del traw
        total = torch.zeros((), dtype=acc_dtype, device=device)
        if use_kd:
            total = total + spec.kd_weight * kd_total
        if use_ce:
            total = total + spec.ce_weight * ce_total
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(kd_total, ce_total)
        return total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_output, _grad_kd=None, _grad_ce=None):
        (grad,) = ctx.saved_tensors
        if not (grad_output.device.type == "cpu" and bool(grad_output == 1)):
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None


def fused_logit_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    divergence: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    shared_vocab: Optional[int] = None,
    chunk_size: Optional[int] = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    params: Optional[Mapping[str, Any]] = None,
) -> ChunkedLossOutput:
    """Distillation loss from full logits: ``student_logits`` (N, Vs), ``teacher_logits``
    (N, Vt) (needed when ``kd_weight > 0``), ``targets`` (N,) int64 (-100 = ignored).

    ``weighted_sum = kd_weight * logit_divergence(divergence, s[:, :V], t[:, :V], mask,
    targets=targets)[0] + ce_weight * cross_entropy(s, targets)[0]`` with ``V = shared_vocab or
    min(Vs, Vt)``, its gradient computed during the forward (call backward once). The valid rows'
    ``targets`` reach every row block (``token_rkl`` reads the label's log-probs there).
    ``params``: the divergence's own parameters (``sinkhorn``: chunks and blocks hold whole groups).
    """
    check_loss_options(divergence, temperature, beta, alpha, kd_weight, ce_weight, params)
    use_kd = kd_weight > 0
    if student_logits.dim() != 2 or targets.shape != student_logits.shape[:1]:
        raise ValueError(f"student_logits must be (N, V) and targets (N,), got {tuple(student_logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if use_kd and (teacher_logits is None or teacher_logits.dim() != 2
                   or teacher_logits.shape[0] != student_logits.shape[0]):
        raise ValueError("kd_weight > 0 needs teacher_logits (N, Vt) with the student's N rows")
    limit = min(student_logits.shape[1], teacher_logits.shape[1]) if use_kd else student_logits.shape[1]
    v = limit if shared_vocab is None else shared_vocab
    if not 1 <= v <= limit:
        raise ValueError(f"shared_vocab must be in [1, {limit}] (the smaller vocabulary), got {shared_vocab!r}")
    spec = _Spec(divergence, float(temperature), float(beta), float(alpha), float(kd_weight), float(ce_weight),
                 v, None, None, chunk_size, float(memory_budget_mb), None, spec_params(params))
    total, kd_sum, ce_sum = _FusedLogits.apply(
        student_logits, teacher_logits.detach() if use_kd else None, targets, spec)
    return loss_output(total, kd_sum if use_kd else None, ce_sum if ce_weight > 0 else None, targets)
