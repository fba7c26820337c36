"""Bits per byte (and per character): the byte and character counts of the scored text, and the metrics
two tokenizers share."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

import tiny
from potstill.commands.quickstart import DEMO_TEACHER
from potstill.data.tokenized import TokenizedDataset
from potstill.training.evaluation import evaluate_models, scored_bytes, scored_chars

TEXTS = ["Größe of ünïcödé: 日本語 and emoji 🙂 in one line.",
         "def f(x):\n    return x  # tabs\tand  double  spaces\n\nend.",
         "plain ascii text, nothing special"]


@pytest.fixture(scope="module")
def demo_tok():
    return AutoTokenizer.from_pretrained(DEMO_TEACHER)


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    return tiny.build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_of_a_fully_scored_text_are_its_utf8_bytes(demo_tok, text):
    ids = _ids(demo_tok, text)
    assert scored_bytes(demo_tok, ids, torch.ones_like(ids, dtype=torch.bool)) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", TEXTS)
def test_chars_of_a_fully_scored_text_are_its_characters(demo_tok, text):
    ids = _ids(demo_tok, text)
    assert scored_chars(demo_tok, ids, torch.ones_like(ids, dtype=torch.bool)) == len(text)


def test_two_tokenizers_count_the_same_bytes(demo_tok, small_tok):
    for text in TEXTS[1:]:  # the tiny test tokenizer knows no CJK / emoji bytes
        a, b = _ids(demo_tok, text), _ids(small_tok, text)
        assert a.shape[1] != b.shape[1]  # really different tokenizations
        assert scored_bytes(demo_tok, a, torch.ones_like(a, dtype=torch.bool)) == \
            scored_bytes(small_tok, b, torch.ones_like(b, dtype=torch.bool)) == len(text.encode())
        assert scored_chars(demo_tok, a, torch.ones_like(a, dtype=torch.bool)) == \
            scored_chars(small_tok, b, torch.ones_like(b, dtype=torch.bool)) == len(text)


def test_only_scored_runs_count_and_special_tokens_spell_nothing(demo_tok):
    first, second = "Hello world.", " Second part here."
    ids_1, ids_2 = _ids(demo_tok, first), _ids(demo_tok, second)
    eos = torch.tensor([[demo_tok.eos_token_id]])
    ids = torch.cat([ids_1, eos, ids_2], dim=1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert scored_bytes(demo_tok, ids, mask) == len((first + second).encode())
    mask[0, : ids_1.shape[1]] = False  # the first sentence is a prompt: not scored
    assert scored_bytes(demo_tok, ids, mask) == len(second.encode())
    # rows are counted separately and summed
    two = torch.cat([ids, ids]), torch.cat([mask, mask])
    assert scored_bytes(demo_tok, *two) == 2 * len(second.encode())
    assert scored_chars(demo_tok, *two) == 2 * len(second)


def test_bpb_is_the_summed_nll_over_ln2_times_bytes(demo_tok):
    """evaluate_models' bpb against a float64 computation from the model's own logits."""
    torch.manual_seed(0)
    model = tiny.build_llama(None, len(demo_tok), hidden_size=32, layers=1).eval()
    enc = [demo_tok(t, add_special_tokens=False)["input_ids"] + [demo_tok.eos_token_id] for t in TEXTS]
    import numpy as np

    tokens = np.concatenate([np.asarray(e, np.int32) for e in enc])
    offsets = np.cumsum([0] + [len(e) for e in enc]).astype(np.int64)
    manifest = {"fingerprint": "t", "max_length": 64, "packing": False, "n_tokens": len(tokens),
                "n_loss_tokens": len(tokens)}
    ds = TokenizedDataset(tokens, np.ones_like(tokens, np.uint8), offsets, manifest)
    out = evaluate_models(model, ds, pad_token_id=demo_tok.pad_token_id, batch_size=2, device=torch.device("cpu"),
                          tokenizer=demo_tok)
    nll, n_bytes, n_chars = 0.0, 0, 0
    with torch.no_grad():
        for e in enc:
            ids = torch.tensor([e])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
            n_bytes += len(demo_tok.decode(e[1:], skip_special_tokens=True).encode())
            n_chars += len(demo_tok.decode(e[1:], skip_special_tokens=True))
    assert out["bytes"] == n_bytes
    assert out["bpb"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert out["bpb"] * math.log(2) * out["bytes"] == pytest.approx(out["ce"] * out["tokens"], rel=1e-9)
    assert out["chars"] == n_chars < n_bytes  # the texts are not all ASCII
    assert out["bpc"] == pytest.approx(nll / (math.log(2) * n_chars), rel=1e-5)
    assert out["bpc"] == pytest.approx(out["bpb"] * n_bytes / n_chars, rel=1e-12)
