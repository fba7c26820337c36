"""Minitron-style pruning (potstill.models.pruning): shapes, parameter targets, importance, and
that the sliced student computes what the teacher computes with the same parts switched off."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import build_llama
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from potstill.config import PruneConfig
from potstill.errors import ModelError
from potstill.models.pruning import (
    count_parameters,
    measure_importance,
    prune_teacher,
    pruned_config,
)

VOCAB = 96


def batches(n: int = 2, seed: int = 0) -> list[dict]:
    """Calibration batches (2, 12) with right padding in the second row and some -100 labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, :2] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def sharpen(model):
    """Scale q_proj and k_proj up: at init attention is near uniform, so the query heads of one GQA
    group (sharing one value head) would have near-equal importance and the choice among them be untested."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model.eval()


def llama(**kw):
    return sharpen(build_llama(None, VOCAB, **{"hidden_size": 32, "layers": 3, "heads": 4, "intermediate": 48, **kw}))


def gqa_llama():
    """4 query heads over 2 key/value heads (groups of 2), head_dim 8."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return sharpen(LlamaForCausalLM(cfg))


def qwen2(**kw):
    """Qwen2 with q/k/v biases (made non-zero) and tied embeddings."""
    torch.manual_seed(2)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **kw)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    return sharpen(model)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(scores.topk(k).indices.tolist())


def zero_heads(model, layer: int, heads: list[int]) -> None:
    """Switch query heads off: their o_proj input columns become zero."""
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for h in heads:
            model.model.layers[layer].self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0


# ---------------------------------------------------------------------------------------------
# Shapes and parameter counts (config only)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: llama(),
    gqa_llama,
    qwen2,
    lambda: build_llama(None, VOCAB, hidden_size=32, layers=1, intermediate=40, attention_bias=True, mlp_bias=True),
    lambda: MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)),
], ids=["llama", "gqa", "qwen2-tied", "llama-biases", "mistral"])
def test_count_parameters_is_exact(make):
    model = make()
    assert count_parameters(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("make", [llama, qwen2], ids=["llama", "qwen2"])
def test_params_target_is_reached_and_exact(make):
    teacher = make()
    full = count_parameters(teacher.config)
    target = full * 6 // 10
    cfg = pruned_config(teacher.config, PruneConfig(params=target, round_to=4))
    built = type(teacher)(cfg)
    assert count_parameters(cfg) <= target
    assert count_parameters(cfg) == sum(p.numel() for p in built.parameters())
    assert cfg.hidden_size % 4 == 0 and cfg.intermediate_size % 4 == 0
    assert cfg.hidden_size < teacher.config.hidden_size and cfg.intermediate_size < teacher.config.intermediate_size
    # The fit is tight: one more rounding step of both widths would not fit.
    bigger = copy.deepcopy(cfg)
    bigger.hidden_size, bigger.intermediate_size = cfg.hidden_size + 4, cfg.intermediate_size + 4
    assert count_parameters(bigger) > target
    assert cfg.head_dim == 8  # the teacher's 32 / 4, kept while hidden_size shrinks


def test_params_keeps_the_given_fields():
    teacher = llama()
    cfg = pruned_config(teacher.config, PruneConfig(params=count_parameters(teacher.config) // 2, num_layers=2,
                                                    intermediate_size=40))
    assert (cfg.num_hidden_layers, cfg.intermediate_size) == (2, 40)
    assert cfg.hidden_size < 32 and count_parameters(cfg) <= count_parameters(teacher.config) // 2


def test_pruned_config_is_a_copy_with_the_teachers_head_dim():
    teacher = gqa_llama()
    before = teacher.config.to_dict()
    cfg = pruned_config(teacher.config, PruneConfig(hidden_size=16, num_attention_heads=2, num_layers=1))
    assert teacher.config.to_dict() == before
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (16, 2, 2, 1)
    assert cfg.head_dim == 8


def test_layer_types_follow_the_kept_blocks():
    teacher = qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert teacher.config.layer_types == ["full_attention", "sliding_attention"]
    assert pruned_config(teacher.config, PruneConfig(num_layers=1)).layer_types == ["full_attention"]
    imp = measure_importance(teacher, batches())
    student = prune_teacher(teacher, PruneConfig(num_layers=1), batches())
    assert student.config.layer_types == [teacher.config.layer_types[imp.layers.argmax().item()]]


def test_pruned_config_needs_no_data():
    """The shape a meta-device build gets from the config alone is the shape prune_teacher returns."""
    teacher = gqa_llama()
    prune = PruneConfig(hidden_size=24, intermediate_size=32, num_key_value_heads=1, num_layers=1)
    cfg = pruned_config(teacher.config, prune)
    with torch.device("meta"):
        meta = type(teacher)(cfg)
    student = prune_teacher(teacher, prune, batches())
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    assert student.config.to_dict() == cfg.to_dict()


BAD = [
    ({"hidden_size": 64}, "student.from_teacher.prune.hidden_size 64 is larger than the teacher's 32"),
    ({"intermediate_size": 49}, "student.from_teacher.prune.intermediate_size 49 is larger than the teacher's 48"),
    ({"num_layers": 3}, "student.from_teacher.prune.num_layers 3 is larger than the teacher's 2"),
    ({"num_key_value_heads": 4}, "student.from_teacher.prune.num_key_value_heads 4 is larger than the teacher's 2"),
    ({"num_attention_heads": 3},
     "student.from_teacher.prune.num_attention_heads 3 is not a multiple of the teacher's 2 key/value heads"),
    ({"num_attention_heads": 3, "num_key_value_heads": 2}, "heads that do not divide"),
    ({"num_attention_heads": 4, "num_key_value_heads": 1}, "puts 4 query heads in a group, more than the teacher's 2"),
    ({"params": 1000}, "student.from_teacher.prune.params 1000 is below the smallest reachable student"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[m.split(" ")[0].split(".")[-1] + str(i)
                                                      for i, (_, m) in enumerate(BAD)])
def test_bad_targets_are_one_line_errors(fields, message):
    with pytest.raises(ModelError) as err:
        pruned_config(gqa_llama().config, PruneConfig(**fields))
    text = str(err.value)
    assert message in text and "student.from_teacher.prune." in text
    assert "\n" not in text


def test_multi_head_teacher_stays_multi_head():
    cfg = pruned_config(llama().config, PruneConfig(num_attention_heads=2))
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 2)


def test_hidden_size_must_be_a_multiple_of_the_heads():
    """transformers refuses a hidden size that the query heads do not divide, head_dim set or not;
    a parameter count rounds the fitted width to a multiple of both round_to and the heads."""
    with pytest.raises(ModelError) as err:
        pruned_config(llama().config, PruneConfig(num_attention_heads=3))
    assert "not a multiple of 3 query heads" in str(err.value) and "\n" not in str(err.value)
    teacher = llama().config
    cfg = pruned_config(teacher, PruneConfig(num_attention_heads=3, hidden_size=24))
    assert cfg.hidden_size == 24 and cfg.head_dim == 8
    cfg = pruned_config(teacher, PruneConfig(num_attention_heads=3, params=count_parameters(teacher) // 2, round_to=4))
    assert cfg.hidden_size % 12 == 0


def test_fewer_groups_keep_the_group_size():
    cfg = pruned_config(gqa_llama().config, PruneConfig(num_key_value_heads=1))
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)


def test_unsupported_family_is_one_line():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    for call in (lambda: pruned_config(gpt2.config, PruneConfig(num_layers=1)),
                 lambda: prune_teacher(gpt2, PruneConfig(num_layers=1), batches())):
        with pytest.raises(ModelError) as err:
            call()
        assert "llama, qwen2, mistral" in str(err.value) and "gpt2" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# The sliced student equals the teacher with the same parts switched off
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [llama, gqa_llama, qwen2], ids=["llama", "gqa", "qwen2"])
def test_full_shape_is_the_teacher(make):
    teacher = make()
    student = prune_teacher(teacher, PruneConfig(num_layers=teacher.config.num_hidden_layers), batches())
    assert type(student) is type(teacher) and student.dtype == torch.float32
    for batch in batches(seed=5):
        torch.testing.assert_close(logits(student, batch), logits(teacher, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, prune", [
    (llama, PruneConfig(num_attention_heads=2)),
    (gqa_llama, PruneConfig(num_attention_heads=2)),     # one query head per group
    (gqa_llama, PruneConfig(num_key_value_heads=1)),     # a whole group goes
    (qwen2, PruneConfig(num_attention_heads=2)),
], ids=["mha", "gqa-heads", "gqa-groups", "qwen2"])
def test_head_pruning_equals_zeroed_heads(make, prune):
    teacher = make()
    imp = measure_importance(teacher, batches())
    student = prune_teacher(teacher, prune, batches())
    reference = copy.deepcopy(teacher)
    n, kv = teacher.config.num_attention_heads, teacher.config.num_key_value_heads
    group, per_group = n // kv, student.config.num_attention_heads // student.config.num_key_value_heads
    for i in range(teacher.config.num_hidden_layers):
        scores = imp.heads[i].view(kv, group)
        kept = [g * group + h for g in top(scores.sum(1), student.config.num_key_value_heads)
                for h in top(scores[g], per_group)]
        zero_heads(reference, i, [h for h in range(n) if h not in kept])
    assert student.config.num_attention_heads == len(kept)
    for batch in batches(seed=5):
        torch.testing.assert_close(logits(student, batch), logits(reference, batch), atol=1e-5, rtol=1e-5)


def test_mlp_pruning_equals_zeroed_channels():
    teacher = llama()
    imp = measure_importance(teacher, batches())
    student = prune_teacher(teacher, PruneConfig(intermediate_size=20), batches())
    reference = copy.deepcopy(teacher)
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            dropped = [c for c in range(48) if c not in top(imp.mlp[i], 20)]
            layer.mlp.down_proj.weight[:, dropped] = 0
    assert student.model.layers[0].mlp.down_proj.weight.shape == (32, 20)
    for batch in batches(seed=5):
        torch.testing.assert_close(logits(student, batch), logits(reference, batch), atol=1e-5, rtol=1e-5)


def test_depth_pruning_equals_skipped_blocks():
    teacher = llama(layers=4)
    imp = measure_importance(teacher, batches())
    kept = top(imp.layers, 2)
    student = prune_teacher(teacher, PruneConfig(num_layers=2), batches())
    for i in set(range(4)) - set(kept):  # a skipped block passes its input through
        teacher.model.layers[i].register_forward_hook(lambda _m, args, kwargs, out: args[0], with_kwargs=True)
    for batch in batches(seed=5):
        torch.testing.assert_close(logits(student, batch), logits(teacher, batch), atol=1e-5, rtol=1e-5)


def identity_block_teacher(layer: int = 1):
    """A 3-block llama whose block ``layer`` adds nothing (o_proj and down_proj zero), with a sharp
    output head, trained on its own greedy predictions (so skipping any real block costs loss)."""
    teacher = llama()
    with torch.no_grad():
        teacher.model.layers[layer].self_attn.o_proj.weight.zero_()
        teacher.model.layers[layer].mlp.down_proj.weight.zero_()
        teacher.lm_head.weight.mul_(20)
    data = batches()
    for batch in data:
        batch["labels"] = logits(teacher, batch).argmax(-1).roll(1, dims=1)  # labels are shifted by the loss
    return teacher, data


@pytest.mark.parametrize("how", ["cosine", "loss"])
def test_identity_block_is_least_important_and_removed_first(how):
    teacher, data = identity_block_teacher()
    imp = measure_importance(teacher, data, layer_importance=how)
    assert imp.layers.argmin().item() == 1 and abs(imp.layers[1].item()) < 1e-6
    assert (imp.layers[[0, 2]] > 1e-3).all(), imp.layers
    student = prune_teacher(teacher, PruneConfig(num_layers=2, layer_importance=how), data)
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    for batch in data:  # the block did nothing, so the logits are the teacher's
        torch.testing.assert_close(logits(student, batch), logits(teacher, batch), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Hidden channels, importance, tied weights, quantized teachers, saving
# ---------------------------------------------------------------------------------------------

def test_hidden_pruning_keeps_the_dominant_channels_and_ties():
    teacher = qwen2()
    dominant = [1, 5, 6, 11, 17, 20, 26, 31]
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("norm.weight"):
                p[dominant] = 10.0
    student = prune_teacher(teacher, PruneConfig(hidden_size=8), batches())
    assert student.model.embed_tokens.weight.shape == (VOCAB, 8)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, dominant])
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    attn = student.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 8) and attn.o_proj.weight.shape == (8, 32)
    assert student.model.layers[0].mlp.down_proj.weight.shape == (8, 48)
    assert (student.model.norm.weight == 10).all()
    assert student.config.head_dim == 8 and torch.isfinite(logits(student, batches()[0])).all()


def test_importance_uses_only_real_tokens():
    """Changing padded tokens changes no statistic; shapes are (H,), (L, n), (L, I), (L,)."""
    teacher = gqa_llama()
    data = batches()
    imp = measure_importance(teacher, data)
    assert (imp.hidden.shape, imp.heads.shape, imp.mlp.shape, imp.layers.shape) == ((32,), (2, 4), (2, 48), (2,))
    assert (imp.heads > 0).all() and (imp.mlp > 0).all()
    for batch in data:
        batch["input_ids"][1, 9:] = (batch["input_ids"][1, 9:] + 1) % VOCAB
    again = measure_importance(teacher, data)
    for a, b in zip((imp.hidden, imp.heads, imp.mlp, imp.layers), (again.hidden, again.heads, again.mlp, again.layers)):
        torch.testing.assert_close(a, b)


def test_calibration_batches_limit_the_data():
    teacher = llama()
    seen = []
    teacher.model.embed_tokens.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    prune_teacher(teacher, PruneConfig(num_layers=2, calibration_batches=3), iter(batches(5)))
    assert len(seen) == 3


def test_int4_teacher_prunes_from_its_dequantized_weights():
    from potstill.models.int4 import quantize_int4_

    teacher = llama()
    quantize_int4_(teacher, lambda m, name: "layers" in name, group_size=16)
    student = prune_teacher(teacher, PruneConfig(num_layers=3), batches())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    torch.testing.assert_close(logits(student, batches()[0]), logits(teacher, batches()[0]), atol=1e-4, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    teacher = qwen2()
    student = prune_teacher(teacher, PruneConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2),
                            batches())
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is Qwen2ForCausalLM and loaded.config.head_dim == 8
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded, batches()[0]), logits(student, batches()[0]))


def test_logs_the_shapes(caplog):
    with caplog.at_level("INFO", logger="potstill"):
        prune_teacher(llama(), PruneConfig(num_layers=2), batches())
    assert "layers 3, hidden 32" in caplog.text and "layers 2, hidden 32" in caplog.text


def test_progress_bar_only_when_asked(capsys):
    teacher = llama()
    measure_importance(teacher, batches(), layer_importance="loss")
    assert capsys.readouterr().err == ""
    measure_importance(teacher, batches(), layer_importance="loss", progress=True)
    assert "prune: importance" in capsys.readouterr().err
