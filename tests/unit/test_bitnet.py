"""BitNet b1.58: quantizers, straight-through gradients, conversion, 2-bit packing, exact packed forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import tiny
from potstill.models.bitnet import BitEmbedding, BitLinear, convert_to_bitnet, load_packed, pack_ternary, quantize_activations, quantize_weight, ternarize, unpack_ternary
from potstill.commands.export import export_packed
from potstill.errors import ModelError
from potstill.models.loading import load_causal_lm


def _load(path) -> nn.Module:
    return load_causal_lm(str(path), revision=None, dtype=torch.float32, trust_remote_code=False, role="model")


def test_ternary_values_and_absmean_scale():
    w = torch.tensor([[0.5, -2.0], [0.05, 1.0]])
    t, scale = ternarize(w)
    assert scale.item() == pytest.approx((0.5 + 2.0 + 0.05 + 1.0) / 4)
    # 0.5/0.8875 = 0.56 -> 1, -2.25 -> -1, 0.056 -> 0, 1.13 -> 1
    assert torch.equal(t, torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    q = quantize_weight(torch.randn(17, 9))
    levels = set(q.unique().tolist())
    s = q.abs().max().item()
    assert levels <= {-s, 0.0, s} and len(levels) == 3


def test_weight_and_activation_ste_pass_gradients_unchanged():
    w = torch.randn(6, 5, requires_grad=True)
    g = torch.randn(6, 5)
    (quantize_weight(w) * g).sum().backward()
    assert torch.equal(w.grad, g)
    x = torch.randn(3, 4, 5, requires_grad=True)
    gx = torch.randn(3, 4, 5)
    (quantize_activations(x) * gx).sum().backward()
    assert torch.equal(x.grad, gx)
    # The forward value is the quantized one, exactly, with or without a graph.
    assert torch.equal(quantize_weight(w), quantize_weight(w.detach()))


def test_activation_quantization_is_8_bit_per_token():
    x = torch.randn(2, 7, 64) * torch.linspace(0.01, 100, 7).view(1, 7, 1)  # very different token scales
    q = quantize_activations(x)
    absmax = x.abs().amax(-1, keepdim=True)
    codes = q * (127.0 / absmax)
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # integers per token
    assert codes.round().min() >= -128 and codes.round().max() <= 127
    assert torch.allclose(q.abs().amax(-1, keepdim=True), absmax, rtol=1e-6)  # each token's max kept
    assert (q != x).any()
    assert max(len(row.unique()) for row in q.reshape(-1, 64)) <= 256
    assert quantize_activations(x.bfloat16()).dtype == torch.bfloat16


def test_bitlinear_forward_is_quantized_linear():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    plain = lin(x)
    convert = nn.Sequential(lin)
    lin.__class__ = BitLinear
    expected = torch.nn.functional.linear(quantize_activations(x), quantize_weight(lin.weight), lin.bias)
    assert torch.equal(convert(x), expected)
    assert not torch.allclose(convert(x), plain)


def test_conversion_keeps_names_and_skips_head_and_embeddings(tokenizer):
    model = tiny.build_llama(None, len(tokenizer))
    keys = list(model.state_dict())
    n = convert_to_bitnet(model)
    assert list(model.state_dict()) == keys
    assert n == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.layers[0].self_attn.q_proj, BitLinear)
    assert model.config.potstill_bitnet == {"head": False, "embeddings": False}
    seen = []
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [torch.Size([1, 3, 32])]  # hooks on named submodules still fire (feature KD)

    other = tiny.build_llama(None, len(tokenizer))
    assert convert_to_bitnet(other, include_head=True, include_embeddings=True) == 2 * 7 + 2
    assert isinstance(other.lm_head, BitLinear) and isinstance(other.model.embed_tokens, BitEmbedding)


@pytest.mark.parametrize("shape", [(1,), (3,), (5,), (7, 3), (13, 11), (4, 8)])
def test_pack_unpack_round_trip(shape):
    torch.manual_seed(sum(shape))
    t = torch.randint(-1, 2, shape).float()
    packed = pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-t.numel() // 4)
    out = unpack_ternary(packed, shape)
    assert out.dtype == torch.int8 and torch.equal(out.float(), t)


def test_pack_refuses_non_ternary():
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        pack_ternary(torch.tensor([0.0, 2.0]))


def _bitnet_student(path: Path, tokenizer, *, seed=3, head=False, embeddings=False, tied=False) -> nn.Module:
    if tied:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=True))
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        model = tiny.build_llama(None, len(tokenizer), hidden_size=64, layers=2, intermediate=96, seed=seed)
    convert_to_bitnet(model, include_head=head, include_embeddings=embeddings)
    # Train it a little so that weights are not at their init scale.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("variant", ["default", "head+embeddings", "tied-head"])
def test_packed_model_equals_training_forward_exactly(tmp_path, tokenizer, variant):
    kw = {"default": {}, "head+embeddings": {"head": True, "embeddings": True},
          "tied-head": {"head": True, "tied": True}}[variant]
    _bitnet_student(tmp_path / "student", tokenizer, **kw)
    manifest = export_packed(tmp_path / "student", tmp_path / "packed")
    trained = _load(tmp_path / "student").eval()   # master weights, BitLinear re-applied from the config
    packed = _load(tmp_path / "packed")            # the packed folder, through the same loader
    assert any(isinstance(m, BitLinear) and m.weight.dtype == torch.int8 for m in packed.modules())
    assert all(p.dtype != torch.int8 for p in packed.parameters())
    ids = torch.randint(0, len(tokenizer), (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, packed(input_ids=ids).logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = trained(input_ids=ids).logits, packed(input_ids=ids).logits
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert manifest["ratio_to_bf16"] <= 1 / 7


def test_packed_size_is_under_a_seventh_of_bf16(tmp_path, tokenizer):
    model = _bitnet_student(tmp_path / "student", tokenizer)
    manifest = export_packed(tmp_path / "student", tmp_path / "packed")
    linears = [m for m in model.modules() if isinstance(m, BitLinear)]
    bf16 = sum(m.weight.numel() * 2 for m in linears)
    assert manifest["bf16_weight_bytes"] == bf16
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "packed" / "model.safetensors"))
    packed = sum(t.numel() * t.element_size() for k, t in stored.items()
                 if k.endswith((".weight_packed", ".weight_scale")))
    assert packed == manifest["packed_weight_bytes"] and packed * 7 <= bf16
    assert stored["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    assert (tmp_path / "packed" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "packed" / "bitnet.json").read_text())["format"] == "potstill-bitnet-2bit"


def test_export_refuses_a_full_precision_student(student_dir, tmp_path):
    with pytest.raises(ModelError, match="not a BitNet student"):
        export_packed(student_dir, tmp_path / "out")


def test_load_packed_refuses_a_damaged_folder(tmp_path, tokenizer):
    _bitnet_student(tmp_path / "student", tokenizer)
    export_packed(tmp_path / "student", tmp_path / "packed")
    manifest = json.loads((tmp_path / "packed" / "bitnet.json").read_text())
    manifest["version"] = 99
    (tmp_path / "packed" / "bitnet.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="unknown packed format"):
        load_packed(tmp_path / "packed")


def test_bf16_export_halves_the_other_tensors_and_keeps_the_ternary_ones(tmp_path, tokenizer):
    _bitnet_student(tmp_path / "student", tokenizer)
    export_packed(tmp_path / "student", tmp_path / "fp32")
    export_packed(tmp_path / "student", tmp_path / "bf16", dtype="bfloat16")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "fp32" / "model.safetensors")), load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith((".weight_packed", ".weight_scale")):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key].dtype == torch.float32 and b[key].dtype == torch.bfloat16
            assert torch.equal(a[key].bfloat16(), b[key])
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la, lb = load_packed(tmp_path / "fp32")(input_ids=ids).logits, load_packed(tmp_path / "bf16")(input_ids=ids).logits
    assert not torch.equal(la, lb) and torch.allclose(la, lb, atol=0.05 * la.abs().max().item())
    with pytest.raises(ModelError, match="--dtype"):
        export_packed(tmp_path / "student", tmp_path / "x", dtype="float16")


def test_conversion_follows_the_latest_choice_for_head_and_embeddings(tokenizer):
    model = tiny.build_llama(None, len(tokenizer))
    convert_to_bitnet(model, include_head=True, include_embeddings=True)
    convert_to_bitnet(model)  # e.g. a later run with student.bitnet_head=false on that student
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.layers[0].mlp.up_proj, BitLinear)
    assert model.config.potstill_bitnet == {"head": False, "embeddings": False}

