"""On-policy pieces one at a time: prompts of tokenized data, the sampler, where each row's
completion comes from, how a sampled micro-batch is laid out, the teacher's NLL of samples."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from potstill.config import DataConfig, OnPolicyConfig
from potstill.data import build_datasets
from potstill.data.batching import MicroBatch, StepBatcher
from potstill.data.prompts import Prompts, find_prompts
from potstill.data.tokenized import IGNORE_INDEX, TokenizedDataset
from potstill.errors import DataError
from potstill.models.heads import HeadParams
from potstill.models.sampling import ModelSampler, SamplingSettings, cut_at_stop, sample_seed
from potstill.teachers.signal import TeacherSignal
from potstill.training.onpolicy import (
    DATA,
    STUDENT,
    TEACHER,
    OnPolicyTokens,
    check_context,
    sample_stats,
    teacher_nll_of_samples,
)
from potstill.training.tokens import TokenSource
import tiny


def _dataset(items: list[tuple[list[int], list[int]]], fmt: str = "messages", packing: bool = False):
    """A TokenizedDataset from (tokens, loss flags) items, as the data cache holds them."""
    tokens = np.concatenate([np.asarray(t, np.int32) for t, _ in items])
    loss = np.concatenate([np.asarray(m, np.uint8) for _, m in items])
    offsets = np.concatenate([[0], np.cumsum([len(t) for t, _ in items])]).astype(np.int64)
    manifest = {"fingerprint": "x", "max_length": 64, "packing": packing, "format": fmt,
                "n_tokens": int(len(tokens)), "n_loss_tokens": int(loss.sum())}
    return TokenizedDataset(tokens, loss, offsets, manifest)


# -- prompts -------------------------------------------------------------------------------------
def test_prompt_is_everything_before_the_last_completion_position_by_position():
    ds = _dataset([
        ([5, 6, 7, 8, 9, 2], [0, 0, 0, 1, 1, 1]),            # one turn: prompt 5 6 7
        ([5, 6, 7, 8, 9, 2, 3, 4, 8, 2, 0], [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0]),  # two turns: the last one
        ([8, 9, 2], [1, 1, 1]),                               # no prompt part
    ])
    p = find_prompts(ds, eos_id=0, special_ids={0, 1, 2})
    assert p.length.tolist() == [3, 8, 0]
    assert p.n_without == 1
    # EOS, and the token that ends the completions where it is special (2: an end-of-turn marker)
    assert p.stop_ids == [0, 2]


def test_stop_ids_ignore_ordinary_last_tokens():
    ds = _dataset([([5, 6, 7, 9], [0, 0, 1, 1])])
    assert find_prompts(ds, eos_id=0, special_ids={0, 1, 2}).stop_ids == [0]


def test_chat_prompts_end_with_the_generation_prompt(tmp_path, tokenizer, chat_jsonl):
    cfg = DataConfig(source=str(chat_jsonl), packing=False, max_length=256, cache_dir=str(tmp_path))
    train, _ = build_datasets(cfg, tokenizer, progress=False)
    p = find_prompts(train, eos_id=tokenizer.eos_token_id, special_ids=set(tokenizer.all_special_ids))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert p.stop_ids == sorted({tokenizer.eos_token_id, im_end})
    for i in range(len(train)):
        item = train[i]
        n = int(p.length[i])
        assert tokenizer.decode(item["input_ids"][:n]).endswith("<|im_start|>assistant\n")
        # earlier assistant turns (loss tokens in the data) are part of the prompt; the header is not
        assert item["labels"][n - 1] == IGNORE_INDEX and item["labels"][n] != IGNORE_INDEX
        # the completion is the LAST assistant turn: no loss token after it starts a new run
        rest = (item["labels"][n:] != IGNORE_INDEX).int()
        assert not (rest[1:] > rest[:-1]).any()


def test_plain_prompt_completion_prompts(tmp_path):
    tok = tiny.build_tokenizer(tmp_path / "tok", chat_template=None)
    rows = [{"prompt": f"The teacher {w}", "completion": " learns from data."} for w in ("reads", "writes")]
    data = tiny.write_jsonl(tmp_path / "pc.jsonl", rows * 10)
    cfg = DataConfig(source=str(data), packing=False, validation_fraction=0.0, cache_dir=str(tmp_path / "c"))
    train, _ = build_datasets(cfg, tok, progress=False)
    p = find_prompts(train, eos_id=tok.eos_token_id, special_ids=set(tok.all_special_ids))
    for i in range(len(train)):
        ids = train[i]["input_ids"].tolist()
        assert tok.decode(ids[:p.length[i]]) in ("The teacher reads", "The teacher writes")
    assert p.stop_ids == [tok.eos_token_id]


@pytest.mark.parametrize("fmt,packing,words", [("text", False, "plain text"), ("messages", True, "packed")])
def test_data_without_prompts_is_refused(fmt, packing, words):
    with pytest.raises(DataError, match=words):
        find_prompts(_dataset([([5, 6, 7], [0, 1, 1])], fmt=fmt, packing=packing), eos_id=0, special_ids={0})


def test_all_loss_data_has_no_prompt_part():
    with pytest.raises(DataError, match="no prompt part"):
        find_prompts(_dataset([([5, 6, 7], [1, 1, 1])] * 3), eos_id=0, special_ids={0})


def test_prompts_too_long_for_the_context_are_one_line():
    p = Prompts(length=np.array([10, 200, 30]), stop_ids=[0])
    check_context(p, 56, {"student": 256, "teacher": None})  # 200 + 56 fits exactly
    with pytest.raises(DataError) as err:
        check_context(p, 57, {"student": 256, "teacher": 512})
    msg = str(err.value)
    assert "1 of 3 training prompts" in msg and "student's context of 256" in msg and "at most 56" in msg
    assert "\n" not in msg


# -- sampling ------------------------------------------------------------------------------------
def test_cut_at_stop_and_seeds():
    assert cut_at_stop([4, 5, 2, 0, 0], [0, 2]) == [4, 5, 2]
    assert cut_at_stop([4, 5, 6], [0, 2]) == [4, 5, 6]
    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1)
    seeds = {sample_seed(s, step, m, k) for s in (0, 1) for step in (0, 1) for m in (0, 1) for k in (0, 1)}
    assert len(seeds) == 16 and all(0 <= x < 2**63 for x in seeds)


@pytest.fixture(scope="module")
def small_model(tokenizer):
    return tiny.build_llama(None, len(tokenizer), hidden_size=32, layers=2, seed=5).eval()


def test_sampler_is_reproducible_and_leaves_the_run_alone(small_model):
    s = ModelSampler(small_model, SamplingSettings(max_new_tokens=12), stop_ids=[0], pad_id=0)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    small_model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = s.sample(prompts, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the run's random stream is not consumed
    assert small_model.training  # put back in train mode
    assert a == s.sample(prompts, seed=7)
    assert a != s.sample(prompts, seed=8)
    assert len(a) == 3 and all(1 <= len(c) <= 12 for c in a)
    assert all(0 not in c[:-1] for c in a)  # nothing after a stop id


def test_greedy_batched_left_padding_equals_one_prompt_at_a_time(small_model):
    s = ModelSampler(small_model, SamplingSettings(max_new_tokens=8, temperature=0.0), stop_ids=[0], pad_id=0)
    prompts = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13]]
    batched = s.sample(prompts, seed=0)
    assert batched == [s.sample([p], seed=1)[0] for p in prompts]
    # greedy: each token is the argmax of the model's next-token logits
    ids = torch.tensor([prompts[1] + batched[1]])
    with torch.no_grad():
        logits = small_model(input_ids=ids).logits[0]
    assert batched[1] == logits[len(prompts[1]) - 1:-1].argmax(-1).tolist()[:len(batched[1])]


def test_sampler_vocab_limit_and_top_k(small_model):
    limit = 40
    s = ModelSampler(small_model, SamplingSettings(max_new_tokens=20, temperature=5.0), stop_ids=[0], pad_id=0,
                     vocab=limit)
    out = s.sample([[5, 6]] * 8, seed=3)
    assert all(t < limit for c in out for t in c)
    one = ModelSampler(small_model, SamplingSettings(max_new_tokens=6, temperature=5.0, top_k=1), stop_ids=[0],
                       pad_id=0)
    greedy = ModelSampler(small_model, SamplingSettings(max_new_tokens=6, temperature=0.0), stop_ids=[0], pad_id=0)
    assert one.sample([[5, 6]], seed=1) == greedy.sample([[5, 6]], seed=2)  # top_k=1 is greedy


# -- where each row's completion comes from --------------------------------------------------------
class _Echo:
    """A sampler that writes a known completion: the prompt's last token + 100, twice, then stop id 2."""

    synced = False

    def __init__(self):
        self.calls = []

    def sample(self, prompts, *, seed):
        self.calls.append((len(prompts), seed))
        return [[p[-1] + 100, p[-1] + 100, 2] for p in prompts]

    def sync_weights(self):
        pass


def _source(lmbda=1.0, per="step", seq_kd=False, n=1, world=1, rank=0, grad_accum=1, no_prompt=()):
    items = [([1, 10 + i, 20 + i, 30 + i, 40 + i, 2], [0, 0, 0, 1, 1, 1]) for i in range(16)]
    for i in no_prompt:
        items[i] = (items[i][0], [1] * 6)
    ds = _dataset(items)
    batcher = StepBatcher(len(ds), batch_size=4, grad_accum=grad_accum, world_size=world, rank=rank, seed=0)
    data = TokenSource(ds, batcher, 0, torch.device("cpu"))
    prompts = Prompts(length=np.array([0 if i in no_prompt else 3 for i in range(16)]), stop_ids=[0, 2])
    cfg = OnPolicyConfig(lmbda=lmbda, per=per, seq_kd=seq_kd, num_completions=n)
    return OnPolicyTokens(data, prompts, cfg, student=_Echo(), teacher=_Echo() if seq_kd else None, seed=0,
                          world_size=world, rank=rank, pad_id=0)


def test_lmbda_zero_keeps_the_data_and_one_samples_everything():
    off = _source(lmbda=0.0)
    for step in range(20):
        assert set(off.origins(step, 0, list(range(4)))) == {DATA}
    on = _source(lmbda=1.0)
    for step in range(20):
        assert set(on.origins(step, 0, list(range(4)))) == {STUDENT}


def test_gkd_mixture_per_step_and_per_sequence():
    per_step = _source(lmbda=0.5)
    roles = [per_step.origins(s, 0, list(range(4))) for s in range(200)]
    assert all(len(set(r)) == 1 for r in roles)  # one draw for the whole step
    share = sum(r[0] == STUDENT for r in roles) / 200
    assert 0.4 < share < 0.6  # fixed seeds, so deterministic; 0.1 is ~3 standard deviations of 200 draws
    per_seq = _source(lmbda=0.5, per="sequence")
    rows = [per_seq.origins(s, m, list(range(4))) for s in range(100) for m in range(2)]
    assert any(len(set(r)) == 2 for r in rows)  # rows of one micro-batch differ
    assert rows == [per_seq.origins(s, m, list(range(4))) for s in range(100) for m in range(2)]  # reproducible
    assert 0.4 < sum(o == STUDENT for r in rows for o in r) / 800 < 0.6
    seq_kd = _source(lmbda=0.0, seq_kd=True)
    assert set(seq_kd.origins(3, 0, list(range(4)))) == {TEACHER}


def test_rows_without_a_prompt_keep_the_data():
    src = _source(lmbda=1.0, no_prompt=(0, 5))
    assert src.origins(0, 0, [0, 1, 5, 7]) == [DATA, STUDENT, DATA, STUDENT]


def test_a_sampled_micro_batch_is_prompt_plus_completion_with_labels_on_the_completion():
    src = _source(lmbda=1.0, n=2)
    (batch,) = src.take(0)
    assert batch.origins == [STUDENT] * 8 and len(batch.example_indices) == 8
    assert batch.example_indices[0] == batch.example_indices[1]  # two completions per prompt
    for row in range(8):
        i = batch.example_indices[row]
        prompt = [1, 10 + i, 20 + i]
        expect = prompt + [20 + i + 100, 20 + i + 100, 2]
        assert batch.input_ids[row].tolist() == expect
        assert batch.labels[row].tolist() == [IGNORE_INDEX] * 3 + expect[3:]
        assert batch.attention_mask[row].tolist() == [1] * 6
    assert sample_stats(batch) == {"seqs": 8.0, "student_seqs": 8.0, "completion_tokens": 24.0}


def test_mixed_micro_batch_keeps_data_rows_as_they_were_and_right_pads():
    src = _source(lmbda=0.5, per="sequence")
    step = next(s for s in range(50) if len(set(src.origins(s, 0, src.data.batcher.micro_batches(s)[0]))) == 2)
    data = [b for b in TokenSource(src.data.dataset, src.data.batcher, 0, torch.device("cpu")).take(step)][0]
    (batch,) = src.take(step)
    for row, origin in enumerate(batch.origins):
        n = int(batch.attention_mask[row].sum())
        if origin == DATA:
            assert torch.equal(batch.input_ids[row, :n], data.input_ids[row, :n])
            assert torch.equal(batch.labels[row, :n], data.labels[row, :n])
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()


def test_seq_kd_samples_from_the_teacher_stream():
    src = _source(lmbda=0.0, seq_kd=True)
    (batch,) = src.take(2)
    assert batch.origins == [TEACHER] * 4
    assert src.teacher.calls and not src.student.calls
    assert src.teacher.calls[0][1] == sample_seed(0, 2, 0, 1)


def test_two_processes_sample_what_one_with_accumulation_samples():
    one = _source(lmbda=1.0, grad_accum=2)
    ranks = [_source(lmbda=1.0, world=2, rank=r) for r in (0, 1)]
    for step in range(3):
        a = one.take(step)
        b = [src.take(step)[0] for src in ranks]
        for x, y in zip(a, b):
            assert x.example_indices == y.example_indices and torch.equal(x.input_ids, y.input_ids)
    assert [c[1] for c in one.student.calls] == [c[1] for pair in zip(*(r.student.calls for r in ranks))
                                                 for c in pair]


def test_only_data_steps_are_handed_out_ahead_of_time():
    src = _source(lmbda=0.5)
    roles = [src.step_role(s) for s in range(12)]
    ahead = src.upcoming(0, 3, 12)
    expected = []
    for s in range(1, 4):
        if roles[s] != DATA:
            break
        expected += [b.example_indices for b in src.data.peek(s)]
    assert [b.example_indices for b in ahead] == expected
    assert _source(lmbda=1.0).upcoming(0, 3, 12) == []


def test_served_teacher_keys_a_sampled_batch_apart_from_the_data_one():
    from potstill.teachers.served import ServedTeacher

    ids = torch.zeros((1, 3), dtype=torch.long)
    data = MicroBatch(ids, torch.ones_like(ids), ids, [4], 2)
    sampled = MicroBatch(ids, torch.ones_like(ids), ids, [4], 2, [STUDENT])
    assert ServedTeacher._key(data) != ServedTeacher._key(sampled)


# -- the teacher's NLL of the samples --------------------------------------------------------------
def test_teacher_nll_of_samples_from_hidden_states_equals_from_logits():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 6, 8), torch.randn(20, 8)
    logits = hidden @ weight.T
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, 9, 1, 2]])
    ids = labels.clamp(min=0)
    batch = MicroBatch(ids, torch.ones_like(ids), labels, [0, 1], 0, [STUDENT, DATA])
    dense_logits = teacher_nll_of_samples(TeacherSignal(kind="dense", logits=logits), batch,
                                          autocast=contextlib.nullcontext)
    head = HeadParams(weight=weight, bias=None, softcap=None)
    dense_hidden = teacher_nll_of_samples(TeacherSignal(kind="dense", hidden=hidden, head=head), batch,
                                          autocast=contextlib.nullcontext, chunk_rows=1)
    # only row 0 (the student's), positions 1..3 predict labels 3, 4, 5
    expected = -torch.log_softmax(logits[0, 1:4], -1).gather(1, torch.tensor([[3], [4], [5]])).sum()
    assert dense_logits[1] == dense_hidden[1] == 3.0
    assert dense_logits[0] == pytest.approx(float(expected), rel=1e-5)
    assert dense_hidden[0] == pytest.approx(float(expected), rel=1e-5)
    none = MicroBatch(ids, torch.ones_like(ids), labels, [0, 1], 0, None)
    assert teacher_nll_of_samples(TeacherSignal(kind="dense", logits=logits), none, autocast=None) is None


def test_draw_next_samples_the_tempered_cut_distribution():
    """The inverse-CDF draw against the distribution it must follow: frequencies of 40,000 draws
    within 5 standard errors of softmax(scores / T), cut by top_k / top_p as transformers cuts."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from potstill.models.sampling import draw_next

    torch.manual_seed(0)
    scores = torch.randn(1, 12) * 2
    n = 40_000
    for settings in (SamplingSettings(1, temperature=1.0), SamplingSettings(1, temperature=0.5),
                     SamplingSettings(1, temperature=1.0, top_k=4), SamplingSettings(1, temperature=1.3, top_p=0.7)):
        z = scores / settings.temperature
        if settings.top_k:
            z = TopKLogitsWarper(settings.top_k)(None, z.clone())
        if settings.top_p < 1:
            z = TopPLogitsWarper(settings.top_p)(None, z.clone())
        expected = torch.softmax(z, -1)[0]
        g = torch.Generator().manual_seed(1)
        draws = torch.cat([draw_next(scores.expand(1000, -1).clone(), settings, g) for _ in range(n // 1000)])
        freq = torch.bincount(draws, minlength=12).double() / n
        se = (expected.double() * (1 - expected.double()) / n).sqrt()
        assert ((freq - expected.double()).abs() <= 5 * se + 1e-12).all(), settings
        assert (freq[expected == 0] == 0).all()  # a cut token is never drawn

