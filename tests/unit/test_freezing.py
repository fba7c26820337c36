"""student.freeze / train_only / spectrum: which parameters train, and the one-line errors."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from tiny import build_llama

from potstill.errors import ConfigError
from potstill.models.freezing import FrozenReport, apply_freezing, read_spectrum

V = 64


def tiny(**extra):
    return build_llama(None, V, hidden_size=16, layers=2, heads=2, intermediate=32, **extra)


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def frozen(model) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


def test_freeze_freezes_exactly_the_matching_names():
    model = tiny()
    patterns = [r"layers\.0\.", "norm"]
    report = apply_freezing(model, freeze=patterns)
    expected = [n for n in names(model) if any(re.search(p, n) for p in patterns)]
    assert report.frozen_names == expected == frozen(model)
    assert "model.norm.weight" in expected and "lm_head.weight" not in expected
    params = dict(model.named_parameters())
    assert report.frozen == sum(params[n].numel() for n in expected)
    assert report.trainable == sum(p.numel() for n, p in params.items() if n not in expected)


def test_train_only_trains_exactly_the_matching_names():
    model = tiny()
    report = apply_freezing(model, train_only=[r"^model\.layers\.1\.mlp\.", "lm_head"])
    assert trainable(model) == [n for n in names(model) if n.startswith("model.layers.1.mlp.")] + ["lm_head.weight"]
    assert report.frozen_names == frozen(model)


def test_freeze_wins_over_train_only():
    model = tiny()
    apply_freezing(model, train_only=[r"layers\.1\."], freeze=[r"layers\.1\.mlp"])
    assert trainable(model) == [n for n in names(model) if "layers.1." in n and "mlp" not in n]


SPECTRUM_YAML = """\
unfrozen_parameters:
- ^lm_head.weight$
- ^model.embed_tokens.weight$
# input_layernorm layers
# lm_head layers
# mlp.down_proj layers
- model.layers.1.mlp.down_proj
"""


def test_spectrum_yaml_trains_its_parameters_only(tmp_path):
    path = tmp_path / "snr_results_tiny_unfrozenparameters_50percent.yaml"
    path.write_text(SPECTRUM_YAML)
    assert read_spectrum(path) == ["^lm_head.weight$", "^model.embed_tokens.weight$", "model.layers.1.mlp.down_proj"]
    model = tiny()
    report = apply_freezing(model, spectrum=str(path))
    assert sorted(trainable(model)) == ["lm_head.weight", "model.embed_tokens.weight",
                                        "model.layers.1.mlp.down_proj.weight"]
    assert len(report.frozen_names) == len(names(model)) - 3


@pytest.mark.parametrize("content, fragment", [
    (None, "no file at"),
    ("unfrozen_parameters: [a\n", "not valid YAML"),
    ("frozen_parameters:\n- a\n", "no top-level 'unfrozen_parameters' key"),
    ("- a\n- b\n", "no top-level 'unfrozen_parameters' key"),
    ("unfrozen_parameters: []\n", "non-empty list of regex strings"),
    ("unfrozen_parameters:\n", "non-empty list of regex strings"),
    ("unfrozen_parameters:\n- 1\n- 2\n", "non-empty list of regex strings"),
    ("unfrozen_parameters:\n- 'model.layers.[1'\n", "not a valid regular expression"),
])
def test_spectrum_file_errors_are_one_line(tmp_path, content, fragment):
    path = tmp_path / "spectrum.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_spectrum(path)
    assert_one_line(err, "student.spectrum", fragment)


@pytest.mark.parametrize("kwargs, setting", [
    ({"freeze": ["layers.(0"]}, "student.freeze"),
    ({"train_only": ["lm_head[", "layers.0"]}, "student.train_only"),
])
def test_invalid_regex_is_one_line(kwargs, setting):
    with pytest.raises(ConfigError) as err:
        apply_freezing(tiny(), **kwargs)
    assert_one_line(err, setting, "not a valid regular expression")


def test_pattern_matching_nothing_names_examples_and_a_close_match():
    model = tiny()
    with pytest.raises(ConfigError) as err:
        apply_freezing(model, train_only=["lm_head"], freeze=[r"^model\.layer\.1\.mlp"])
    text = assert_one_line(err, "student.freeze", "matches no parameter", "model.embed_tokens.weight",
                           "did you mean 'model.layers.1.mlp'")
    assert text.count("weight") <= 3  # three example names
    assert r"'^model\.layer\.1\.mlp'" in text  # the pattern as written, not its repr
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


def test_close_match_can_be_a_middle_part():
    with pytest.raises(ConfigError) as err:
        apply_freezing(tiny(), train_only=["q_projj"])
    assert_one_line(err, "student.train_only", "did you mean 'q_proj'")


def test_spectrum_pattern_matching_nothing(tmp_path):
    path = tmp_path / "spectrum.yaml"
    path.write_text("unfrozen_parameters:\n- ^model.layers.7.mlp.down_proj\n")
    with pytest.raises(ConfigError) as err:
        apply_freezing(tiny(), spectrum=path)
    assert_one_line(err, "student.spectrum", "'^model.layers.7.mlp.down_proj' matches no parameter")


@pytest.mark.parametrize("kwargs, settings", [
    ({"freeze": ["."]}, "student.freeze"),
    ({"train_only": ["layers.0"], "freeze": ["layers"]}, "student.train_only and student.freeze"),
])
def test_nothing_left_to_train_is_one_line(kwargs, settings):
    model = tiny()
    with pytest.raises(ConfigError) as err:
        apply_freezing(model, **kwargs)
    assert_one_line(err, settings, "nothing left to train")
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


def test_no_settings_change_nothing():
    model = tiny()
    report = apply_freezing(model)
    assert report.frozen == 0 and report.frozen_names == []
    assert report.trainable == sum(p.numel() for p in model.parameters())


def test_an_optimizer_step_leaves_frozen_tensors_bit_identical():
    model = tiny()
    apply_freezing(model, freeze=["embed_tokens", r"layers\.0\."])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if "embed_tokens" in n or "layers.0." in n:
            assert torch.equal(p, before[n]), n
            assert p.grad is None, n
        else:
            assert not torch.equal(p, before[n]), n


def test_already_frozen_parameters_stay_frozen():
    model = tiny()
    model.lm_head.weight.requires_grad_(False)  # e.g. frozen by LoRA
    report = apply_freezing(model, train_only=["lm_head", r"layers\.0\."])
    assert not model.lm_head.weight.requires_grad
    assert trainable(model) == [n for n in names(model) if "layers.0." in n]
    assert "lm_head.weight" in report.frozen_names


def test_tied_head_freezes_the_embeddings_and_says_so(caplog):
    model = tied_llama()
    assert "lm_head.weight" not in names(model)  # one tensor, listed once
    logger = logging.getLogger("potstill")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="potstill"):
            report = apply_freezing(model, freeze=["^lm_head"])
    finally:
        logger.removeHandler(caplog.handler)
    assert report.frozen_names == ["model.embed_tokens.weight"]
    assert not model.lm_head.weight.requires_grad
    assert "tied to model.embed_tokens.weight" in caplog.text and "stay frozen" in caplog.text


def test_describe():
    report = FrozenReport(trainable=1_200_000, frozen=2_200_000, frozen_names=[f"t{i}" for i in range(14)])
    assert report.describe() == "training 1.20M of 3.40M parameters (35.3%); 14 tensors frozen"
    assert FrozenReport(trainable=900, frozen=0, frozen_names=[]).describe() == \
        "training 900 of 900 parameters (100.0%); 0 tensors frozen"
