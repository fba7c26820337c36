"""Batch-wise Sinkhorn distance between student and teacher distributions (SinKD).

SinKD (Cui et al. 2024, "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation";
Distily's ``sinkhorn`` loss): the rows of a batch are treated as two empirical sets, the
student's ``p_s,i`` and the teacher's ``p_t,j`` (probabilities after temperature), and the
loss is the entropic optimal-transport cost between them. Here the valid rows are taken in
consecutive *groups* of ``rows`` (the last group may be shorter); for a group of g rows:

* cost ``C_ij = sum_v |p_s,i(v) - p_t,j(v)|`` (L1 between student row i and teacher row j);
* kernel ``K = exp(-C / epsilon)``, then ``iterations`` rounds of normalizing the rows, then
  the columns, to sum 1 (in log space: ``log K = -C / epsilon`` and logsumexp normalization,
  stable at small epsilon); ``P`` is the result (its columns sum to 1 exactly, its rows
  approximately, see below);
* per-row value ``sum_j P_ij C_ij`` (the group's sum is ``sum P * C``). A group of one row
  gives 0 (there is no batch to transport within; the value stays tied to the graph).

The gradient flows through ``C`` into ``p_s`` and through the Sinkhorn iterations (autograd
on the g x g problem). ``C`` and its backward come from :class:`L1Cost`, which loops over
teacher rows in blocks (``grad p_s,i = sum_j G_ij sign(p_s,i - p_t,j)``), so no g x g x V
tensor is ever formed: extra memory is O(g^2 + g*V) per group (tested with a dispatch
mode that records every tensor's size).

Convergence: the last step of every round normalizes the columns, so the column sums are 1
up to rounding (<= 4e-7 measured); the row sums carry the marginal error. Measured in float32,
g = 64, V = 1000, 20 iterations, logits ~ N(0, s^2): max |row sum - 1| at epsilon = 0.1 is
3e-7 (s = 1), 2e-7 (s = 3) [the test asserts < 1e-4 rows, < 1e-5 columns], but 4e-2 at s = 10
(peaked rows, costs near 2); at epsilon = 0.01: 1e-4 / 0.15 / 0.5; at 0.001 up to 2.5. So at
small epsilon or peaked distributions 20 rounds do not converge: the value is computed at the
plan reached (as SinKD / Distily do), raise ``sinkhorn_iterations`` to get closer.
"""

from __future__ import annotations

import torch

# Teacher rows per block in L1Cost: at most this many float32 elements in the (g, b, V)
# difference, and at least one teacher row (then g * V).
COST_BLOCK_ELEMENTS = 2**20


def _block(g: int, h: int, v: int) -> int:
    return max(1, min(h, COST_BLOCK_ELEMENTS // max(g * v, 1)))


class L1Cost(torch.autograd.Function):
    """``C_ij = sum_v |a_i(v) - b_j(v)|``: a (g, V), b (h, V) -> C (g, h), without a g x h x V tensor."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        g, h, v = a.shape[0], b.shape[0], a.shape[1]
        cost = a.new_empty(g, h)
        step = _block(g, h, v)
        for j0 in range(0, h, step):
            j1 = min(j0 + step, h)
            cost[:, j0:j1] = (a.unsqueeze(1) - b[j0:j1].unsqueeze(0)).abs_().sum(-1)
        ctx.save_for_backward(a, b)
        return cost

    @staticmethod
    def backward(ctx, grad_cost: torch.Tensor):
        a, b = ctx.saved_tensors
        g, h, v = a.shape[0], b.shape[0], a.shape[1]
        need_a, need_b = ctx.needs_input_grad[:2]
        grad_a = torch.zeros_like(a) if need_a else None
        grad_b = torch.zeros_like(b) if need_b else None
        step = _block(g, h, v)
        for j0 in range(0, h, step):
            j1 = min(j0 + step, h)
            sign = (a.unsqueeze(1) - b[j0:j1].unsqueeze(0)).sign_()    # (g, b, V)
            weighted = sign.mul_(grad_cost[:, j0:j1].unsqueeze(-1))
            if need_a:
                grad_a += weighted.sum(1)
            if need_b:
                grad_b[j0:j1] -= weighted.sum(0)
        return grad_a, grad_b


def l1_cost(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise L1 distances of the rows: a (g, V), b (h, V) -> (g, h); O(g*V) extra memory."""
    return L1Cost.apply(a, b)


def sinkhorn_plan(cost: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The Sinkhorn plan of ``cost`` (g, h): ``iterations`` rounds of row then column
    normalization of ``exp(-cost / epsilon)``, in log space. Differentiable. -> (g, h)."""
    log_p = -cost / epsilon
    for _ in range(iterations):
        log_p = log_p - log_p.logsumexp(dim=1, keepdim=True)
        log_p = log_p - log_p.logsumexp(dim=0, keepdim=True)
    return log_p.exp()


def sinkhorn_per_row(student_probs: torch.Tensor, teacher_probs: torch.Tensor, *, epsilon: float,
                     iterations: int, rows: int) -> torch.Tensor:
    """Per-row SinKD values: probabilities (N, V) -> (N,), rows grouped ``rows`` at a time.

    Row i of a group of g >= 2 rows gets ``sum_j P_ij C_ij``; a lone last row gets 0.
    ``teacher_probs`` should be detached (the caller's job); its gradient is not needed.
    """
    n = student_probs.shape[0]
    values = []
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        ps, pt = student_probs[r0:r1], teacher_probs[r0:r1]
        if r1 - r0 < 2:
            values.append(ps[:, :0].sum(-1))  # exact zeros in the graph, zero gradient
            continue
        cost = l1_cost(ps, pt)
        plan = sinkhorn_plan(cost, epsilon, iterations)
        values.append((plan * cost).sum(1))
    if not values:
        return student_probs[:, :0].sum(-1)
    return torch.cat(values)
