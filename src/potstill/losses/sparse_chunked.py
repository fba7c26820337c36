"""The sparse forward KL from hidden states, a chunk of rows at a time (the cached-teacher fast path).

Same value and gradients as :mod:`potstill.losses.sparse` (forward KL) plus hard-label CE on
the student's logits ``hidden @ W.T (+ b)``, without holding ``N x V`` logits: chunks of
rows get their logits in the matmul dtype (bf16 under autocast), then row blocks compute
the float32 loss and its closed-form gradient w.r.t. the logits (on the pool of single-
threaded workers of :mod:`potstill.losses.chunked`, for the same reason as there), and
``grad_hidden = g @ W``, ``grad_W += g.T @ h`` close the chunk. With q = softmax(z / T):

* top-k, rest bucket: KL over the k ids and the rest. d/dz_j = (q_j - p_j) / T for j in
  the ids, (q_j - p_rest * q_j / q_rest) / T outside them;
* top-k, renormalized teacher p̂: (q_j - p̂_j) / T (p̂ is 0 outside the ids);
* sampled (n draws, c_j times token j): (q_j - c_j / n) / T;
* CE (no temperature): softmax(z) - onehot(target).

Every other divergence a sparse teacher supports (:data:`potstill.losses.sparse.SPARSE_DIVERGENCES`
for top-k, ``soft_ce`` for sampled) runs the :mod:`potstill.losses.sparse` function itself on
each row block's logits under ``torch.autograd.grad`` (same chunks and blocks, no closed form);
the rest are refused in one line, as there.

``backward`` only scales the stored gradients, so call it once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .chunked import ChunkedLossOutput, _map_rows, _workers, loss_output, spec_params
from .logits import _check_temperature, _check_unit, check_divergence_params
from .sparse import check_sparse_divergence, sampled_divergence, topk_divergence

BLOCK_ELEMENTS = 2**18   # float32 elements of one row block's (r, V) tensors: stays in cache
CHUNK_ROWS = 512


@dataclass
class SparseSpec:
    kind: str             # "topk" | "sampled"
    missing_mass: str     # "rest" | "renormalize" (top-k)
    temperature: float
    kd_weight: float
    ce_weight: float
    vocab: int            # columns of the student's logits that the teacher's ids index
    compute_dtype: Optional[torch.dtype]
    divergence: str = "fkl"
    beta: float = 0.5
    params: Tuple[Tuple[str, Any], ...] = ()

    @property
    def closed_form(self) -> bool:
        """Forward KL has the closed-form gradient; every other divergence runs autograd per block."""
        return self.divergence == "fkl"


def _teacher_side(rows: Dict[str, torch.Tensor], spec: SparseSpec) -> Dict[str, torch.Tensor]:
    """Teacher log-probs prepared once per call (N, K) / (N,): renormalized over K or K + 1.
    The autograd divergences get the rows as given (the sparse.py functions renormalize)."""
    if not spec.closed_form:
        return {k: (v.long() if k == "ids" else v) for k, v in rows.items()}
    if spec.kind == "sampled":
        return {"ids": rows["ids"].long(), "entropy": rows["entropy"].float()}
    floor = torch.finfo(torch.float32).min
    logp = rows["logp"].float().clamp_min(floor)
    if spec.missing_mass == "renormalize":
        return {"ids": rows["ids"].long(), "lp": torch.log_softmax(logp, -1)}
    both = torch.log_softmax(torch.cat([logp, rows["rest"].float().clamp_min(floor).unsqueeze(-1)], -1), -1)
    return {"ids": rows["ids"].long(), "lp": both[:, :-1].contiguous(), "lp_rest": both[:, -1].contiguous()}


def _xlogy_ratio(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), 0 where p == 0."""
    p = lp.exp()
    return p * torch.where(p > 0, lp - lq, torch.zeros_like(lp))


def _block(z: torch.Tensor, tgt: torch.Tensor, t: Dict[str, torch.Tensor], spec: SparseSpec):
    """One row block: z (r, Vs) logits -> (g (r, Vs) float32 gradient of the weighted sum, kd sum, ce sum).

    The softmax is spelled out (max, exp, sum) so that every quantity the loss and its
    gradient need comes from a few passes over the block, with the exponentials reused in place.
    """
    v, T = spec.vocab, spec.temperature
    zf = z.float()
    kd = ce = None
    g = None
    if spec.kd_weight > 0 and not spec.closed_form:
        g, kd = _autograd_kd(zf, t, spec)
    elif spec.kd_weight > 0:
        zs = zf[:, :v] if T == 1.0 else zf[:, :v] / T
        m = zs.amax(-1, keepdim=True)
        e = (zs - m).exp_()                                   # (r, V): q * S
        s = e.sum(-1, keepdim=True)
        log_s = s.log()
        ids = t["ids"]
        lq_k = zs.gather(-1, ids) - m - log_s                  # (r, K) student log-probs at the ids
        scale = spec.kd_weight / T
        if spec.kind == "sampled":
            kd = (-lq_k.mean(-1) - t["entropy"]).sum()
            g = e.mul_(scale / s)
            g.scatter_add_(-1, ids, torch.full(ids.shape, -scale / ids.shape[1], dtype=g.dtype))
        elif spec.missing_mass == "renormalize":
            kd = _xlogy_ratio(t["lp"], lq_k).sum()
            g = e.mul_(scale / s)
            g.scatter_add_(-1, ids, -scale * t["lp"].exp())
        else:
            e_k = e.gather(-1, ids)
            e.scatter_(-1, ids, 0.0)
            s_rest = e.sum(-1, keepdim=True)                   # the student's mass outside the ids, x S
            # -inf only when the ids cover every column (then the teacher's rest is 0 too); the floor
            # keeps a rounding-level teacher rest against an underflowed student rest finite.
            lq_rest = (s_rest.log() - log_s).clamp_min(-100.0)
            lp_rest = t["lp_rest"].unsqueeze(-1)
            kd = (_xlogy_ratio(t["lp"], lq_k).sum(-1) + _xlogy_ratio(lp_rest, lq_rest).squeeze(-1)).sum()
            # outside the ids: q_j (1 - p_rest / q_rest); at the ids: q_j - p_j.
            ratio = torch.where(s_rest > 0, (lp_rest - lq_rest).exp(), torch.zeros_like(s_rest))
            g = e.mul_(scale * (1.0 - ratio) / s)
            g.scatter_(-1, ids, scale * (e_k / s - t["lp"].exp()))
        if v < zf.shape[1]:
            g = torch.cat([g, torch.zeros_like(zf[:, v:])], dim=-1)
    if spec.ce_weight > 0:
        ls1 = torch.log_softmax(zf, dim=-1)
        ce = -ls1.gather(-1, tgt.unsqueeze(-1)).sum()
        p1 = ls1.exp_()
        p1.scatter_add_(-1, tgt.unsqueeze(-1), torch.full((len(tgt), 1), -1.0))
        g = p1.mul_(spec.ce_weight) if g is None else g.add_(p1, alpha=spec.ce_weight)
    return g, kd, ce


def _autograd_kd(zf: torch.Tensor, t: Dict[str, torch.Tensor], spec: SparseSpec):
    """The sparse divergence of one row block by autograd: zf (r, Vs) float32 logits ->
    (g (r, Vs) float32 gradient of kd_weight * kd, kd sum). Exactly the plain path's function
    (:func:`topk_divergence` / :func:`sampled_divergence`) on the block's rows."""
    params = dict(spec.params) or None
    leaf = zf.detach().requires_grad_()
    with torch.enable_grad():
        logits = leaf[:, :spec.vocab]
        if spec.kind == "sampled":
            kd, _ = sampled_divergence(spec.divergence, logits, t["ids"], t.get("entropy"),
                                       temperature=spec.temperature, params=params)
        else:
            kd, _ = topk_divergence(spec.divergence, logits, t["ids"], t["logp"], t.get("rest"),
                                    missing_mass=spec.missing_mass, temperature=spec.temperature,
                                    beta=spec.beta, params=params)
        (g,) = torch.autograd.grad(kd * spec.kd_weight, leaf)
    return g, kd.detach().float()


class _SparseChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher, spec: SparseSpec):
        n, _ = hidden.shape
        cd = spec.compute_dtype or hidden.dtype
        w, h_all = weight.detach().to(cd), hidden.detach().to(cd)
        b = bias.detach().to(cd) if bias is not None else None
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
        sums = {"kd": torch.zeros((), dtype=torch.float64), "ce": torch.zeros((), dtype=torch.float64)}
        block_rows = max(1, BLOCK_ELEMENTS // weight.shape[0]) if hidden.device.type == "cpu" else CHUNK_ROWS
        workers = _workers(hidden.device)
        # One set of chunk buffers for the whole call, not three fresh (CHUNK_ROWS, V) tensors per chunk:
        # on CPU, glibc keeps freed blocks of that size (its mmap threshold rises to them), and the churn
        # cost a top-k run ~80 MB of peak RSS over a CE-only one on the quickstart pair (bench/served.py).
        rows_max, vocab = min(CHUNK_ROWS, n), weight.shape[0]
        z_buf = torch.empty((rows_max, vocab), dtype=cd, device=hidden.device)
        g_buf = torch.empty((rows_max, vocab), dtype=torch.float32, device=hidden.device)
        g_cd_buf = torch.empty((rows_max, vocab), dtype=cd, device=hidden.device) if cd != torch.float32 else None
        for lo in range(0, n, CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, n)
            h = h_all[lo:hi]
            z, g = z_buf[: hi - lo], g_buf[: hi - lo]
            if b is None:
                torch.mm(h, w.t(), out=z)            # what F.linear computes, written in place
            else:
                torch.addmm(b, h, w.t(), out=z)

            def rows(_worker, a, c, lo=lo, z=z, g=g):
                # _map_rows hands each worker one piece; walk it in cache-sized blocks.
                kd_sum = ce_sum = None
                for r0 in range(a, c, block_rows):
                    r1 = min(r0 + block_rows, c)
                    t = {k: v[lo + r0: lo + r1] for k, v in teacher.items()}
                    g[r0:r1], kd, ce = _block(z[r0:r1], targets[lo + r0: lo + r1], t, spec)
                    kd_sum = kd if kd_sum is None else kd_sum + kd
                    ce_sum = ce if ce_sum is None else ce_sum + ce
                return kd_sum, ce_sum

            for kd, ce in _map_rows(rows, hi - lo, block_rows, workers):
                if kd is not None:
                    sums["kd"] += kd.double().cpu()
                if ce is not None:
                    sums["ce"] += ce.double().cpu()
            g_cd = g_cd_buf[: hi - lo].copy_(g) if g_cd_buf is not None else g
            grad_h[lo:hi] = (g_cd @ w).float()
            grad_w.add_((g_cd.t() @ h).float())
            if grad_b is not None:
                grad_b.add_(g.sum(0))
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        total = spec.kd_weight * sums["kd"] + spec.ce_weight * sums["ce"]
        kd, ce = sums["kd"].float(), sums["ce"].float()
        ctx.mark_non_differentiable(kd, ce)
        return total.float(), kd, ce

    @staticmethod
    def backward(ctx, grad_output, _grad_kd=None, _grad_ce=None):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        hd, wd, bd = ctx.dtypes
        return ((grad_h * grad_output).to(hd), (grad_w * grad_output).to(wd),
                (grad_b * grad_output).to(bd) if ctx.has_bias else None, None, None, None)


def sparse_chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        targets: torch.Tensor, teacher_rows: Dict[str, torch.Tensor], *, kind: str,
                        missing_mass: str = "rest", temperature: float = 1.0, kd_weight: float = 1.0,
                        ce_weight: float = 0.0, vocab: Optional[int] = None, divergence: str = "fkl",
                        beta: float = 0.5, params: Optional[Mapping[str, Any]] = None) -> ChunkedLossOutput:
    """A sparse divergence (forward KL by default) against sparse teacher rows (+ CE) from valid
    rows' hidden states.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) next-token ids,
    teacher_rows as :meth:`potstill.teachers.cached.CachedTeacher.targets` returns them (N rows).
    ``divergence`` / ``beta`` / ``params`` as for :func:`potstill.losses.sparse.topk_divergence`
    (``sampled``: fkl or soft_ce); fkl in closed form, the others by autograd per row block;
    an unsupported one is a one-line ValueError.
    Returns ``weighted_sum`` = kd_weight * kd + ce_weight * ce (sums over rows) and the terms.
    """
    if kd_weight > 0:
        check_sparse_divergence(divergence, kind, missing_mass)
        check_divergence_params(divergence, params)
        _check_temperature(temperature)
        _check_unit("beta", beta)
    device_type = hidden.device.type
    cd = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    spec = SparseSpec(kind=kind, missing_mass=missing_mass, temperature=temperature, kd_weight=kd_weight,
                      ce_weight=ce_weight, vocab=vocab or weight.shape[0], compute_dtype=cd,
                      divergence=divergence, beta=float(beta), params=spec_params(params))
    teacher = _teacher_side({k: v.to(hidden.device) for k, v in teacher_rows.items()}, spec) if kd_weight > 0 else {}
    with torch.autocast(device_type, enabled=False):
        total, kd, ce = _SparseChunked.apply(hidden, weight, bias, targets.long(), teacher, spec)
    # Every row given is a valid one, so loss_output's count of targets != -100 is N.
    return loss_output(total, kd if kd_weight > 0 else None, ce if ce_weight > 0 else None, targets)
