"""Capture hooks, projectors and the feature terms, on tiny models of each supported family."""

from __future__ import annotations

import pytest
import torch

from potstill.config import LossConfig, validate_config
from potstill.errors import ConfigError, ModelError
from potstill.features.distiller import FeatureDistiller, feature_mask
from potstill.features.hooks import capture, projection_widths, qkv_projections
from potstill.models.layers import decoder_layers
from potstill.features.projectors import Projectors

V = 64


def tiny(family: str, layers: int = 3, width: int = 32):
    from transformers import (GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    build = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**common)),
        "gemma": lambda: GemmaForCausalLM(GemmaConfig(**common, head_dim=width // 4)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=width, n_layer=layers, n_head=4,
                                                   bos_token_id=0, eos_token_id=0)),
    }[family]
    return build().eval()


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2"]


def _final_norm(model):
    decoder = model.get_decoder()
    return getattr(decoder, "norm", None) or decoder.ln_f


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_capture_what_output_hidden_states_gives(family):
    model = tiny(family)
    x = torch.randint(1, V, (2, 7))
    with capture(model, [1, 3], [2]) as got:
        out = model(input_ids=x, output_hidden_states=True)
    hs = out.hidden_states
    assert set(got.hidden) == {1, 3}                 # only the mapped layers
    torch.testing.assert_close(got.hidden[1], hs[1], rtol=0, atol=0)
    # HF's last entry has the final norm applied; ours is the decoder layer's own output.
    torch.testing.assert_close(_final_norm(model)(got.hidden[3]), hs[3], rtol=0, atol=0)

    # q, k, v of layer 2, by hand from its input (the output of layer 1).
    layer = decoder_layers(model)[1][1]
    with torch.no_grad():
        if family == "gpt2":
            q, k, v = layer.attn.c_attn(layer.ln_1(hs[1])).split(layer.attn.split_size, dim=-1)
        else:
            h = layer.input_layernorm(hs[1])
            q, k, v = layer.self_attn.q_proj(h), layer.self_attn.k_proj(h), layer.self_attn.v_proj(h)
    for mine, ref in zip(got.qkv[2], (q, k, v)):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    expected = (32, 32, 32) if family == "gpt2" else (32, 16, 16)  # grouped-query attention: narrower k, v
    assert tuple(t.shape[-1] for t in got.qkv[2]) == projection_widths(model, 2) == expected


def test_hooks_are_gone_after_the_block_and_on_error():
    model = tiny("llama")
    x = torch.randint(1, V, (1, 5))
    with capture(model, [1, 2], [1]):
        model(input_ids=x)
    with pytest.raises(KeyboardInterrupt):
        with capture(model, [1], [2]):
            raise KeyboardInterrupt
    assert all(not m._forward_hooks for m in model.modules())


def test_unknown_architecture_is_named():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64)).eval()
    with pytest.raises(ModelError, match=r"GPTNeoXForCausalLM \(gpt_neox\).*neither self_attn.q_proj/k_proj/v_proj "
                                         r"nor attn.c_attn; supported: Llama, Qwen2, Mistral, Gemma.*GPT-2"):
        qkv_projections(model, 1)
    # Hidden states need only the decoder layers, which every family has.
    with capture(model, [2]) as got:
        model(input_ids=torch.randint(1, V, (1, 5)))
    assert got.hidden[2].shape == (1, 5, 32)
    with pytest.raises(ModelError, match="has 2 decoder layers.*layer 3 does not exist"):
        with capture(model, [3]):
            pass


def test_projectors_kinds_init_and_save(tmp_path):
    state = torch.get_rng_state()
    proj = Projectors([(4, 1), (6, 2)], 16, 24, kind="linear", orthogonal=True, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # a private RNG: the run's random stream is untouched
    w = proj.by_pair["t4_s1"].weight                  # (24, 16), orthonormal columns
    torch.testing.assert_close(w.T @ w, torch.eye(16), rtol=1e-5, atol=1e-5)
    default = Projectors([(4, 1)], 16, 24, kind="linear", seed=3).by_pair["t4_s1"].weight
    assert not torch.allclose(default.T @ default, torch.eye(16), atol=1e-2)
    assert proj((4, 1), torch.randn(2, 3, 16).bfloat16()).dtype == torch.float32

    assert isinstance(Projectors([(1, 1)], 24, 24).by_pair["t1_s1"], torch.nn.Identity)  # auto, equal widths
    assert isinstance(Projectors([(1, 1)], 16, 24).by_pair["t1_s1"], torch.nn.Linear)    # auto, unequal
    mlp = Projectors([(1, 1)], 16, 24, kind="mlp")
    assert mlp((1, 1), torch.randn(2, 3, 16)).shape == (2, 3, 24) and len(list(mlp.parameters())) == 4
    with pytest.raises(ValueError, match="needs equal widths"):
        Projectors([(1, 1)], 16, 24, kind="identity")

    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(1.0)
    mlp.save(tmp_path / "p")
    again = Projectors.load(tmp_path / "p")
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(again((1, 1), x), mlp((1, 1), x), rtol=0, atol=0)


def _loss(**sections) -> LossConfig:
    return LossConfig.model_validate({"logits": {"weight": 0.0}, **sections})


def test_config_sections():
    assert _loss(hidden={"weight": 1.0}).uses_features  # a feature term alone is something to learn
    with pytest.raises(ValueError, match="every loss weight is 0"):
        _loss()
    with pytest.raises(ValueError, match="last_k needs k"):
        _loss(hidden={"weight": 1.0, "mapping": "last_k"})
    with pytest.raises(ValueError, match="set mapping: pairs"):
        _loss(attention={"weight": 1.0, "pairs": [[2, 1]]})
    with pytest.raises(ConfigError, match="feature distillation"):
        validate_config({"data": {"source": "x.jsonl"}, "student": {"config": {"model_type": "llama"}},
                         "loss": {"logits": {"weight": 0}, "hidden": {"weight": 1}}})


def test_distiller_checks_mapping_and_relation_heads():
    teacher, student = tiny("llama", layers=3, width=32), tiny("gpt2", layers=2, width=24)
    with pytest.raises(ConfigError, match="loss.hidden.mapping=all: .*teacher has 3 layers and the student 2"):
        FeatureDistiller(_loss(hidden={"weight": 1.0, "mapping": "all"}), teacher, student)
    with pytest.raises(ConfigError, match=r"relation_heads=3 does not divide the q/k/v widths \[32, 16, 16\] of "
                                          r"teacher layer 3"):
        FeatureDistiller(_loss(attention={"weight": 1.0, "relation_heads": 3}), teacher, student)
    with pytest.raises(ConfigError, match="loss.hidden.projector: .*equal widths"):
        FeatureDistiller(_loss(hidden={"weight": 1.0, "projector": "identity"}), teacher, student)
    fd = FeatureDistiller(_loss(hidden={"weight": 1.0, "mapping": "uniform"}, attention={"weight": 1.0}),
                          teacher, student)
    assert fd.hidden_pairs == [(2, 1), (3, 2)] and fd.attention_pairs == [(3, 2)] and fd.relation_heads == 4
    assert fd.student_layers == ([1, 2], [2]) and fd.teacher_layers == ([2, 3], [3])
    assert set(fd.checkpoint_modules()) == {"projectors"}
    attention_only = FeatureDistiller(_loss(attention={"weight": 1.0}), teacher, student)
    assert attention_only.checkpoint_modules() == {} and attention_only.parameters() == []


@pytest.mark.parametrize("teacher_family,student_family", [("gpt2", "llama"), ("llama", "qwen2"), ("gemma", "mistral")])
def test_terms_across_families_train_the_projectors(teacher_family, student_family):
    teacher, student = tiny(teacher_family, layers=3, width=32), tiny(student_family, layers=2, width=16)
    cfg = _loss(ce={"weight": 0.0}, hidden={"weight": 1.0, "mapping": "uniform_last"},
                attention={"weight": 0.5, "relation_heads": 2})
    fd = FeatureDistiller(cfg, teacher, student)
    x = torch.randint(1, V, (2, 9))
    labels = x.clone()
    labels[1, 5:] = -100
    with torch.no_grad(), capture(teacher, *fd.teacher_layers) as t:
        teacher(input_ids=x)
    with capture(student, *fd.student_layers) as s:
        student(input_ids=x)
    terms = fd.terms(s, t, labels, torch.ones_like(x))
    assert set(terms) == {"hidden", "attention"} and all(v > 0 for v in terms.values())
    (terms["hidden"] + terms["attention"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fd.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad and p.dim() > 1
               and p is not student.get_output_embeddings().weight)


def test_feature_mask_is_the_shifted_label_mask():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, -100]])
    assert feature_mask(labels).tolist() == [[True, False, True, False], [True, True, False, False]]
