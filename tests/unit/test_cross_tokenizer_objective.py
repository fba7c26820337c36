"""The identity case of cross-tokenizer distillation: with the same tokenizer on both sides and
the teacher's whole distribution kept (top_k = V), the aligned loss is the plain forward KL,
values and gradients, on both loss paths; and the online and cached aligned teachers give the
same targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from potstill.config import DataConfig, LossConfig
from potstill.data import build_datasets, build_teacher_view
from potstill.data.batching import MicroBatch
from potstill.models.heads import head_params
from potstill.models.hidden import forward_hidden
from potstill.models.vocab_map import build_vocab_map
from potstill.teachers.aligned import OnlineAlignedTeacher
from potstill.teachers.signal import TeacherSignal
from potstill.training.objective import Objective, StudentOutput
from tiny import build_llama, build_tokenizer, synthetic_sentences


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    tok = build_tokenizer(root / "tok", vocab_size=300)
    torch.manual_seed(0)
    # float64: the identity below holds to rounding, so it is checked tightly
    teacher = build_llama(None, len(tok), hidden_size=48, layers=2).double().eval()
    student = build_llama(None, len(tok), hidden_size=32, layers=1).double()
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_sentences(40)), encoding="utf-8")
    cfg = DataConfig(source=str(path), max_length=32, validation_fraction=0, cache_dir=str(root / "cache"))
    train, _ = build_datasets(cfg, tok, spans=True, progress=False)
    view = build_teacher_view(cfg, tok, progress=False)
    return tok, teacher, student, train, view


def loss_cfg(**logits):
    return LossConfig.model_validate({"logits": {"divergence": "fkl", **logits}, "ce": {"weight": 0.5},
                                      "cross_tokenizer": {"top_k": 300}})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_identical_tokenizers_give_forward_kl(setup, path, temperature):
    tok, teacher, student, train, view = setup
    batch = MicroBatch.collate(train, [0, 3, 5], tok.pad_token_id)
    cfg = loss_cfg(temperature=temperature)
    aligned = OnlineAlignedTeacher(teacher, view=view, train_ds=train, vocab_map=build_vocab_map(tok, tok),
                                   top_k=cfg.cross_tokenizer.top_k, temperature=temperature,
                                   pad_token_id=tok.pad_token_id)
    signal = aligned.signal(batch)
    # every target aligns with itself, exactly, and the teacher kept its whole distribution
    assert signal.aligned.exact.all() and len(signal.aligned.rows) == int(batch.n_valid)
    assert torch.isinf(signal.aligned.rest).all() or (signal.aligned.rest < -30).all()
    objective = Objective(cfg)

    def run(teacher_signal, use_hidden):
        student.zero_grad()
        if use_hidden:
            out = StudentOutput(hidden=forward_hidden(student, student, batch.input_ids, batch.attention_mask),
                                head=head_params(student))
        else:
            out = StudentOutput(logits=student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
        res = objective.compute(out, teacher_signal, batch)
        res.weighted_sum.backward()
        return res, [p.grad.clone() for p in student.parameters()]

    with torch.no_grad():
        if path == "chunked":
            dense = TeacherSignal(kind="dense", hidden=forward_hidden(teacher, teacher, batch.input_ids,
                                                                      batch.attention_mask), head=head_params(teacher))
        else:
            dense = TeacherSignal(kind="dense", logits=teacher(input_ids=batch.input_ids,
                                                               attention_mask=batch.attention_mask).logits)
    ref, ref_grads = run(dense, path == "chunked")
    got, got_grads = run(signal, path == "chunked")
    torch.testing.assert_close(got.weighted_sum, ref.weighted_sum, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.term_sums["kd"].double(), ref.term_sums["kd"].double(), rtol=1e-9, atol=1e-9)
    assert float(got.term_sums["kd_uld"]) == 0.0
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_window_of_a_packed_item_is_the_item_itself(setup):
    tok, teacher, student, train, view = setup
    aligned = OnlineAlignedTeacher(teacher, view=view, train_ds=train, vocab_map=build_vocab_map(tok, tok),
                                   top_k=8, temperature=1.0, pad_token_id=tok.pad_token_id)
    from potstill.data.alignment import teacher_window

    for i in range(len(train)):
        item = train[i]
        needed = {int(e): aligned._example(int(e)) for e in np.unique(item["spans"][:, 0])}
        ids, _ = teacher_window(item["spans"], needed)
        assert ids.tolist() == item["input_ids"].tolist()


def test_modes_select_rows(setup):
    tok, teacher, student, train, view = setup
    batch = MicroBatch.collate(train, [1, 2], tok.pad_token_id)
    aligned = OnlineAlignedTeacher(teacher, view=view, train_ds=train, vocab_map=build_vocab_map(tok, tok),
                                   top_k=16, temperature=1.0, pad_token_id=tok.pad_token_id)
    signal = aligned.signal(batch)
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    out = {}
    for mode in ("hybrid", "exact", "uld"):
        cfg = LossConfig.model_validate({"cross_tokenizer": {"mode": mode}})
        out[mode] = Objective(cfg).compute(StudentOutput(logits=logits), signal, batch).term_sums
    # identical tokenizers: every pair is exact, so hybrid is the exact part, and uld is its own
    torch.testing.assert_close(out["hybrid"]["kd"], out["exact"]["kd"])
    assert float(out["uld"]["kd_exact"]) == 0.0 and float(out["uld"]["kd_uld"]) > 0.0
    assert float(out["hybrid"]["kd_uld"]) == 0.0
