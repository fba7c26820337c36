"""The chunked path equals the plain path: loss, term sums and gradients, for every divergence.

The plain reference builds full logits ``hidden @ head.T (+ bias, softcap)`` and calls the same
``logit_divergence`` / ``cross_entropy`` as ``objective.py``. Block sizes are shrunk so that
every chunk is also split into several softmax blocks.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import potstill.losses.chunked as chunked_mod
from potstill.losses import (
    ChunkedLossOutput,
    choose_chunk_size,
    chunked_distill_loss,
    cross_entropy,
    logit_divergence,
)

# (divergence, extra kwargs): every divergence, jsd at both special-cased ends and inside.
CASES = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 1.0}),
         ("tvd", {}), ("skew_fkl", {"alpha": 0.1}), ("skew_rkl", {"alpha": 0.3}), ("mse", {})]
IDS = [n + "".join(f"-{k}{v}" for k, v in kw.items()) for n, kw in CASES]
N, HS, HT, V = 37, 16, 24, 101  # odd sizes, student and teacher widths differ


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # ~3 rows per softmax block at V=101: chunks are split into several blocks.
    monkeypatch.setattr(chunked_mod, "BLOCK_ELEMENTS", {"closed_form": 320, "autograd": 320})
    monkeypatch.setattr(chunked_mod, "HEAD_BLOCK_ELEMENTS", 10 * HS)  # several head blocks,
    monkeypatch.setattr(chunked_mod, "ADD_BLOCK_ELEMENTS", 7 * HS)    # each added in pieces
    monkeypatch.setattr(chunked_mod, "POOL_MIN_BLOCKS", 1)  # a few blocks already go to the worker pool


def _inputs(dtype=torch.float32, *, vs=V, vt=V, n=N, seed=0, bias=True, masked=0.3):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    data = dict(
        student_hidden=rnd(n, HS).requires_grad_(),
        student_head=rnd(vs, HS, scale=0.6).requires_grad_(),
        teacher_hidden=rnd(n, HT),
        teacher_head=rnd(vt, HT, scale=0.5),
        student_bias=rnd(vs, scale=0.5).requires_grad_() if bias else None,
        teacher_bias=rnd(vt, scale=0.5) if bias else None,
    )
    targets = torch.randint(0, min(vs, vt), (n,), generator=g)
    targets[torch.rand(n, generator=g) < masked] = -100
    targets[0] = 3
    data["targets"] = targets
    return data


def _logits(hidden, head, bias, softcap):
    z = hidden @ head.T
    if bias is not None:
        z = z + bias
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def _plain(d, *, divergence="fkl", temperature=1.0, beta=0.5, alpha=0.1, kd_weight=1.0, ce_weight=0.0,
           shared_vocab=None, student_softcap=None, teacher_softcap=None, **_):
    """The plain path: full logits, then the pure losses (what objective.py does after the shift)."""
    s = _logits(d["student_hidden"], d["student_head"], d["student_bias"], student_softcap)
    mask = d["targets"] != -100
    total = torch.zeros((), dtype=torch.float32)
    terms = {}
    if kd_weight > 0:
        t = _logits(d["teacher_hidden"], d["teacher_head"], d["teacher_bias"], teacher_softcap)
        v = shared_vocab or min(s.shape[-1], t.shape[-1])
        kd, _ = logit_divergence(divergence, s[:, :v], t[:, :v], mask, temperature=temperature,
                                 beta=beta, alpha=alpha)
        terms["kd"] = kd.detach()
        total = total + kd_weight * kd
    if ce_weight > 0:
        ce, _ = cross_entropy(s, d["targets"])
        terms["ce"] = ce.detach()
        total = total + ce_weight * ce
    return total, terms, mask.sum()


def _chunked(d, **kw):
    return chunked_distill_loss(
        d["student_hidden"], d["student_head"], d["targets"], teacher_hidden=d["teacher_hidden"],
        teacher_head=d["teacher_head"], student_bias=d["student_bias"], teacher_bias=d["teacher_bias"], **kw)


def _params(d):
    return [p for p in (d["student_hidden"], d["student_head"], d["student_bias"]) if p is not None]


def _compare(d, tol, grad_tol, **kw):
    """Chunked vs plain: weighted sum, term sums, n_valid (rtol = atol = ``tol``) and the
    gradients of every student input (max error over max |grad| <= ``grad_tol``)."""
    out = _chunked(d, **kw)
    assert isinstance(out, ChunkedLossOutput)
    ref, ref_terms, ref_n = _plain(d, **kw)
    assert out.weighted_sum.dtype == torch.float32 and out.weighted_sum.dim() == 0
    assert out.n_valid.dtype == torch.int64 and int(out.n_valid) == int(ref_n)
    assert set(out.term_sums) == set(ref_terms)
    torch.testing.assert_close(out.weighted_sum, ref.detach(), rtol=tol, atol=tol)
    for k in ref_terms:
        assert not out.term_sums[k].requires_grad
        torch.testing.assert_close(out.term_sums[k], ref_terms[k], rtol=tol, atol=tol)
    params = _params(d)
    got = torch.autograd.grad(out.weighted_sum, params)
    want = torch.autograd.grad(ref, params)
    for name, a, b in zip(("hidden", "head", "bias"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = b.float().abs().max().clamp_min(1e-6)
        err = ((a.float() - b.float()).abs().max() / scale).item()
        assert err <= grad_tol, f"grad {name}: max error {err:.2e} of max |grad| {scale:.2e}"
    return out


FP32 = (2e-5, 2e-5)   # (value tol, grad tol)
BF16 = (1e-2, 3e-2)


# --------------------------------------------------------------------------- equality
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_every_divergence_with_ce_fp32(name, kw):
    d = _inputs(vs=V + 5, vt=V + 2)  # padded heads of different sizes; V = min by default
    _compare(d, *FP32, divergence=name, temperature=2.0, kd_weight=0.7, ce_weight=0.3,
             chunk_size=8, **kw)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_every_divergence_with_ce_bf16(name, kw):
    d = _inputs(torch.bfloat16)
    _compare(d, *BF16, divergence=name, temperature=1.0, kd_weight=1.0, ce_weight=0.5,
             chunk_size=10, **kw)


@pytest.mark.parametrize("name", ["fkl", "rkl", "mse"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_kd_only_and_temperatures(name, temperature):
    _compare(_inputs(bias=False), *FP32, divergence=name, temperature=temperature, chunk_size=6)


@pytest.mark.parametrize("name", ["fkl", "skew_fkl"])
def test_ce_only_needs_no_teacher(name):
    d = _inputs()
    out = chunked_distill_loss(d["student_hidden"], d["student_head"], d["targets"],
                               student_bias=d["student_bias"], divergence=name, kd_weight=0.0,
                               ce_weight=1.0, chunk_size=5)
    assert set(out.term_sums) == {"ce"}
    ref, _, _ = _plain(d, kd_weight=0.0, ce_weight=1.0)
    torch.testing.assert_close(out.weighted_sum, ref.detach(), rtol=2e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out.weighted_sum, _params(d)), torch.autograd.grad(ref, _params(d))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.4])
def test_shared_vocab_with_padded_rows(name, ce_weight):
    d = _inputs(vs=V + 7, vt=V + 3)
    # The padded student rows get CE gradient only; without CE exactly zero, as in the plain path.
    _compare(d, *FP32, divergence=name, shared_vocab=V - 11, ce_weight=ce_weight, chunk_size=9)
    if ce_weight == 0:
        d["student_head"].grad = None
        _chunked(d, divergence=name, shared_vocab=V - 11, chunk_size=9).weighted_sum.backward()
        assert torch.count_nonzero(d["student_head"].grad[V - 11:]) == 0


@pytest.mark.parametrize("name", ["fkl", "rkl"])
@pytest.mark.parametrize("dtype,tols", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_softcap(name, dtype, tols):
    d = _inputs(dtype)
    kw = dict(divergence=name, student_softcap=3.0, teacher_softcap=5.0, ce_weight=0.2, temperature=1.5,
              chunk_size=7)
    _compare(d, *tols, **kw)
    # ... and the cap changes the result (every option changes something).
    assert not torch.allclose(_chunked(d, **kw).weighted_sum, _chunked(d, **{**kw, "student_softcap": None})
                              .weighted_sum)


@pytest.mark.parametrize("chunk_size", [1, 2, N, N + 50, None])
@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_chunk_sizes(chunk_size, name):
    _compare(_inputs(), *FP32, divergence=name, ce_weight=0.5, chunk_size=chunk_size, beta=0.3)


def test_budget_picks_several_chunks():
    d = _inputs()
    # 101 columns * 2 models * 4 bytes * ~1 = ~0.8 KB a row: 8 KB -> 10 rows a chunk
    _compare(d, *FP32, ce_weight=0.5, memory_budget_mb=8 / 1024)


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_fully_masked_chunks(name):
    d = _inputs(masked=0.0)
    d["targets"][5:25] = -100  # chunks of 5 rows: chunks 2-5 of the input hold no valid row
    out = _compare(d, *FP32, divergence=name, ce_weight=0.5, chunk_size=5)
    assert int(out.n_valid) == N - 20
    # Masked rows get exactly zero gradient even when they hold garbage.
    d["student_hidden"].data[5:25] = float("nan")
    d["student_hidden"].grad = None
    out = _chunked(d, divergence=name, ce_weight=0.5, chunk_size=5)
    out.weighted_sum.backward()
    assert torch.isfinite(out.weighted_sum)
    assert torch.count_nonzero(d["student_hidden"].grad[5:25]) == 0


@pytest.mark.parametrize("name", ["fkl", "tvd"])
def test_fully_masked_input(name):
    d = _inputs()
    d["targets"][:] = -100
    out = _chunked(d, divergence=name, ce_weight=1.0)
    assert int(out.n_valid) == 0
    assert out.weighted_sum.item() == 0.0 and out.term_sums["kd"].item() == 0.0
    assert out.term_sums["ce"].item() == 0.0
    grads = torch.autograd.grad(out.weighted_sum, _params(d))
    assert all(torch.count_nonzero(g) == 0 and g.shape == p.shape for g, p in zip(grads, _params(d)))


def test_grad_output_scales_gradients():
    d = _inputs()
    out = _chunked(d, ce_weight=0.5, chunk_size=8)
    ref, _, n = _plain(d, ce_weight=0.5)
    got = torch.autograd.grad(out.weighted_sum * 3.0 / n, _params(d))
    want = torch.autograd.grad(ref * 3.0 / n, _params(d))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_never_gets_gradient():
    d = _inputs()
    d["teacher_hidden"].requires_grad_()
    d["teacher_head"].requires_grad_()
    out = _chunked(d, chunk_size=8)
    out.weighted_sum.backward()
    assert d["teacher_hidden"].grad is None and d["teacher_head"].grad is None


def test_teacher_minus_inf_logits():
    """A teacher that rules tokens out (-inf bias): 0 * log 0 = 0, as in the plain path."""
    d = _inputs()
    d["teacher_bias"][10:20] = float("-inf")
    out = _compare(d, *FP32, divergence="fkl", ce_weight=0.3, chunk_size=8)
    assert torch.isfinite(out.weighted_sum)


def test_autocast_bf16_matmuls():
    d = _inputs()  # float32 parameters, bf16 autocast, as in mixed-precision training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _chunked(d, ce_weight=0.5, chunk_size=8)
        ref, _, _ = _plain(d, ce_weight=0.5)
    torch.testing.assert_close(out.weighted_sum, ref.float().detach(), rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(out.weighted_sum, _params(d))
    want = torch.autograd.grad(ref, _params(d))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert ((a - b).abs().max() / b.abs().max()).item() < 3e-2


def test_float64_gradcheck():
    d = _inputs(torch.float64, n=7, vs=11, vt=9)
    d["targets"] = d["targets"].clamp(max=8)

    def fn(hidden, head, bias):
        return chunked_distill_loss(hidden, head, d["targets"], teacher_hidden=d["teacher_hidden"],
                                    teacher_head=d["teacher_head"], student_bias=bias, divergence="jsd",
                                    ce_weight=0.5, chunk_size=3).weighted_sum
    assert torch.autograd.gradcheck(fn, tuple(_params(d)), fast_mode=True)


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_thread_counts_agree(name):
    """One intra-op thread runs the blocks inline; several spread them over worker threads."""
    d = _inputs(n=61)
    threads = torch.get_num_threads()
    results = []
    try:
        for k in (1, 3):
            torch.set_num_threads(k)
            out = _chunked(d, divergence=name, ce_weight=0.5, chunk_size=20)
            results.append((out.weighted_sum, *torch.autograd.grad(out.weighted_sum, _params(d))))
            assert torch.get_num_threads() == k
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _compare(d, *FP32, divergence=name, ce_weight=0.5, chunk_size=20)


# --------------------------------------------------------------------------- memory
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (forward, backward, autograd.grad inside)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor)}  # views and in-place/out= writes allocate nothing
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_never_allocates_n_by_v(name, monkeypatch):
    monkeypatch.setattr(chunked_mod, "BLOCK_ELEMENTS", {"closed_form": 2**12, "autograd": 2**12})
    monkeypatch.setattr(chunked_mod, "HEAD_BLOCK_ELEMENTS", 2**14)
    n, vocab, chunk = 256, 800, 16
    d = _inputs(vs=vocab, vt=vocab, n=n, masked=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # dispatch modes are per thread: keep the block loops inline
    try:
        with _LargestTensor() as probe:
            out = _chunked(d, divergence=name, ce_weight=0.5, chunk_size=chunk)
            out.weighted_sum.backward()
    finally:
        torch.set_num_threads(threads)
    assert probe.largest <= chunk * vocab, (probe.largest, n * vocab)
    # The probe does see full logits on the plain path.
    with _LargestTensor() as probe:
        _plain(d, divergence=name, ce_weight=0.5)[0].backward()
    assert probe.largest >= n * vocab


# --------------------------------------------------------------------------- chunk size
def test_choose_chunk_size():
    assert choose_chunk_size(100, 10, 10, chunk_size=7) == 7
    assert choose_chunk_size(5, 10, 10, chunk_size=70) == 5
    assert choose_chunk_size(0, 10, 10) == 1
    # 128256 + 128256 bf16 columns, 256 MB: ~498 rows, evened out over 2048 rows -> 5 x 410
    assert choose_chunk_size(2048, 128256, 128256, element_size=2, memory_budget_mb=256) == 410
    # float32, the default 512 MB: ~498 rows again -> 5 x 410; bf16 at 512 MB hits the row cap
    assert choose_chunk_size(2048, 128256, 128256, element_size=4) == 410
    assert choose_chunk_size(2048, 128256, 128256, element_size=2) == chunked_mod.MAX_CHUNK_ROWS
    assert choose_chunk_size(10**6, 1000, 1000) == chunked_mod.MAX_CHUNK_ROWS
    small = choose_chunk_size(4096, 32000, 32000, memory_budget_mb=16)
    assert small < choose_chunk_size(4096, 32000, 32000, memory_budget_mb=64)
    assert choose_chunk_size(10, 10**9, 10**9, memory_budget_mb=1) == 1
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            choose_chunk_size(10, 10, 10, chunk_size=bad)


def test_bad_input_is_refused():
    d = _inputs()
    with pytest.raises(ValueError, match="teacher"):
        chunked_distill_loss(d["student_hidden"], d["student_head"], d["targets"])
    with pytest.raises(ValueError, match="shared_vocab"):
        _chunked(d, shared_vocab=V + 1)
    with pytest.raises(ValueError, match="targets"):
        _chunked({**d, "targets": d["targets"][:-1]})
    with pytest.raises(ValueError, match="unknown divergence"):
        _chunked(d, divergence="kl")
    with pytest.raises(ValueError, match="temperature"):
        _chunked(d, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        _chunked(d, student_softcap=-1.0)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        _chunked(d, memory_budget_mb=0)
    assert math.isfinite(_chunked(d).weighted_sum.item())


# --------------------------------------------------------------------------- Hugging Face heads
def _tiny(kind, vocab=64):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2)
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=8),
        "phi": lambda: tf.PhiConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"}),
        "cohere": lambda: tf.CohereConfig(**common, logit_scale=0.5),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=32),
    }
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(configs[kind]())
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "gemma2", "phi", "gpt2"])
def test_head_params_reproduce_hf_logits(kind):
    from potstill.models.heads import head_matches, head_params

    model = _tiny(kind)
    params = head_params(model)
    assert params is not None and params.weight is model.get_output_embeddings().weight
    assert (params.bias is not None) == (kind == "phi")
    assert (params.softcap == 30.0) if kind == "gemma2" else params.softcap is None
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    assert head_matches(model, ids)


def test_head_params_refuse_scaled_logits():
    from potstill.models.heads import head_matches, head_params

    model = _tiny("cohere")  # logits * logit_scale: not reproducible from the head alone
    assert head_params(model) is None
    assert not head_matches(model, torch.zeros(1, 4, dtype=torch.long))


def test_chunked_on_hf_models_equals_plain_objective():
    """Integration sketch: hidden states from the decoder, shift, flatten -> chunked loss ==
    the plain Objective on the models' logits, in loss and in student parameter gradients."""
    from potstill.config import LossConfig
    from potstill.models.heads import head_params
    from potstill.training.objective import Objective

    student, teacher = _tiny("llama"), _tiny("gemma2")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100
    cfg = LossConfig.model_validate({"logits": {"divergence": "fkl", "temperature": 2.0, "t2_scaling": True},
                                     "ce": {"weight": 0.3}})
    objective = Objective(cfg)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    plain = objective(student(input_ids=ids).logits, labels, t_logits)
    want = torch.autograd.grad(plain.weighted_sum, list(student.parameters()))

    s_head, t_head = head_params(student), head_params(teacher)
    # Through the (possibly DDP-wrapped) model's own forward, without full logits: transformers 5
    # ties hidden_states[-1] to the final-norm output; logits_to_keep=1 keeps one position.
    out = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    assert out.logits.shape[1] == 1
    s_hidden = out.hidden_states[-1]
    torch.testing.assert_close(s_hidden, student.get_decoder()(input_ids=ids).last_hidden_state)
    with torch.no_grad():
        t_hidden = teacher.get_decoder()(input_ids=ids).last_hidden_state
    targets = labels[:, 1:].reshape(-1)  # objective.shift: logits[:, :-1] predict labels[:, 1:]
    out = chunked_distill_loss(
        s_hidden[:, :-1].reshape(-1, s_hidden.shape[-1]), s_head.weight, targets,
        teacher_hidden=t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1]), teacher_head=t_head.weight,
        student_bias=s_head.bias, teacher_bias=t_head.bias, student_softcap=s_head.softcap,
        teacher_softcap=t_head.softcap, divergence="fkl", temperature=2.0, kd_weight=objective.kd_scale,
        ce_weight=0.3, chunk_size=5)
    torch.testing.assert_close(out.weighted_sum, plain.weighted_sum.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.n_valid, plain.n_valid)
    torch.testing.assert_close(out.term_sums["kd"], plain.term_sums["kd"], rtol=2e-5, atol=2e-5)
    got = torch.autograd.grad(out.weighted_sum, list(student.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
