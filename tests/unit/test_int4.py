"""int4 weight-only teachers on CPU: potstill's pure-PyTorch Int4Linear (packing, error bounds, bytes, a run)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import potstill
import tiny
from potstill.config import TeacherConfig
from potstill.models.hidden import supports_chunked
from potstill.models.int4 import Int4Linear, pack_int4, quantize_int4_, unpack_int4
from potstill.models.teacher_model import load_teacher
from potstill.models.quantize import INT4_GROUP, keep_fn, model_bytes


# On a CUDA machine load_teacher takes torchao's int4 path instead of Int4Linear.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="int4 teachers on CPU use Int4Linear (torchao on CUDA)")


@pytest.fixture(autouse=True)
def _fresh_accelerator():
    """The run below uses bf16: Accelerate keeps its state per process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def int4_teacher_dir(tmp_path_factory, tokenizer):
    """A tiny Llama whose linear layers all have input widths that are multiples of 128 (but the head)."""
    path = tmp_path_factory.mktemp("int4-teacher")
    tiny.build_llama(path, len(tokenizer), hidden_size=128, layers=2, heads=4, intermediate=256, seed=3)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 129), (2, 4, 9), (4, 256)])
def test_pack_unpack_round_trip(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(shape)))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], (shape[-1] + 1) // 2)
    assert torch.equal(unpack_int4(packed, shape[-1]), codes)


def test_pack_layout_low_nibble_first():
    assert pack_int4(torch.tensor([[1, 2, 15]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]


def _linear(out_f, in_f, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():  # groups with very different ranges and offsets, one constant group
        lin.weight.mul_(torch.logspace(-2, 1, in_f // INT4_GROUP).repeat_interleave(INT4_GROUP))
        lin.weight.add_(torch.randn(out_f, 1) * 0.05)
        lin.weight[0, :INT4_GROUP] = 0.375
    return lin


def test_dequantized_error_within_half_a_step_per_group():
    lin = _linear(24, 3 * INT4_GROUP)
    q = Int4Linear.from_linear(lin, INT4_GROUP)
    w = lin.weight.detach().reshape(24, 3, INT4_GROUP)
    err = (q.dequantize().reshape(24, 3, INT4_GROUP) - w).abs().amax(dim=-1)
    step = (w.amax(dim=-1) - w.amin(dim=-1)) / 15
    assert torch.allclose(q.scale, step)
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7), (err / step).max()
    assert err[0, 0] == 0  # the constant group is exact
    assert err.max() > 0 and (err / step.clamp_min(1e-12)).max() > 0.3  # a real quantization, near its bound
    codes = unpack_int4(q.qweight, 3 * INT4_GROUP)
    assert codes.min() == 0 and codes.max() == 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_output_close_to_linear(dtype):
    lin = _linear(40, 2 * INT4_GROUP, bias=True, seed=1).to(dtype)
    q = Int4Linear.from_linear(lin, INT4_GROUP)
    assert q.bias.dtype == dtype and torch.equal(q.bias, lin.bias)
    x = torch.randn(3, 5, 2 * INT4_GROUP, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        ref, out = lin(x).float(), q(x)
    assert out.dtype == dtype and out.shape == (3, 5, 40)
    exact = nn.functional.linear(x.float(), q.dequantize(torch.float32), lin.bias.float())
    assert torch.allclose(out.float(), exact, rtol=0.02, atol=0.02 * exact.abs().max().item())
    rel = (out.float() - ref).norm() / ref.norm()
    assert 0 < rel < 0.1  # 4 bits: close to, not equal to, the full-precision layer


def test_quantize_int4_keeps_head_and_non_multiple_layers():
    model = tiny.build_llama(None, 300, hidden_size=128, layers=2, heads=4, intermediate=192)
    n = quantize_int4_(model, keep_fn(model, "int4"), INT4_GROUP)
    assert n == 2 * 6  # q, k, v, o, gate, up per layer; down_proj reads 192 columns
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, Int4Linear) and isinstance(layer.mlp.up_proj, Int4Linear)
    assert type(layer.mlp.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert supports_chunked(model)[0] is not None  # the head stays plain: the chunked loss path applies
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 300)


@cpu_only
def test_int4_teacher_bytes_and_logits(int4_teacher_dir):
    ref, _ = load_teacher(TeacherConfig(name_or_path=str(int4_teacher_dir)), dtype=torch.bfloat16)
    ref = ref.to(torch.bfloat16)  # the rotary buffers too, as the quantized loader casts them
    q, _ = load_teacher(TeacherConfig(name_or_path=str(int4_teacher_dir), quantization="int4"), dtype=torch.bfloat16)
    kept = {n for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert kept and {n for n, m in q.named_modules() if isinstance(m, Int4Linear)} == kept
    linear_bf16 = sum(ref.get_submodule(n).weight.numel() * 2 for n in kept)
    int4_bytes = sum(model_bytes(q.get_submodule(n)) for n in kept)
    # 4 bits per weight (0.25x) plus float32 scale and zero per 128 weights (0.03x).
    assert 0.25 * linear_bf16 < int4_bytes < 0.35 * linear_bf16
    assert model_bytes(ref) - model_bytes(q) == linear_bf16 - int4_bytes  # model_bytes sees the buffers
    assert all(not p.requires_grad for p in q.parameters())
    # The int4 model computes exactly what the bf16 model computes with the dequantized weights ...
    deq = copy.deepcopy(ref)
    with torch.no_grad():
        for n in kept:
            deq.get_submodule(n).weight.copy_(q.get_submodule(n).dequantize(torch.bfloat16))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits.float() for m in (ref, q, deq))
    assert torch.allclose(b, c, rtol=0, atol=1e-3 * c.abs().max().item())
    # ... which are near the originals (random-init weights: ~19% relative logit error here, 14 quantized layers).
    assert not torch.equal(a, b) and (a - b).norm() / a.norm() < 0.3


@cpu_only
def test_int4_teacher_keeps_fp32_when_asked(int4_teacher_dir):
    q, _ = load_teacher(TeacherConfig(name_or_path=str(int4_teacher_dir), quantization="int4"), dtype=torch.float32)
    assert q.lm_head.weight.dtype == torch.float32  # no forced bf16 on CPU (torchao's CUDA kernels need it)
    with torch.no_grad():
        assert q(input_ids=torch.tensor([[5, 6, 7]])).logits.dtype == torch.float32


@cpu_only
def test_student_from_int4_teacher_gets_dequantized_weights(int4_teacher_dir):
    from potstill.models.students import student_from_teacher

    q, _ = load_teacher(TeacherConfig(name_or_path=str(int4_teacher_dir), quantization="int4"), dtype=torch.bfloat16)
    student = student_from_teacher(q, [1])
    src = q.model.layers[1].mlp.down_proj
    assert isinstance(src, Int4Linear) and type(student.model.layers[0].mlp.down_proj) is nn.Linear
    assert torch.equal(student.model.layers[0].mlp.down_proj.weight, src.dequantize(torch.float32))
    assert torch.equal(student.lm_head.weight, q.lm_head.weight.float())


@pytest.mark.parametrize("student", ["config", "from_teacher"])
def test_int4_teacher_run_distills(tmp_path, int4_teacher_dir, text_jsonl, student):
    cfg = {
        "teacher": {"name_or_path": str(int4_teacher_dir), "quantization": "int4"},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 64}},
        "data": {"source": str(text_jsonl), "max_length": 64, "validation_fraction": 0.1},
        "loss": {"logits": {"divergence": "fkl", "temperature": 2.0}, "ce": {"weight": 0.1}},
        "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "precision": "bf16",
                  "checkpoint_every": 3, "keep_checkpoints": 1, "log_every": 1, "warmup_steps": 1},
        "eval": {"every": None, "max_batches": 2},
        "output": {"dir": str(tmp_path / "run"), "report": False},
    }
    if student == "from_teacher":
        cfg["student"] = {"from_teacher": {"every": 2}}  # copies the dequantized int4 weights
    result = potstill.distill(cfg, progress=False)
    losses = [r["loss"] for r in map(json.loads, result.metrics_path.read_text().splitlines()) if "loss" in r]
    assert len(losses) == 6 and all(l == l for l in losses) and losses[-1] < losses[0]
    assert result.final_eval["kl"] > 0 and result.final_eval["teacher_ppl"] > 1
