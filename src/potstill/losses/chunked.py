"""The fused, chunked loss path: hidden states -> logits chunk -> loss and gradient -> free.

``chunked_distill_loss`` gives what the plain path gives (a divergence of
:mod:`potstill.losses.logits` on the shared vocab plus hard-label cross-entropy, as
``objective.py`` combines them), loss and gradients, without ever holding ``N x V``
logits for either model:

* the valid rows (``targets != -100``) are selected first; ignored rows never enter the
  math and get exactly zero gradient;
* the valid rows are walked in *chunks* (sized from ``memory_budget_mb``). For a chunk:
  student and teacher logits, one matmul each in the input dtype (bf16 uses the matrix
  units), into buffers reused by every chunk;
* each chunk is then walked in small *blocks* of rows (about 1 MB of float32 per row block
  on CPU, so the softmax passes stay in cache, spread over one worker thread per intra-op
  thread; the whole chunk on GPU). For a block: the
  float32 loss and its gradient w.r.t. the block's student logits, written over those
  logits. Forward KL (also ``jsd`` at ``beta=0``) and CE use their closed-form gradient
  (``softmax - target distribution``, evaluated in place); every other divergence runs
  the same ``per_token_divergence`` / ``cross_entropy`` as the plain path under
  ``torch.autograd.grad`` on the block, with the block's label ids (``token_rkl`` reads the
  label's log-probs, so a label must lie in the shared vocab). ``sinkhorn`` couples the rows of a
  group of ``sinkhorn_rows`` valid rows: chunks and blocks are rounded to whole groups
  (:func:`group_aligned_rows`) so the path groups the rows the plain path groups;
* then ``grad_hidden[rows] = g @ W`` and ``grad_W += g.T @ h`` (float32 accumulator),
  and the chunk's buffers are reused by the next chunk;
* ``backward`` only scales the stored gradients by ``grad_output``.

So the gradient is computed during the forward: call ``backward`` once per forward on
``weighted_sum`` or anything linear in it (e.g. ``weighted_sum / n_valid_step``).
The teacher never receives gradient. Under ``torch.autocast`` the matmuls run in the
autocast dtype, as ``nn.Linear`` would; gradients come back in each input's dtype.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from potstill.losses.logits import (
    _check_name,
    check_divergence_params,
    _check_temperature,
    _check_unit,
    cross_entropy,
    per_token_divergence,
)

IGNORE_INDEX = -100
# Per chunk row the path keeps the raw student and teacher logits (in their matmul dtype)
# and nothing else of size V: the float32 softmax work happens in row blocks of bounded
# size. bench/loss.py --measure-factor measures the peak bytes per chunk row (torch profiler,
# slope between two chunk sizes) at 0.91-1.00 x those raw logits for every divergence. Not in
# the budget: the block scratch (~1 MB a thread), the (Vs, Hs) float32 head-gradient
# accumulator, grad_hidden (N, Hs) and the (Vs, Hs) cast of the head gradient at the end.
ROW_FACTOR = 1.05
BLOCK_ELEMENTS = {"closed_form": 2**18, "autograd": 2**19}  # float32 elements per block tensor (CPU)
# Each chunk streams the (Vs, Hs) float32 head-gradient accumulator once; from ~500 rows on
# that cost is amortized (measured, V=32000 bf16: 500, 1000 and 2000 rows a chunk within 2%),
# so more rows would only spend memory.
MAX_CHUNK_ROWS = 512
# The default budget for one chunk's logits. Each chunk also streams the (Vs, Hs) float32
# head-gradient accumulator once: at V=128256 in float32, 256 MB gives 9 chunks of ~237 rows
# and that streaming made the loss 8% slower than Liger-Kernel's 2 chunks of 1024; 512 MB
# gives 5 and is level or faster (bench/loss.py), still at 0.4x Liger's memory.
DEFAULT_MEMORY_BUDGET_MB = 512.0
HEAD_BLOCK_ELEMENTS = 2**21  # low-precision head-gradient products, formed this many at a time
ADD_BLOCK_ELEMENTS = 2**18   # ... and added to the float32 accumulator this many at a time


@dataclass
class ChunkedLossOutput:
    """``weighted_sum``: 0-dim float32, ``kd_weight * kd + ce_weight * ce``, summed over valid
    tokens (not normalized), differentiable w.r.t. student hidden states, head and bias.
    ``term_sums``: raw detached sums of the terms with weight > 0 (``"kd"``, ``"ce"``).
    ``n_valid``: 0-dim int64, number of rows with ``targets != -100``.
    """

    weighted_sum: torch.Tensor
    n_valid: torch.Tensor
    term_sums: Dict[str, torch.Tensor] = field(default_factory=dict)


def choose_chunk_size(n_rows: int, student_columns: int, teacher_columns: int, *,
                      element_size: int = 4, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
                      chunk_size: Optional[int] = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else ``memory_budget_mb`` over the bytes of one
    row, ``(student_columns + teacher_columns) * element_size * ROW_FACTOR``, clamped to
    ``[1, min(n_rows, MAX_CHUNK_ROWS)]`` and evened out over the chunks. ``element_size``:
    bytes of the matmul dtype (2 for bf16)."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return max(1, min(chunk_size, n_rows))
    if not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb!r}")
    per_row = (student_columns + teacher_columns) * element_size * ROW_FACTOR
    rows = max(1, min(int(memory_budget_mb * 2**20 // max(per_row, 1)), MAX_CHUNK_ROWS, n_rows))
    chunks = -(-n_rows // rows)  # then even chunks: 2048 rows at most 498 -> 5 x 410, not 4 x 498 + 56
    return max(1, -(-n_rows // chunks)) if n_rows else 1


def _softcap(z: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """Gemma-2/3 ``final_logit_softcapping``: ``cap * tanh(z / cap)``, as transformers applies it."""
    return z if cap is None else torch.tanh(z / cap) * cap


@dataclass
class _Spec:
    divergence: str
    temperature: float
    beta: float
    alpha: float
    kd_weight: float
    ce_weight: float
    shared_vocab: int
    student_softcap: Optional[float]
    teacher_softcap: Optional[float]
    chunk_size: Optional[int]
    memory_budget_mb: float
    compute_dtype: Optional[torch.dtype]  # autocast dtype, or None for the inputs' dtype
    # The divergence's own parameters as sorted (key, value) items (hashable), as given: the
    # defaults are filled in by per_token_divergence.
    params: Tuple[Tuple[str, Any], ...] = ()

    @property
    def closed_form(self) -> bool:
        """Forward KL (jsd at beta=0 is forward KL) and CE: gradient ``softmax - target``."""
        return self.kd_weight == 0 or self.divergence == "fkl" or (
            self.divergence == "jsd" and self.beta == 0.0)



def _workers(device: torch.device) -> int:
    """Threads for the stretches of many small ops (CPU only)."""
    return torch.get_num_threads() if device.type == "cpu" else 1


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY = (0, 0)  # (process id, size): a forked child starts its own threads
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """``size`` threads, each running torch ops on one intra-op thread.

    Why: the softmax blocks and accumulator adds are many small ops. Run with several
    intra-op threads, each op ends in an OpenMP barrier, and when another process holds a
    core every barrier waits for a time slice (measured on this 2-core machine with a
    training job beside it: 1.7 ms instead of 34 us per op; 2 s of block loops became 35 s).
    Independent rows on independent threads need no barrier. The matmuls keep all threads.
    """
    global _POOL, _POOL_KEY
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != (os.getpid(), size):
            if _POOL is not None and _POOL_KEY[0] == os.getpid():
                _POOL.shutdown(wait=False)
            main_threads = torch.get_num_threads()
            ready = threading.Barrier(size)

            def init():
                torch.set_num_threads(1)  # this thread's OpenMP / MKL setting
                ready.wait()

            _POOL = ThreadPoolExecutor(size, thread_name_prefix="potstill-chunked", initializer=init)
            list(_POOL.map(lambda _: None, range(size)))  # start all threads now
            torch.set_num_threads(main_threads)  # the process-wide default, as it was
            _POOL_KEY = (os.getpid(), size)
        return _POOL


# At most this many row blocks run inline, on the calling thread. Handing a few blocks to the pool
# costs more than it saves, and after the pool has run torch ops the process's next matmuls are
# slower for a while (measured on 2 cores: an on-policy step of the quickstart pair, ~8 blocks of
# 64 x 8192, took 0.33 s for the loss step and 0.37 s for the next generation with the pool, 0.16
# and 0.16 s inline; bench/onpolicy.py). Large losses (hundreds of blocks) keep the pool.
POOL_MIN_BLOCKS = 16


def _map_rows(fn, n: int, block: int, workers: int) -> list:
    """``fn(worker, lo, hi)`` over contiguous, ``block``-aligned pieces of ``range(n)``, one
    piece per worker thread (inline when one worker suffices or the blocks are few)."""
    blocks = -(-n // block)
    if workers <= 1 or blocks <= POOL_MIN_BLOCKS:
        return [fn(0, 0, n)]
    per = -(-blocks // min(workers, blocks)) * block
    pieces = [(i, lo, min(lo + per, n)) for i, lo in enumerate(range(0, n, per))]
    return list(_pool(workers).map(lambda piece: fn(*piece), pieces))


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """Row log-softmax written over ``x`` (the CPU kernel reads each row before writing it)."""
    if x.device.type == "cpu":
        return torch.log_softmax(x, dim=-1, out=x)
    return x.copy_(torch.log_softmax(x, dim=-1))


def _view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view at the start of the flat buffer ``buf``."""
    return buf[: rows * cols].view(rows, cols)


def _closed_form_block(z, t, tgt, spec: _Spec, scratch):
    """Forward KL and/or CE of a block of rows with the closed-form logit gradient.

    ``z`` (r, Vz) student logits (bias and softcap applied), ``t`` (r, V) teacher logits or
    None, ``tgt`` (r,). Same math as ``per_token_divergence("fkl")`` and ``cross_entropy``:
    float32 log-softmax of the tempered logits. Returns ``(g, scale, kd_sum, ce_sum)``:
    ``scale * g`` (r, Vz) float32 is the gradient of ``kd_weight * kd + ce_weight * ce``
    w.r.t. ``z`` (the scale is applied after the matmuls, on smaller tensors).
    """
    r, vz = z.shape
    v, T = spec.shared_vocab, spec.temperature
    kd_sum = ce_sum = None
    a = _view(scratch[0], r, vz)
    if t is not None:
        ls = _view(scratch[0], r, v)
        ls.copy_(z[:, :v])
        lt = _view(scratch[1], r, v)
        lt.copy_(t)
        if T != 1.0:
            ls.div_(T)
            lt.div_(T)
        _log_softmax_(ls)
        _log_softmax_(lt)
        pt = _view(scratch[2], r, v)
        torch.exp(lt, out=pt)
        shared = spec.ce_weight > 0 and T == 1.0 and v == vz
        if shared:  # CE uses the same log-softmax
            ce_sum = -ls.gather(1, tgt.unsqueeze(1)).sum()
        kd_sum = torch.dot(pt.view(-1), lt.sub_(ls).view(-1))  # sum p_t (log p_t - log p_s)
        if not torch.isfinite(kd_sum):  # -inf logits (0 log 0) or NaN: the reference decides
            kd_sum = per_token_divergence("fkl", z[:, :v], t, temperature=T).sum()
        ls.exp_().sub_(pt)  # p_s - p_t = T * d kd / d z
        if spec.ce_weight == 0:
            return ls, spec.kd_weight / T, kd_sum, None
        if shared:
            # kd_w (p - p_t) + ce_w (p - onehot) = s [(p - p_t) + (ce_w/s) (p_t - onehot)]
            s = spec.kd_weight + spec.ce_weight
            ls.add_(pt, alpha=spec.ce_weight / s)
            ls.scatter_add_(1, tgt.unsqueeze(1), ls.new_full((r, 1), -spec.ce_weight / s))
            return ls, s, kd_sum, ce_sum
        a = _view(scratch[1], r, vz)
    a.copy_(z)
    _log_softmax_(a)
    ce_sum = -a.gather(1, tgt.unsqueeze(1)).sum()
    a.exp_().scatter_add_(1, tgt.unsqueeze(1), a.new_full((r, 1), -1.0))  # p - onehot
    if t is not None:  # + (kd_w / T) / ce_w * (p_s - p_t) on the shared columns
        a[:, :v].add_(ls, alpha=spec.kd_weight / (T * spec.ce_weight))
    return a, spec.ce_weight, kd_sum, ce_sum


def _autograd_block(z, t, tgt, spec: _Spec):
    """Any divergence: the block loss through ``per_token_divergence`` / ``cross_entropy``,
    differentiated by autograd on this block only. ``z`` (r, Vz) requires grad; ``tgt`` (r,)
    the block's label ids (all valid), for CE and for ``token_rkl``."""
    kd_sum = ce_sum = None
    loss = 0.0
    if t is not None:
        # targets: token_rkl reads the label's log-probs (the other divergences ignore them).
        kd_sum = per_token_divergence(spec.divergence, z[:, :spec.shared_vocab], t,
                                      temperature=spec.temperature, beta=spec.beta, alpha=spec.alpha,
                                      targets=tgt, params=dict(spec.params) or None).sum()
        loss = spec.kd_weight * kd_sum
    if spec.ce_weight > 0:
        ce_sum, _ = cross_entropy(z, tgt, ignore_index=IGNORE_INDEX)
        loss = loss + spec.ce_weight * ce_sum
    return loss, kd_sum, ce_sum


def _chunk_logit_grads(raw, traw, tgt, spec: _Spec, closed: bool, block_rows: int, scratch, workers: int):
    """Overwrites ``raw`` (c, Vz), the chunk's raw student logits (bias included), with the
    gradient w.r.t. them divided by ``scale``, block by block. ``traw`` (c, V) raw teacher
    logits or None. Returns ``(scale, kd_sum, ce_sum)`` of the chunk."""

    def rows(worker: int, lo: int, hi: int):
        kd_total = ce_total = None
        scale = 1.0
        for r0 in range(lo, hi, block_rows):
            r1 = min(r0 + block_rows, hi)
            u, tgt_b = raw[r0:r1], tgt[r0:r1]
            t = None if traw is None else _softcap(traw[r0:r1], spec.teacher_softcap)
            if spec.student_softcap is not None or not closed:
                u_leaf = u.detach().requires_grad_()
                with torch.enable_grad():
                    z = _softcap(u_leaf, spec.student_softcap)
                    if closed:
                        g, scale, kd, ce = _closed_form_block(z.detach(), t, tgt_b, spec, scratch[worker])
                        (g,) = torch.autograd.grad(z, u_leaf, g.to(z.dtype))  # through the tanh
                    else:
                        loss, kd, ce = _autograd_block(z, t, tgt_b, spec)
                        (g,) = torch.autograd.grad(loss, u_leaf)
                del z, u_leaf
            else:
                g, scale, kd, ce = _closed_form_block(u, t, tgt_b, spec, scratch[worker])
            u.copy_(g)
            if kd is not None:
                kd_total = kd.detach() if kd_total is None else kd_total + kd.detach()
            if ce is not None:
                ce_total = ce.detach() if ce_total is None else ce_total + ce.detach()
        return scale, kd_total, ce_total

    parts = _map_rows(rows, raw.shape[0], block_rows, workers)
    kd = [p[1] for p in parts if p[1] is not None]
    ce = [p[2] for p in parts if p[2] is not None]
    return parts[0][0], (sum(kd) if kd else None), (sum(ce) if ce else None)


def group_aligned_rows(spec: _Spec, chunk: int, block_rows: int) -> Tuple[int, int]:
    """``(chunk, block_rows)`` with whole ``sinkhorn`` groups in every chunk and row block.

    sinkhorn's per-token value depends on the other rows of its group of ``sinkhorn_rows``
    consecutive valid rows, so a chunk or block boundary inside a group would change the loss:
    both are rounded to multiples of the group size (the chunk up, the block down, at least one
    group), so the chunked path groups exactly the rows the plain path groups. Memory: a chunk
    can then exceed the budget by up to a group of rows, and a block is at least one group, whose
    autograd keeps a few float32 (g, V) tensors (g = 64, V = 128k: ~32 MB each), more than the
    ~1 MB cache-sized blocks of the other divergences; no g x g x V tensor (see losses/sinkhorn.py).
    Other divergences: unchanged."""
    if spec.divergence != "sinkhorn" or spec.kd_weight == 0:
        return chunk, block_rows
    g = check_divergence_params("sinkhorn", dict(spec.params))["sinkhorn_rows"]
    chunk = -(-chunk // g) * g
    return chunk, min(chunk, max(g, block_rows // g * g))


def _head_block(vz: int, hs: int, device) -> int:
    # Multi-threaded matmul calls pay a barrier each: fewer, larger ones then (see _pool).
    elements = HEAD_BLOCK_ELEMENTS * (4 if _workers(device) > 1 else 1)
    return max(1, min(vz, elements // hs))


def _add_head_grad(acc, g, h, scale: float, partial, workers: int) -> None:
    """``acc[:Vz] += scale * g.T @ h`` for low-precision ``g`` (c, Vz) and ``h`` (c, Hs): the
    products on the matrix units in blocks of head rows (no (Vs, Hs) low-precision temporary),
    summed in the float32 ``acc``."""
    vz, hs = g.shape[1], h.shape[1]
    head_block = partial.numel() // hs
    add_rows = max(1, ADD_BLOCK_ELEMENTS // hs)
    for r0 in range(0, vz, head_block):
        r1 = min(r0 + head_block, vz)
        p = torch.mm(g.T[r0:r1], h, out=_view(partial, r1 - r0, hs))

        def add(_worker, lo, hi, r0=r0, p=p):  # mixed-dtype adds: bounded cast temporaries
            for s0 in range(lo, hi, add_rows):
                s1 = min(s0 + add_rows, hi)
                acc[r0 + s0:r0 + s1].add_(p[s0:s1], alpha=scale)
        _map_rows(add, r1 - r0, add_rows, workers)


class _ChunkedDistill(torch.autograd.Function):
    """Inputs: student_hidden (N, Hs), student_head (Vs, Hs), student_bias (Vs,) | None,
    teacher_hidden (N, Ht) | None, teacher_head (Vt, Ht) | None, teacher_bias (Vt,) | None,
    targets (N,) int64, spec. Outputs: weighted_sum, kd_sum, ce_sum (0-dim; the last two
    not differentiable)."""

    @staticmethod
    def forward(ctx, student_hidden, student_head, student_bias, teacher_hidden, teacher_head,
                teacher_bias, targets, spec: _Spec):
        device = student_hidden.device
        acc_dtype = torch.float64 if student_head.dtype == torch.float64 else torch.float32
        cdt = spec.compute_dtype or student_head.dtype
        use_kd, use_ce = spec.kd_weight > 0, spec.ce_weight > 0
        v = spec.shared_vocab
        # Student head rows the loss touches: all of Vs for CE, else only the shared ones
        # (the others get exactly zero gradient, as in the plain path).
        vz = student_head.shape[0] if use_ce else v
        hs = student_head.shape[1]
        W = student_head[:vz].to(cdt)
        b = None if student_bias is None else student_bias[:vz].to(cdt)
        tW = tb = None
        if use_kd:
            tW = teacher_head[:v].to(spec.compute_dtype or teacher_head.dtype)
            tb = None if teacher_bias is None else teacher_bias[:v].to(tW.dtype)
        # float64 (gradcheck): the reference math throughout; the closed form is float32.
        closed = spec.closed_form and acc_dtype == torch.float32

        rows_all = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        n = rows_all.numel()
        chunk = choose_chunk_size(n, vz, v if use_kd else 0, element_size=W.element_size(),
                                  memory_budget_mb=spec.memory_budget_mb, chunk_size=spec.chunk_size)
        width = max(vz, v)
        if device.type == "cpu":
            key = "closed_form" if closed else "autograd"
            block_rows = max(1, min(chunk, BLOCK_ELEMENTS[key] // width))
        else:
            block_rows = chunk
        chunk, block_rows = group_aligned_rows(spec, chunk, block_rows)

        raw_buf = torch.empty(min(chunk, n) * vz, dtype=cdt, device=device)
        traw_buf = torch.empty(min(chunk, n) * v, dtype=tW.dtype, device=device) if use_kd else None
        workers = _workers(device)
        scratch = [[torch.empty(block_rows * width, dtype=torch.float32, device=device)
                    for _ in range(3 if use_kd else 1)] if closed else None
                   for _ in range(min(workers, -(-max(chunk, 1) // block_rows)))]

        grad_hidden = torch.zeros_like(student_hidden)
        grad_head_acc = torch.zeros(student_head.shape, dtype=acc_dtype, device=device)
        grad_bias_acc = (None if student_bias is None
                         else torch.zeros(student_bias.shape, dtype=acc_dtype, device=device))
        head_block = _head_block(vz, hs, device)
        partial = None
        kd_total = torch.zeros((), dtype=acc_dtype, device=device)
        ce_total = torch.zeros((), dtype=acc_dtype, device=device)
        all_valid = n == student_hidden.shape[0]

        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            c = stop - start
            rows = rows_all[start:stop]
            if all_valid:  # no gather copies when nothing is masked
                h = student_hidden[start:stop].to(cdt)
                th = teacher_hidden[start:stop].to(tW.dtype) if use_kd else None
            else:
                h = student_hidden.index_select(0, rows).to(cdt)
                th = teacher_hidden.index_select(0, rows).to(tW.dtype) if use_kd else None
            raw = _view(raw_buf, c, vz)
            torch.mm(h, W.T, out=raw) if b is None else torch.addmm(b, h, W.T, out=raw)
            traw = None
            if use_kd:
                traw = _view(traw_buf, c, v)
                torch.mm(th, tW.T, out=traw) if tb is None else torch.addmm(tb, th, tW.T, out=traw)
            scale, kd, ce = _chunk_logit_grads(raw, traw, targets.index_select(0, rows), spec, closed,
                                               block_rows, scratch, workers)
            if kd is not None:
                kd_total += kd.to(acc_dtype)
            if ce is not None:
                ce_total += ce.to(acc_dtype)
            g = raw  # now d loss / d logits, divided by `scale`
            gh = g @ W
            if scale != 1.0:
                gh.mul_(scale)
            grad_hidden.index_copy_(0, rows, gh.to(grad_hidden.dtype))
            if g.dtype == acc_dtype:
                grad_head_acc[:vz].addmm_(g.T, h, alpha=scale)
            else:
                if partial is None:
                    partial = torch.empty(head_block * hs, dtype=g.dtype, device=device)
                _add_head_grad(grad_head_acc, g, h, scale, partial, workers)
            if grad_bias_acc is not None:
                grad_bias_acc[:vz].add_(g.sum(0, dtype=acc_dtype), alpha=scale)
            del g, h, th, raw, traw

        del raw_buf, traw_buf, scratch, partial
        total = torch.zeros((), dtype=acc_dtype, device=device)
        if use_kd:
            total = total + spec.kd_weight * kd_total
        if use_ce:
            total = total + spec.ce_weight * ce_total
        if grad_head_acc.dtype == student_head.dtype:
            grad_head = grad_head_acc
        else:
            grad_head = grad_head_acc.to(student_head.dtype)
            del grad_head_acc
        grad_bias = None if grad_bias_acc is None else grad_bias_acc.to(student_bias.dtype)
        ctx.save_for_backward(grad_hidden, grad_head, grad_bias)
        ctx.mark_non_differentiable(kd_total, ce_total)
        return total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_output, _grad_kd=None, _grad_ce=None):
        grad_hidden, grad_head, grad_bias = ctx.saved_tensors
        # Skip three full-size multiplications in the common case (loss.backward()).
        if not (grad_output.device.type == "cpu" and bool(grad_output == 1)):
            go = grad_output
            grad_hidden = grad_hidden * go.to(grad_hidden.dtype)
            grad_head = grad_head * go.to(grad_head.dtype)
            grad_bias = None if grad_bias is None else grad_bias * go.to(grad_bias.dtype)
        return grad_hidden, grad_head, grad_bias, None, None, None, None, None


def _check_inputs(student_hidden, student_head, targets, teacher_hidden, teacher_head,
                  student_bias, teacher_bias, use_kd):
    if student_hidden.dim() != 2 or student_head.dim() != 2:
        raise ValueError(f"student_hidden must be (N, Hs) and student_head (Vs, Hs), got "
                         f"{tuple(student_hidden.shape)} and {tuple(student_head.shape)}")
    if student_head.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"student_head {tuple(student_head.shape)} does not match hidden size "
                         f"{student_hidden.shape[1]} of student_hidden")
    if targets.shape != student_hidden.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be ({student_hidden.shape[0]},)")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if student_bias is not None and student_bias.shape != student_head.shape[:1]:
        raise ValueError(f"student_bias shape {tuple(student_bias.shape)} != ({student_head.shape[0]},)")
    if not use_kd:
        return
    if teacher_hidden is None or teacher_head is None:
        raise ValueError("kd_weight > 0 needs teacher_hidden and teacher_head")
    if teacher_hidden.dim() != 2 or teacher_head.dim() != 2 or teacher_head.shape[1] != teacher_hidden.shape[1]:
        raise ValueError(f"teacher_hidden must be (N, Ht) and teacher_head (Vt, Ht), got "
                         f"{tuple(teacher_hidden.shape)} and {tuple(teacher_head.shape)}")
    if teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows, student_hidden "
                         f"{student_hidden.shape[0]}: rows must be aligned")
    if teacher_bias is not None and teacher_bias.shape != teacher_head.shape[:1]:
        raise ValueError(f"teacher_bias shape {tuple(teacher_bias.shape)} != ({teacher_head.shape[0]},)")


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    targets: torch.Tensor,
    *,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[torch.Tensor] = None,
    divergence: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    shared_vocab: Optional[int] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    params: Optional[Mapping[str, Any]] = None,
) -> ChunkedLossOutput:
    """Distillation loss from hidden states and output heads, walked in chunks of tokens.

    Shapes: ``student_hidden`` (N, Hs) final hidden states (after the final norm), rows
    aligned with ``targets`` (N,) int64 next-token ids (-100 = ignored); ``student_head``
    (Vs, Hs); ``teacher_hidden`` (N, Ht) and ``teacher_head`` (Vt, Ht), needed only when
    ``kd_weight > 0``; biases (V,). Leading dims beyond N may be flattened by the caller.

    Equals the plain path: with ``s = student_hidden @ student_head.T (+ bias, softcap)``
    and ``t`` likewise, ``weighted_sum = kd_weight * logit_divergence(divergence, s[:, :V],
    t[:, :V], targets != -100, targets=targets)[0] + ce_weight * cross_entropy(s, targets)[0]``, with
    ``V = shared_vocab or min(Vs, Vt)``. ``kd_weight`` already includes any T^2 factor.
    ``chunk_size`` rows per chunk, else chosen from ``memory_budget_mb`` (for ``sinkhorn``
    rounded up to whole groups of ``sinkhorn_rows``). ``params``: the divergence's own
    parameters, as for ``logit_divergence``.
    """
    check_loss_options(divergence, temperature, beta, alpha, kd_weight, ce_weight, params)
    use_kd, use_ce = kd_weight > 0, ce_weight > 0
    _check_inputs(student_hidden, student_head, targets, teacher_hidden, teacher_head,
                  student_bias, teacher_bias, use_kd)
    vs = student_head.shape[0]
    limit = min(vs, teacher_head.shape[0]) if use_kd else vs
    v = limit if shared_vocab is None else shared_vocab
    if not 1 <= v <= limit:
        raise ValueError(f"shared_vocab must be in [1, {limit}] (the smaller head), got {shared_vocab!r}")
    choose_chunk_size(1, 1, 1, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb)  # validate
    for name, cap in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if cap is not None and not cap > 0:
            raise ValueError(f"{name} must be > 0 or None, got {cap!r}")

    device_type = student_hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type)
                     if torch.is_autocast_enabled(device_type) else None)
    spec = _Spec(divergence, float(temperature), float(beta), float(alpha), float(kd_weight),
                 float(ce_weight), v, student_softcap, teacher_softcap, chunk_size,
                 float(memory_budget_mb), compute_dtype, spec_params(params))
    with torch.autocast(device_type, enabled=False):
        total, kd_sum, ce_sum = _ChunkedDistill.apply(
            student_hidden, student_head, student_bias,
            teacher_hidden.detach() if use_kd else None,
            teacher_head.detach() if use_kd else None,
            None if (teacher_bias is None or not use_kd) else teacher_bias.detach(),
            targets, spec)
    return loss_output(total, kd_sum if use_kd else None, ce_sum if use_ce else None, targets)


def check_loss_options(divergence: str, temperature: float, beta: float, alpha: float,
                       kd_weight: float, ce_weight: float,
                       params: Optional[Mapping[str, Any]] = None) -> None:
    """The option checks shared by the chunked and the fused-logits paths."""
    _check_name(divergence)
    _check_temperature(temperature)
    _check_unit("beta", beta)
    _check_unit("alpha", alpha)
    check_divergence_params(divergence, params)
    if kd_weight < 0 or ce_weight < 0:
        raise ValueError(f"kd_weight and ce_weight must be >= 0, got {kd_weight!r}, {ce_weight!r}")


def spec_params(params: Optional[Mapping[str, Any]]) -> Tuple[Tuple[str, Any], ...]:
    """``params`` as the sorted, hashable items ``_Spec.params`` holds."""
    return tuple(sorted(dict(params or {}).items()))


def loss_output(total: torch.Tensor, kd_sum: Optional[torch.Tensor], ce_sum: Optional[torch.Tensor],
                targets: torch.Tensor) -> ChunkedLossOutput:
    """Package the sums; a term that is off (None) is left out of ``term_sums``."""
    terms: Dict[str, torch.Tensor] = {}
    if kd_sum is not None:
        terms["kd"] = kd_sum
    if ce_sum is not None:
        terms["ce"] = ce_sum
    return ChunkedLossOutput(weighted_sum=total, n_valid=(targets != IGNORE_INDEX).sum(), term_sums=terms)
