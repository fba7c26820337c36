"""Per-device memory of a run, estimated from configs alone (``potstill plan``).

Nothing here reads or allocates a weight: the models are built from their configs on the meta
device (:func:`model_shape`) to count their parameters exactly, and everything else is
arithmetic over those counts and the run config (:func:`estimate`). All sizes are bytes per
device (per process on CPU, where a "device" is a process of the node).

What one process holds, by part (P = student parameters, N = processes):

``weights``      the student's float32 master weights (4 P; under FSDP 4 P / N plus the units
                 gathered at a time: the root group (embeddings, final norm, head), which FSDP2
                 keeps gathered after the forward, and about two decoder layers in flight, in
                 the gathered dtype), plus the bf16 working copies that autocast keeps of every
                 weight a forward multiplies with (2 bytes each, alive until backward frees them)
``gradients``    float32, 4 P (FSDP: 4 P / N plus one unit's unsharded gradient); DDP over
                 several processes also keeps its gradient buckets (another 4 P)
``optimizer``    AdamW's two float32 moments, 8 P (FSDP: / N), plus the step's temporaries
``teacher``      a local teacher's weights in its dtype (FSDP: / N plus its gathered units;
                 int8 / int4 weights stay whole everywhere), its forward's working set and
                 output; a cached or served teacher: its sparse rows of the micro-batch
``activations``  what the student's forward keeps for backward, per micro-batch; with
                 activation checkpointing, each layer's input and one layer recomputed
``loss``         the chunked loss's buffers (chunk logits, row-block scratch, head-gradient
                 accumulator, hidden-state gradient); on the plain path the full logits
``runtime``      what the process holds before any model (Python, torch, transformers,
                 datasets, the tokenized data): measured, not estimated (``potstill plan`` reads
                 its own RSS after importing what a run imports, plus RUN_SETUP_BYTES); on CUDA,
                 where the measured peak is ``torch.cuda.max_memory_allocated``, a CUDA context
                 counted against the device's memory when deciding what fits

The peak is the largest of a step's phases (teacher forward, end of the loss's forward, end of
backward, optimizer step) and of loading the models. Each phase is what the process holds
throughout (runtime, master weights, AdamW state, teacher weights) plus the live bytes the phase
adds, times the resident bytes a live byte costs on CPU (CPU_HEAP_RETENTION: glibc keeps freed
blocks). Constants measured on this project's CPU are marked where they are defined;
``bench/plan.py`` checks the totals against the measured peak of real runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

MB = 2**20
GB = 2**30

# Bytes of one element by precision of the compute (autocast) dtype.
COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Saved-for-backward bytes per token of one Llama-style decoder layer (pre-norm attention with
# rotary embeddings and sdpa, gated MLP), as coefficients of (H, Hq, Hkv, I, heads): H the hidden
# size, Hq = heads * head_dim, Hkv = kv_heads * head_dim, I the MLP width. Counted with
# torch.autograd.graph.saved_tensors_hooks (unique storages, weights and their bf16 casts left
# out) on LlamaForCausalLM (transformers 5.24, torch 2.13, sdpa on CPU), H=256, I=704, 8 heads,
# 4 kv heads, 4 x 128 tokens: fp32 21051 bytes/token/layer against 21000 from these coefficients,
# bf16 autocast 14250 against 14336 (tests/unit/test_plan.py checks another shape, 8 and 2 kv
# heads, within 10%). The residual stream, the norms' outputs and the softmax
# statistics stay float32 under autocast; the linear layers' inputs and outputs are bf16.
ACT_COEF = {
    "fp32": {"H": 30, "Hq": 4, "Hkv": 8, "I": 16, "heads": 4},
    "bf16": {"H": 30, "Hq": 2, "Hkv": 4, "I": 8, "heads": 4},
}
# Eager attention (attn_implementation="eager") also keeps the (heads, T, T) scores: the
# softmax output in the compute dtype and its float32 input.
EAGER_SCORE_BYTES = {"fp32": 8, "bf16": 6}
# Working set of one layer of a forward under no_grad (the teacher's), per token, in units of
# the dtype: the residual, the norm, q/k/v, the attention output and three MLP-wide tensors.
TEACHER_WORKING_COEF = {"H": 6, "I": 3}
# CPU resident memory (what peak_mem_mb measures there) is not live tensors alone. glibc serves
# blocks up to its mmap threshold (which rises to the largest block freed, at most 32 MiB) from
# its heaps, and keeps freed heap blocks for reuse instead of returning them, so the memory of a
# step's transient tensors (activations, loss buffers, gradients) ends up larger than their live
# peak: the next phases place their blocks into the holes only in part. Measured on bench/plan.py
# (the 130M -> 38M pair and an 8M student, 4 steps; fp32 and bf16, micro-batches 4 to 32, local,
# cached and no teacher, chunked and plain, DDP and FSDP over 2): resident transient / live
# transient from 1.14 to 1.8, and the same run repeated varies by up to 10% of its peak (8M
# student, 32 x 256 bf16: 2845 to 3176 MB over four runs); 1.45 sits in the middle. With
# activation checkpointing the recomputation in backward fragments more: 2.35 (two runs, 1.85 and
# 3.03; it also creeps up over the first ten steps, +5% from step 3 to 10). On CUDA the caching
# allocator's slack is not in torch.cuda.max_memory_allocated: 1.
CPU_HEAP_RETENTION = 1.45
CPU_HEAP_RETENTION_CHECKPOINTING = 2.35
GLIBC_MMAP_THRESHOLD_MAX = 32 * MB
# What a run holds before its first step beyond the modules it imports (the tokenizer, the
# tokenized data, the first kernels' buffers): a tiny run peaked at 514 MB where the plan's own
# RSS after the same imports was 492 MB; the 130M -> 38M runs started their first step about
# 40 MB above it.
RUN_SETUP_BYTES = 40 * MB
# A CUDA context and the caching allocator's slack, counted against a GPU's memory (not in
# torch.cuda.max_memory_allocated); a round figure, not measured here (no GPU on this machine).
CUDA_CONTEXT_BYTES = 1 * GB

# From potstill.losses: chunked.BLOCK_ELEMENTS / HEAD_BLOCK_ELEMENTS and sparse_chunked's block;
# imported lazily in _loss_buffers so that this module stays importable without the losses.
SPARSE_CHUNK_ROWS = 512


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a causal LM, counted on its meta-device build.

    ``params``: all parameters (tied ones once); ``layer_params``: one decoder layer (the
    largest); ``root_params``: the rest (embeddings, final norm, head); ``embed_params``: the
    input embeddings (not multiplied under autocast, so no bf16 copy); ``linear_params``: the
    decoder layers' linear weights (what int8 / int4 quantization replaces)."""

    model_class: str
    model_type: str
    params: int
    layers: int
    layer_params: int
    root_params: int
    embed_params: int
    head_params: int
    linear_params: int
    linear_out_features: int   # sum of out_features over the decoder layers' linear layers (int8 scales)
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int                 # rows of the output head
    tied: bool
    chunked_ok: bool           # the chunked loss reproduces its logits (models.hidden.supports_chunked)
    chunked_why: str = ""
    attn_implementation: str = "sdpa"
    dtype: str | None = None   # the dtype its config names (torch_dtype / dtype), if any
    trained_params: int | None = None  # what trains (LoRA adapters, unfrozen parts); None: all of params

    @property
    def trained(self) -> int:
        return self.params if self.trained_params is None else self.trained_params

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def with_layers(self, layers: int) -> "ModelShape":
        """The same model with ``layers`` decoder layers (a cut from the teacher)."""
        drop = self.layers - layers
        per_layer_linear = self.linear_params // max(self.layers, 1)
        per_layer_out = self.linear_out_features // max(self.layers, 1)
        return replace(self, layers=layers, params=self.params - drop * self.layer_params,
                       linear_params=per_layer_linear * layers, linear_out_features=per_layer_out * layers)


def model_shape(config: Any) -> ModelShape:
    """Count a transformers config's model on the meta device: no weights are allocated or read."""
    import torch
    from transformers import AutoModelForCausalLM

    from .hidden import supports_chunked
    from .layers import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    _, layers = decoder_layers(model)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_params = embed.weight.numel() if embed is not None else 0
    tied = head is not None and embed is not None and head.weight is embed.weight
    head_params = 0 if head is None or tied else sum(p.numel() for p in head.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden)
    vocab = head.weight.shape[0] if head is not None else int(text.vocab_size)
    chunked_head, why = supports_chunked(model)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return ModelShape(
        model_class=type(model).__name__, model_type=str(getattr(config, "model_type", "?")), params=params,
        layers=len(layers), layer_params=layer_params, root_params=params - len(layers) * layer_params,
        embed_params=embed_params, head_params=head_params,
        linear_params=sum(m.weight.numel() for m in linears),
        linear_out_features=sum(m.out_features for m in linears),
        hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        vocab=int(vocab), tied=tied, chunked_ok=chunked_head is not None, chunked_why=why,
        attn_implementation=str(getattr(config, "_attn_implementation", None) or "sdpa"),
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None)


@dataclass(frozen=True)
class Setting:
    """Everything besides the models that the memory of a run depends on.

    ``teacher``: "local" | "cache" | "served" | "none"; ``teacher_bytes``: bytes per teacher
    parameter of its floating-point weights (2 for bf16, 4 for fp32); ``quantization``: "none" |
    "int8" | "int4"; ``loss_path``: "chunked" | "plain"; ``kd``/``ce``: the logit and
    cross-entropy terms are on; ``top_k``: teacher ids per token of a cache or server;
    ``threads``: the loss's worker threads (CPU: torch's intra-op threads); ``runtime``: bytes a
    process holds before any model (measured)."""

    batch_size: int
    seq_len: int
    precision: str                       # bf16 | fp16 | fp32 (resolved)
    strategy: str = "ddp"                # ddp | fsdp
    devices: int = 1
    device_type: str = "cpu"             # cpu | cuda
    grad_accum: int = 1
    checkpointing: bool = False
    teacher: str = "local"
    teacher_bytes: int = 4
    quantization: str = "none"
    loss_path: str = "chunked"
    kd: bool = True
    ce: bool = False
    divergence: str = "fkl"
    beta: float = 0.5
    top_k: int = 0
    lookahead: int = 0
    memory_budget_mb: float = 512.0
    chunk_size: int | None = None
    features: int = 0                    # feature-term layer pairs (loss.hidden / loss.attention)
    balanced_terms: int = 0              # terms whose gradients a balancer keeps apart (training/balance.py)
    fsdp_reshard: bool = True
    fsdp_mixed_precision: bool = False   # FSDP2's bf16 policy (then no autocast copies)
    fsdp_offload: bool = False           # train.fsdp.cpu_offload (CUDA only): shards in host memory
    threads: int = 1
    runtime: int = 0


@dataclass
class Estimate:
    """Bytes per device of each part, and the peak. ``parts`` are the lines of the plan's table;
    ``phases`` the totals of each moment of a step (and loading) whose largest is ``total``."""

    parts: dict[str, int]
    phases: dict[str, int]
    total: int
    checkpointing: bool
    held: int = 0                                         # what the process holds throughout
    transient: dict[str, int] = field(default_factory=dict)  # live bytes each phase adds to it
    retention: float = 1.0                                # resident / live bytes of the transients
    host_loading: int = 0                                 # CUDA: host memory of the process while loading

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------
# The parts


def student_activations(s: ModelShape, tokens: int, precision: str, checkpointing: bool) -> int:
    """Bytes the student's decoder layers keep for backward over ``tokens`` = B x T tokens
    (sdpa attention: no T x T scores; :func:`_activations` adds eager attention's and the rest)."""
    coef = ACT_COEF["fp32" if precision == "fp32" else "bf16"]
    per_layer = (coef["H"] * s.hidden + coef["Hq"] * s.q_width + coef["Hkv"] * s.kv_width
                 + coef["I"] * s.intermediate + coef["heads"] * s.heads)
    if not checkpointing:
        return tokens * per_layer * s.layers
    # Non-reentrant checkpointing keeps each layer's float32 input; backward recomputes one layer
    # at a time, so one layer's activations exist on top.
    return tokens * (4 * s.hidden * s.layers + per_layer)


def _activations(s: ModelShape, st: Setting, checkpointing: bool) -> int:
    tokens = st.batch_size * st.seq_len
    act = student_activations(s, tokens, st.precision, checkpointing)
    # The embedding output and the final norm's (float32 hidden states the loss reads).
    act += tokens * 3 * 4 * s.hidden
    if s.attn_implementation == "eager":
        scores = st.batch_size * s.heads * st.seq_len ** 2 * EAGER_SCORE_BYTES["fp32" if st.precision == "fp32"
                                                                               else "bf16"]
        act += scores * (1 if checkpointing else s.layers)
    return act


def _autocast_copies(s: ModelShape, st: Setting) -> int:
    """bf16 copies of the student's weights that autocast makes in the forward and the graph
    keeps until backward: every multiplied weight (not the input embeddings)."""
    if st.precision == "fp32" or (st.strategy == "fsdp" and st.fsdp_mixed_precision):
        return 0
    return 2 * (s.params - s.embed_params + (s.embed_params if s.tied else 0))


def _gathered(s: ModelShape, bytes_per: float, reshard: bool) -> int:
    """FSDP: full weights held gathered at once: the root group and two layers in flight, or
    every layer when they are not resharded after the forward."""
    layers = s.layers if not reshard else min(2, s.layers)
    return int((s.root_params + layers * s.layer_params) * bytes_per)


def teacher_weight_bytes(t: ModelShape, st: Setting) -> int:
    """The teacher's weights on one process. int8: 1 byte per linear weight plus one scale per
    output row (torchao per-row); int4: half a byte plus a float32 scale and zero point per group
    of 128 (potstill.models.int4 on CPU). The head, embeddings and norms stay in the dtype."""
    if st.quantization == "none":
        whole = t.params * st.teacher_bytes
        if st.strategy == "fsdp":
            return int(whole / st.devices) + _gathered(t, st.teacher_bytes, True)
        return whole
    rest = (t.params - t.linear_params) * st.teacher_bytes
    if st.quantization == "int8":
        return rest + t.linear_params + t.linear_out_features * st.teacher_bytes
    return rest + t.linear_params // 2 + (t.linear_params // 128) * 8


def _teacher_forward(t: ModelShape | None, st: Setting) -> tuple[int, int]:
    """(working set of the teacher's forward, what it hands the loss) for one micro-batch."""
    tokens = st.batch_size * st.seq_len
    if st.teacher in ("cache", "served"):
        # Per valid token: k int64 ids and float32 log-probs, their renormalized copies, the rest;
        # a server's answers for ``lookahead`` steps ahead wait in memory too.
        rows = tokens * max(st.top_k, 1) * (8 + 4 + 4 + 4)
        ahead = rows * st.grad_accum * st.lookahead if st.teacher == "served" else 0
        return 0, rows + ahead
    if st.teacher != "local" or t is None or not (st.kd or st.features):
        return 0, 0
    tb = st.teacher_bytes
    working = tokens * (TEACHER_WORKING_COEF["H"] * t.hidden + TEACHER_WORKING_COEF["I"] * t.intermediate) * tb
    if st.loss_path == "chunked":
        out = tokens * t.hidden * tb
    else:
        out = tokens * t.vocab * tb
    if st.features:
        out += st.features * tokens * t.hidden * tb
    return working, out


def _loss_buffers(s: ModelShape, t: ModelShape | None, st: Setting) -> tuple[int, int]:
    """(peak of the loss's forward, what it keeps for backward) for one micro-batch."""
    from ..losses.chunked import BLOCK_ELEMENTS, HEAD_BLOCK_ELEMENTS, choose_chunk_size
    from ..losses.sparse_chunked import BLOCK_ELEMENTS as SPARSE_BLOCK

    n = st.batch_size * (st.seq_len - 1)  # rows with a next token
    cd = COMPUTE_BYTES[st.precision]
    hs = s.hidden
    cpu = st.device_type == "cpu"
    workers = st.threads if cpu else 1
    sparse = st.teacher in ("cache", "served") and st.kd
    use_kd = st.kd and st.teacher == "local" and t is not None
    use_ce = st.ce or not (st.kd or st.features)
    if st.loss_path == "plain":
        v = min(s.vocab, t.vocab) if use_kd else s.vocab
        vz = s.vocab if use_ce else v
        chunk = choose_chunk_size(n, vz, v if use_kd else 0, element_size=cd,
                                  memory_budget_mb=st.memory_budget_mb, chunk_size=st.chunk_size)
        logits = st.batch_size * st.seq_len * s.vocab * cd          # the student's logits
        grad = logits                                                # their gradient, written in the forward
        raw = min(chunk, n) * vz * cd
        scratch = _scratch(chunk, max(vz, v), use_kd, workers, cpu, st, BLOCK_ELEMENTS)
        head_grad = s.vocab * hs * 4 * 2                             # lm_head's gradient and its matmul
        keep = logits + grad
        return keep + raw + scratch, keep + head_grad
    if sparse:
        v = s.vocab
        rows = min(SPARSE_CHUNK_ROWS, n)
        selected = n * hs * 4                                        # hidden[:, :-1][mask]: a copy
        casts = (v * hs * cd + n * hs * cd) if cd != 4 else 0         # head and hidden in the compute dtype
        grad_h, grad_w = n * hs * 4, v * hs * 4
        bufs = rows * v * cd + rows * v * 4 + (rows * v * cd if cd != 4 else 0)
        blocks = workers * 4 * SPARSE_BLOCK * 4 if cpu else 4 * rows * v * 4
        head_step = v * hs * (cd + 4)                                 # (g.T @ h) then .float(), per chunk
        teacher_side = n * max(st.top_k, 1) * 12
        peak = selected + casts + grad_h + grad_w + bufs + blocks + head_step + teacher_side
        return peak, grad_h + grad_w
    # Dense chunked: a local teacher's hidden states, or cross-entropy alone.
    v = min(s.vocab, t.vocab) if use_kd else s.vocab
    vz = s.vocab if use_ce else v
    chunk = choose_chunk_size(n, vz, v if use_kd else 0, element_size=cd,
                              memory_budget_mb=st.memory_budget_mb, chunk_size=st.chunk_size)
    c = min(chunk, n)
    tdt = cd if cd != 4 else st.teacher_bytes
    raw = c * vz * cd + (c * v * tdt if use_kd else 0)
    scratch = _scratch(chunk, max(vz, v), use_kd, workers, cpu, st, BLOCK_ELEMENTS)
    inputs = n * hs * 4 + (n * t.hidden * st.teacher_bytes if use_kd else 0)  # [:, :-1].reshape copies
    grad_hidden = n * hs * 4
    grad_head = s.vocab * hs * 4
    head_cast = vz * hs * cd if cd != 4 else 0
    if use_kd and cd != 4 and st.teacher_bytes == 4:
        head_cast += v * t.hidden * cd                                # an fp32 teacher's head in bf16
    partial = 0
    if cd != 4:
        head_block = max(1, min(vz, HEAD_BLOCK_ELEMENTS * (4 if workers > 1 else 1) // hs))
        partial = head_block * hs * cd
    per_chunk = c * hs * (cd + cd + 4)                                # h cast, g @ W, its float32 copy
    peak = raw + scratch + inputs + grad_hidden + grad_head + head_cast + partial + per_chunk
    return peak, grad_hidden + grad_head


def _scratch(chunk: int, width: int, use_kd: bool, workers: int, cpu: bool, st: Setting, blocks: dict) -> int:
    """The row-block scratch of the chunked loss (losses/chunked.py): per worker thread on CPU,
    three float32 (block, V) tensors for forward KL (one for CE alone); other divergences run
    autograd on each block, which holds about eight such tensors; on CUDA one block = the chunk."""
    closed = not use_kd or st.divergence == "fkl" or (st.divergence == "jsd" and st.beta == 0.0)
    if cpu:
        block = max(1, min(chunk, blocks["closed_form" if closed else "autograd"] // max(width, 1)))
        n_workers = min(workers, -(-max(chunk, 1) // block))
    else:
        block, n_workers = chunk, 1
    per = (3 if use_kd else 1) if closed else 8
    return n_workers * per * block * width * 4


def estimate(s: ModelShape, t: ModelShape | None, st: Setting, *, checkpointing: bool | None = None) -> Estimate:
    """The per-device memory of one run: parts and phases in bytes (see the module docstring).

    ``s``/``t``: student and teacher shapes (``t`` None without a local teacher); ``st``: the
    run's setting; ``checkpointing``: override ``st.checkpointing``."""
    ckpt = st.checkpointing if checkpointing is None else checkpointing
    n = st.devices
    fsdp = st.strategy == "fsdp"
    P = s.params
    Pt = s.trained  # gradients and AdamW state exist only for what trains (LoRA, frozen parts)

    # Student weights: fp32 master (sharded under FSDP) + what is gathered + autocast's bf16 copies.
    # With FSDP's CPU offload (CUDA) the shards, their gradients and AdamW state live in host memory.
    offload = fsdp and st.fsdp_offload and st.device_type == "cuda"
    master = 0 if offload else 4 * P / n if fsdp else 4 * P
    gather_bytes = 2 if (fsdp and st.fsdp_mixed_precision) else 4
    gathered = _gathered(s, gather_bytes, st.fsdp_reshard) if fsdp else 0
    copies = _autocast_copies(s, st)
    weights = int(master + gathered + copies)

    # Gradients (float32): sharded under FSDP plus one unit's unsharded gradient (the root's, the
    # largest: embeddings and head) before its reduce-scatter; DDP over several processes also
    # keeps its all-reduce buckets, a second copy.
    if fsdp:
        grads = int((0 if offload else 4 * Pt / n) + 4 * max(s.root_params, s.layer_params))
    else:
        grads = 4 * Pt + (4 * Pt if n > 1 else 0)
    grads_persistent = grads - 4 * Pt if (not fsdp and n > 1) else 0  # DDP's buckets live from the first backward
    if st.balanced_terms and not fsdp:
        # loss.balance / log_term_gradients: no DDP buckets; one float32 buffer per term, held from the
        # first micro-batch to the step, beside the combined gradient.
        grads = 4 * Pt * (st.balanced_terms + 1)
        grads_persistent = 4 * Pt * st.balanced_terms
    grads_live = grads - grads_persistent

    # AdamW: two float32 moments. The step's temporaries: on CPU the single-tensor AdamW makes a
    # few temporaries the size of the largest parameter (denominator, update); on CUDA the
    # foreach implementation one more float32 copy of all of them.
    opt = 0 if offload else int(8 * Pt / n if fsdp else 8 * Pt)
    largest = max(s.embed_params, s.head_params, s.layer_params // 3)
    if Pt < P:
        largest = min(largest, Pt)
    step_temp = 0 if offload else int(2 * 4 * largest if st.device_type == "cpu" else 4 * Pt / (n if fsdp else 1))

    local = t is not None and st.teacher == "local"
    teacher_w = teacher_weight_bytes(t, st) if local else 0
    # Under FSDP the gathered teacher units come and go with each forward: transient, not held.
    teacher_held = teacher_w - (_gathered(t, st.teacher_bytes, True) if local and fsdp and st.quantization == "none"
                                else 0)
    t_working, t_out = _teacher_forward(t, st)
    act = _activations(s, st, ckpt)
    act_other = _activations(s, st, not ckpt)
    loss_peak, loss_keep = _loss_buffers(s, t, st)
    if st.device_type == "cuda":
        runtime = CUDA_CONTEXT_BYTES
    else:
        runtime = st.runtime + RUN_SETUP_BYTES

    accum = grads_live if st.grad_accum > 1 else 0   # earlier micro-batches' gradients, during the next one
    t_gathered = teacher_w - teacher_held
    tokens = st.batch_size * st.seq_len
    backward_work = tokens * 4 * (2 * s.hidden + 2 * s.intermediate)  # gradients flowing through a layer
    # What each phase adds to what the process holds throughout (runtime, master weights, AdamW
    # state, the teacher's weights, DDP's buckets).
    held = runtime + int(master) + opt + teacher_held + grads_persistent
    transient = {
        "teacher forward": accum + t_gathered + t_working + t_out,
        "loss": accum + gathered + copies + t_gathered + t_out + act + loss_peak,
        "backward": gathered + copies + max(act + loss_keep + accum, grads_live) + backward_work,
        "optimizer step": grads_live + step_temp,
    }
    retain = retention(s, st, ckpt)
    phases = {name: held + int(retain * x) for name, x in transient.items()}
    # Loading: each process that reads the models holds them whole (FSDP: the main process, until
    # the others have their shards): the student as float32, the teacher as stored and, when the
    # run holds it in another dtype, converted too (the stored file is mapped, its pages counted).
    loading = runtime + 4 * P
    if local:
        stored = DTYPE_BYTES.get(t.dtype or "", st.teacher_bytes)
        loading += t.params * stored + (t.params * st.teacher_bytes if stored != st.teacher_bytes else 0)
    if fsdp:
        loading += int(4 * P / n) + teacher_held
    host_loading = 0
    if st.device_type == "cpu":
        phases["loading"] = int(loading)
    else:
        # On CUDA the models load into host memory and reach the device one sharded layer at a time
        # (FSDP) or whole (DDP, already counted): loading is the host's concern, not the device's.
        host_loading = int(loading - runtime + st.runtime)
    total = max(phases.values())
    parts = {
        "weights": weights, "gradients": grads, "optimizer": opt + step_temp, "teacher": teacher_w + t_working + t_out,
        "activations": act, "activations (other)": act_other, "loss": loss_peak, "runtime": runtime,
    }
    return Estimate(parts={k: int(v) for k, v in parts.items()}, phases={k: int(v) for k, v in phases.items()},
                    total=int(total), checkpointing=ckpt, held=int(held), host_loading=host_loading,
                    transient={k: int(v) for k, v in transient.items()}, retention=retain)


def retention(s: ModelShape, st: Setting, checkpointing: bool) -> float:
    """Resident bytes per live byte of a step's transient tensors (see CPU_HEAP_RETENTION): on CPU,
    the factor for the share of them small enough for glibc's heaps (judged by the size of one
    activation tensor: B x T x the MLP width in float32, and B x T x H in bf16); 1 on CUDA."""
    if st.device_type != "cpu":
        return 1.0
    factor = CPU_HEAP_RETENTION_CHECKPOINTING if checkpointing else CPU_HEAP_RETENTION
    tokens = st.batch_size * st.seq_len
    if tokens * s.intermediate * 4 <= GLIBC_MMAP_THRESHOLD_MAX:
        heap = 1.0
    elif tokens * s.hidden * 2 > GLIBC_MMAP_THRESHOLD_MAX:
        heap = 0.0  # every activation tensor mmapped, returned when freed
    else:
        heap = 0.5
    return 1.0 + (factor - 1.0) * heap


def largest_batch(s: ModelShape, t: ModelShape | None, st: Setting, capacity: int, *,
                  checkpointing: bool | None = None, limit: int = 1 << 20) -> int:
    """The largest micro-batch (``train.batch_size``) whose peak fits in ``capacity`` bytes; 0 if
    not even one sequence fits. Totals grow with the batch, so a bisection finds it."""
    def fits(b: int) -> bool:
        return estimate(s, t, replace(st, batch_size=b), checkpointing=checkpointing).total <= capacity

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass
class PlanRow:
    """One column of the plan's table: a strategy over a number of devices."""

    strategy: str
    devices: int
    estimate: Estimate
    estimate_other: Estimate            # the same with activation checkpointing switched
    capacity: int
    fits: bool
    fits_other: bool
    largest_batch: int
    largest_batch_other: int
    notes: list[str] = field(default_factory=list)


def plan_rows(s: ModelShape, t: ModelShape | None, st: Setting, devices: list[int], capacity_for) -> list[PlanRow]:
    """Estimates for DDP and FSDP over each count of ``devices``; ``capacity_for(n)`` gives the
    bytes one device (process) may use when there are ``n``."""
    rows = []
    for n in devices:
        for strategy in ("ddp", "fsdp"):
            if strategy == "fsdp" and n == 1:
                continue  # one process: FSDP shards nothing
            setting = replace(st, strategy=strategy, devices=n)
            est = estimate(s, t, setting)
            other = estimate(s, t, setting, checkpointing=not st.checkpointing)
            cap = capacity_for(n)
            notes = []
            if strategy == "fsdp" and st.quantization != "none":
                notes.append("quantized teacher kept whole on every process")
            if strategy == "fsdp" and st.fsdp_offload and st.device_type == "cuda":
                notes.append(f"fsdp cpu_offload: {16 * s.params / n / MB:,.0f} MB of student shards, gradients and "
                             "AdamW state per process in host memory, not on the device")
            rows.append(PlanRow(strategy, n, est, other, cap, est.total <= cap, other.total <= cap,
                                largest_batch(s, t, setting, cap),
                                largest_batch(s, t, setting, cap, checkpointing=not st.checkpointing), notes))
    return rows


# ----------------------------------------------------------------------------------------
# From a run config: the models' shapes (configs only) and the setting


@dataclass
class RunModels:
    """The shapes of a run's models and where its teacher signal comes from."""

    student: ModelShape
    teacher: ModelShape | None     # a teacher whose weights this process holds (None: cache, server, none)
    teacher_kind: str              # local | cache | served | none
    student_source: str            # how the student is made, for the table's title
    top_k: int = 0


def read_model_config(ref: str, *, role: str, revision: str | None = None, trust_remote_code: bool = False):
    """A model's transformers config from a local folder or hub id; config.json only, no weights."""
    from transformers import AutoConfig

    from ..errors import ModelError, one_line
    from .loading import looks_local, missing_folder

    local = Path(ref).expanduser()
    if not local.is_dir() and looks_local(ref):
        raise ModelError(missing_folder(ref, role))
    try:
        return AutoConfig.from_pretrained(str(local) if local.is_dir() else ref, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        where = f"folder {local}" if local.is_dir() else f"'{ref}'"
        raise ModelError(f"cannot read the {role} model's config from {where} ({one_line(err)}): potstill plan "
                         f"needs its config.json; check {role}.name_or_path") from None


def shape_of(config: Any, role: str) -> ModelShape:
    """:func:`model_shape`, its failures as one ModelError line."""
    from ..errors import ModelError, one_line

    try:
        return model_shape(config)
    except ModelError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise ModelError(f"cannot build the {role} model from its config on the meta device "
                         f"({type(err).__name__}: {one_line(err)})") from None


def run_models(cfg, cache_k: int | None = None) -> RunModels:
    """The shapes of ``cfg``'s student and (local) teacher, from their configs alone.

    The student: its folder's config, ``student.config`` completed as a run completes it (model
    type and vocabulary from a loaded teacher), or the teacher's config cut to
    the ``student.from_teacher`` layers. The teacher: its config when the run loads it (also
    when only evaluation uses it); a cache's k (``cache_k``, from its manifest); a server's top_k."""
    from ..errors import ConfigError, ModelError
    from .students import build_student_config, complete_student_fields, cut_config, select_layers

    tc, sc = cfg.teacher, cfg.student
    for role, ref in (("teacher", tc.name_or_path), ("student", sc.name_or_path)):
        if ref is not None and not isinstance(ref, str):
            raise ConfigError(f"{role}.name_or_path is a Python object: potstill plan reads configs from files; "
                              "give a folder or hub id")
    teacher_config = None
    if tc.name_or_path is not None and tc.cache is None and tc.server is None:
        teacher_config = read_model_config(tc.name_or_path, role="teacher", revision=tc.revision,
                                           trust_remote_code=tc.trust_remote_code)
    teacher = shape_of(teacher_config, "teacher") if teacher_config is not None else None
    top_k, kind = 0, "local" if teacher is not None else "none"
    if tc.cache is not None:  # the caller read the cache's k from its manifest (teachers/ is above models/)
        top_k, kind = int(cache_k or 1), "cache"
    elif tc.server is not None:
        top_k, kind = tc.server.top_k, "served"

    layers = None  # a cut from the teacher: the kept layers (its config is built only if needed)
    if sc.name_or_path is not None:
        student_config = read_model_config(sc.name_or_path, role="student", revision=sc.revision,
                                           trust_remote_code=sc.trust_remote_code)
        student = shape_of(student_config, "student")
        source = str(sc.name_or_path)
    elif sc.from_teacher is not None and sc.from_teacher.prune is not None:
        if teacher is None:
            raise ConfigError("student.from_teacher.prune needs the teacher's config: set teacher.name_or_path to a "
                              "folder or hub id (a cache or server holds no weights to prune)")
        from .pruning import pruned_config

        student_config = pruned_config(teacher_config, sc.from_teacher.prune)
        student = shape_of(student_config, "student")
        source = f"pruned from teacher, {student.params / 1e6:.1f}M of {teacher.params / 1e6:.1f}M parameters"
    elif sc.from_teacher is not None:
        if teacher is None:
            raise ConfigError("student.from_teacher needs the teacher's config: set teacher.name_or_path to a "
                              "folder or hub id (a cache or server holds no weights to cut)")
        layers = select_layers(teacher.layers, sc.from_teacher.layers, sc.from_teacher.every)
        student = teacher.with_layers(len(layers))
        source = f"from teacher, {len(layers)} of {teacher.layers} layers"
    else:
        fields = dict(sc.config or {})
        model_type = fields.pop("model_type", None) or (teacher_config.model_type if teacher_config else None)
        if model_type is None:
            raise ModelError("student.config needs a model_type (e.g. llama) when there is no teacher to copy it from")
        # As a run completes them (models/students.student_from_config): the vocabulary and special
        # ids come from a loaded teacher only; without one, from student.config or the model type's
        # default (not from student.tokenizer).
        fields = complete_student_fields(fields, model_type, vocab_size=(
            teacher_config.vocab_size if teacher_config is not None else None), tokenizer=None)
        student_config = build_student_config(model_type, fields)
        student = shape_of(student_config, "student")
        source = f"from config ({model_type})"
    if sc.attn_implementation is not None:  # student.attn_implementation: eager keeps the (heads, T, T) scores
        student = replace(student, attn_implementation=sc.attn_implementation)
    if teacher is not None and tc.attn_implementation is not None:
        teacher = replace(teacher, attn_implementation=tc.attn_implementation)
    if sc.lora is not None or sc.freeze or sc.train_only or sc.spectrum or (
            sc.embeddings_from_teacher is not None and sc.embeddings_from_teacher.freeze):
        if layers is not None:
            student_config = cut_config(teacher_config, layers)
        student = trained_shape(student, student_config, sc)
        source += f"; training {student.trained / 1e6:.2f}M of {student.params / 1e6:.2f}M parameters"
    return RunModels(student=student, teacher=teacher, teacher_kind=kind, student_source=source, top_k=top_k)


def trained_shape(student: ModelShape, config, sc) -> ModelShape:
    """``student`` with its trained parameter count: the student of ``config`` built on the meta
    device (no weights) with its LoRA adapters and frozen parts applied as a run applies them
    (``sc``: the student section). A LoRA student's parameters include its adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    from .students import make_trainable

    with torch.device("meta"):
        model = make_trainable(AutoModelForCausalLM.from_config(config), sc)
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return replace(student, params=params, trained_params=trained)


def resolve_target_precision(precision: str, device_type: str) -> str:
    """``train.precision`` on the target device: auto is bf16 on CUDA (Ampere and later, where
    runs of this size go) and on a CPU with fast bf16, else fp32."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16"
    from .precision import cpu_has_fast_bf16

    return "bf16" if cpu_has_fast_bf16() else "fp32"


def setting_from_config(cfg, models: RunModels, *, device_type: str, runtime: int, threads: int) -> Setting:
    """The :class:`Setting` of ``cfg`` (strategy and devices are set per table column)."""
    from ..errors import ConfigError
    from ..losses.sparse import SPARSE_DIVERGENCES
    from .precision import compute_dtype
    from .teacher_model import teacher_dtype

    precision = resolve_target_precision(cfg.train.precision, device_type)
    dtype = teacher_dtype(cfg.teacher.dtype, compute_dtype(precision))
    teacher_bytes = DTYPE_BYTES[str(dtype).removeprefix("torch.")]
    lc = cfg.loss
    kd = lc.logits.weight > 0
    features = 0
    if lc.uses_features:
        features = (models.student.layers if lc.hidden.weight > 0 else 0) + (1 if lc.attention.weight > 0 else 0)
    # The loss path, as training/setup.choose_loss_path decides it.
    why = None
    if not models.student.chunked_ok:
        why = models.student.chunked_why
    elif kd and models.teacher_kind == "local" and models.teacher is not None and not models.teacher.chunked_ok:
        why = models.teacher.chunked_why
    elif kd and models.teacher_kind in ("cache", "served") and lc.logits.divergence not in SPARSE_DIVERGENCES:
        why = f"the sparse loss has no chunked form for loss.logits.divergence={lc.logits.divergence}"
    if lc.path == "chunked" and why:
        raise ConfigError(f"loss.path=chunked is not possible: {why}; use loss.path=auto or plain")
    path = "plain" if lc.path == "plain" or why else "chunked"
    fc = cfg.train.fsdp
    mixed = fc.mixed_precision
    if mixed == "auto":
        mixed = precision == "bf16"
    server = cfg.teacher.server
    batch, seq_len = cfg.train.batch_size, cfg.data.max_length
    op = cfg.onpolicy
    if op.enabled:  # a sampled row: its prompt (shorter than an example) + up to max_new_tokens, n per prompt
        batch, seq_len = batch * op.num_completions, seq_len + op.max_new_tokens
    return Setting(
        batch_size=batch, seq_len=seq_len, precision=precision,
        strategy=cfg.train.strategy, device_type=device_type, grad_accum=cfg.train.grad_accum,
        checkpointing=cfg.student.gradient_checkpointing, teacher=models.teacher_kind, teacher_bytes=teacher_bytes,
        quantization=cfg.teacher.quantization, loss_path=path, kd=kd, ce=lc.ce.weight > 0,
        divergence=lc.logits.divergence, beta=lc.logits.beta, top_k=models.top_k,
        lookahead=server.lookahead if server is not None else 0, memory_budget_mb=lc.memory_budget_mb,
        chunk_size=lc.chunk_size, features=features, fsdp_reshard=fc.reshard_after_forward,
        balanced_terms=len(lc.balanced_terms) if lc.balance != "fixed" or lc.log_term_gradients else 0,
        fsdp_mixed_precision=bool(mixed) and precision == "bf16", fsdp_offload=fc.cpu_offload, threads=threads,
        runtime=runtime)
