"""The chunked loss path trains exactly like the plain one, and is chosen only where it is exact."""

from __future__ import annotations

import pytest
import torch

import potstill
from potstill.errors import ConfigError
from potstill.models.hidden import forward_hidden, supports_chunked
from potstill.training.metrics import read_metrics


def _cfg(out, teacher_dir, data, path, divergence="jsd"):
    return {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 64}},
        "data": {"source": str(data), "max_length": 48, "packing": False, "validation_fraction": 0.1},
        "loss": {"logits": {"divergence": divergence, "temperature": 2.0, "t2_scaling": True},
                 "ce": {"weight": 0.3}, "path": path, "chunk_size": 7},
        "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "precision": "fp32", "log_every": 1,
                  "checkpoint_every": None},
        "eval": {"max_batches": 2},
        "output": {"dir": str(out), "tensorboard": False, "report": False},
    }


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_chunked_run_equals_plain_run(tmp_path, teacher_dir, text_jsonl, divergence, caplog):
    caplog.set_level("INFO", logger="potstill")
    runs = {}
    for path in ("plain", "chunked"):
        result = potstill.distill(_cfg(tmp_path / path, teacher_dir, text_jsonl, path, divergence), progress=False)
        runs[path] = [r for r in read_metrics(result.metrics_path) if "loss" in r]
    assert "loss path: chunked" in caplog.text and "loss path: plain" in caplog.text
    for plain, chunked in zip(runs["plain"], runs["chunked"]):
        for key in ("loss", "loss/kd", "loss/ce", "grad_norm"):
            assert chunked[key] == pytest.approx(plain[key], rel=2e-5), (plain["step"], key)


def test_forward_hidden_gives_what_the_head_consumes(teacher_dir):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    llama = AutoModelForCausalLM.from_pretrained(teacher_dir)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=384, bos_token_id=0,
                                      eos_token_id=0)).eval()  # no dropout
    x = torch.randint(0, 384, (2, 9))
    for model in (llama, gpt2):
        head, why = supports_chunked(model)
        assert head is not None, why
        hidden = forward_hidden(model, model, x, torch.ones_like(x))
        logits = torch.nn.functional.linear(hidden, head.weight, head.bias)
        torch.testing.assert_close(logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_auto_falls_back_and_forced_chunked_refuses(tmp_path, teacher_dir, text_jsonl, caplog):
    """A teacher whose forward we cannot drive for hidden states: auto says so, chunked is an error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class Wrapped(torch.nn.Module):  # e.g. a user's wrapper with its own forward
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def forward(self, **kwargs):
            return self.model(**kwargs)

        def get_output_embeddings(self):
            return self.model.get_output_embeddings()

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    cfg = _cfg(tmp_path / "auto", teacher_dir, text_jsonl, "auto")
    cfg["teacher"] = {"name_or_path": Wrapped(AutoModelForCausalLM.from_pretrained(teacher_dir)), "tokenizer": tok}
    cfg["train"]["max_steps"] = 1
    caplog.set_level("INFO", logger="potstill")
    potstill.distill(cfg, progress=False)
    assert "loss path: plain (full logits), because Wrapped.forward has no logits_to_keep" in caplog.text
    cfg["loss"]["path"] = "chunked"
    cfg["output"]["dir"] = str(tmp_path / "forced")
    with pytest.raises(ConfigError, match="loss.path=chunked is not possible"):
        potstill.distill(cfg, progress=False)
