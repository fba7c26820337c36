"""The teacher interface: every source answers a micro-batch with a TeacherSignal, the objective
picks the loss form from the signal's kind, and a new source plugs into the loop unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from potstill.config import LossConfig, validate_config
from potstill.data.batching import MicroBatch
from potstill.models.heads import head_params
from potstill.teachers import NoTeacher, SparseTargets, Teacher, TeacherSignal
from potstill.teachers.local import LocalTeacher
from potstill.training.objective import Objective, StudentOutput


def _batch(vocab: int, seed: int = 0) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 10), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100           # a prompt
    labels[2, 7:] = -100           # padding
    attn = torch.ones_like(ids)
    attn[2, 7:] = 0
    return MicroBatch(ids, attn, labels, example_indices=[5, 1, 9], step=0)


def _full_topk(logits: torch.Tensor, labels: torch.Tensor) -> SparseTargets:
    """Top-k with k = V of a teacher's logits at the valid positions: the whole distribution."""
    mask = labels[:, 1:] != -100
    logp = torch.log_softmax(logits[:, :-1][mask].float(), -1)
    values, ids = logp.sort(-1, descending=True)
    rest = torch.full(values.shape[:1], float("-inf"))
    return SparseTargets(kind="topk", ids=ids, vocab=logits.shape[-1], logp=values, rest=rest)


@pytest.fixture(scope="module")
def models(teacher_dir, student_dir):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    return teacher, student


def test_local_teacher_gives_the_form_its_loss_path_needs(models):
    teacher, _ = models
    batch = _batch(teacher.config.vocab_size)
    source = LocalTeacher(teacher, needs_logits=True)
    assert source.chunked_problem() is None and source.model is teacher
    source.use_loss_path("chunked")
    dense = source.signal(batch)
    assert (dense.kind, dense.form) == ("dense", "dense-hidden")
    assert dense.hidden.shape == (3, 10, teacher.config.hidden_size) and dense.logits is None
    assert dense.head.weight is teacher.get_output_embeddings().weight
    source.use_loss_path("plain")
    plain = source.signal(batch)
    assert plain.form == "dense-logits" and plain.logits.shape == (3, 10, teacher.config.vocab_size)
    torch.testing.assert_close(torch.nn.functional.linear(dense.hidden, dense.head.weight), plain.logits,
                               rtol=1e-5, atol=1e-5)
    assert not plain.logits.requires_grad  # the teacher never builds a graph
    # Hard labels only and no feature terms: no forward at all.
    assert LocalTeacher(teacher, needs_logits=False).signal(batch).kind == "none"
    assert NoTeacher().signal(batch).form == "none"


def test_objective_picks_the_form_from_the_signal(models):
    """The same loss from every (student form, signal form) pair a run makes: hidden states with a
    dense hidden-state signal or a top-k with k = V (chunked path); logits with dense logits or the
    same top-k (plain path)."""
    teacher, student = models
    batch = _batch(teacher.config.vocab_size, seed=1)
    objective = Objective(LossConfig.model_validate({"logits": {"divergence": "fkl"}, "ce": {"weight": 0.5},
                                                     "chunk_size": 4}))
    with torch.no_grad():
        t_hidden = teacher.get_decoder()(input_ids=batch.input_ids).last_hidden_state
        t_logits = teacher(input_ids=batch.input_ids).logits
    signals = {"dense-hidden": TeacherSignal("dense", hidden=t_hidden, head=head_params(teacher)),
               "dense-logits": TeacherSignal("dense", logits=t_logits),
               "sparse": TeacherSignal("sparse", sparse=_full_topk(t_logits, batch.labels))}
    results = {}
    for s_form in ("hidden", "logits"):
        for t_form, signal in signals.items():
            if (s_form, t_form) in (("hidden", "dense-logits"), ("logits", "dense-hidden")):
                continue  # not pairs a run makes: both sides follow one loss path
            if s_form == "hidden":
                s_out = StudentOutput(hidden=student.get_decoder()(input_ids=batch.input_ids).last_hidden_state,
                                      head=head_params(student))
            else:
                s_out = StudentOutput(logits=student(input_ids=batch.input_ids).logits)
            out = objective.compute(s_out, signal, batch)
            grads = torch.autograd.grad(out.weighted_sum, list(student.parameters()))
            results[(s_form, t_form)] = (out, grads)
    (ref, ref_grads), *others = results.values()
    assert int(ref.n_valid) == int((batch.labels[:, 1:] != -100).sum())
    for out, grads in others:
        torch.testing.assert_close(out.weighted_sum, ref.weighted_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.term_sums["kd"], ref.term_sums["kd"], rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_mismatched_pair_is_a_clear_error(models):
    teacher, student = models
    batch = _batch(teacher.config.vocab_size)
    hidden = student.get_decoder()(input_ids=batch.input_ids).last_hidden_state
    with pytest.raises(ValueError, match="same loss path"):
        Objective(LossConfig()).compute(StudentOutput(hidden=hidden, head=head_params(student)),
                                        TeacherSignal("dense", logits=torch.zeros(3, 10, 8)), batch)


class TopKSource(Teacher):
    """A source the loop has never heard of: the teacher's full top-k, computed on request, with
    the micro-batches it was told about ahead of time recorded (as a server would prefetch)."""

    lookahead = 1

    def __init__(self, model):
        self._model = model
        self.prefetched: list[int] = []
        self.asked: list[int] = []

    def prefetch(self, batches):
        self.prefetched.extend(b.step for b in batches)

    @torch.no_grad()
    def signal(self, batch):
        self.asked.append(batch.step)
        logits = self._model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return TeacherSignal("sparse", sparse=_full_topk(logits, batch.labels))


@pytest.mark.parametrize("path", ["chunked", "plain"])
def test_a_new_source_plugs_into_the_loop_unchanged(tmp_path, teacher_dir, text_jsonl, path):
    """The loop's step body with the local teacher and with a new sparse source (k = V) gives the
    same loss and the same gradient norm: the loop does not know where the signal comes from."""
    from accelerate.utils import set_seed

    from potstill.training.loop import make_accelerator, train_step
    from potstill.training.setup import build_run

    cfg = validate_config({
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 64}},
        "data": {"source": str(text_jsonl), "max_length": 32, "packing": False, "validation_fraction": 0.1},
        "loss": {"logits": {"divergence": "fkl"}, "ce": {"weight": 0.2}, "path": path},
        "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run"), "report": False}})
    figures = {}
    for name in ("local", "new source"):
        set_seed(cfg.train.seed)
        run = build_run(cfg, make_accelerator("fp32"), "fp32", tmp_path / name, progress=False)
        if name == "new source":
            run.teacher = TopKSource(run.teacher.model)
        losses = []
        for step in range(2):
            run.teacher.prefetch(run.tokens.upcoming(step, run.teacher.lookahead, run.max_steps))
            sums, grad_norm = train_step(run, run.tokens.take(step), step, None)
            losses.append((float(sums["loss"]), float(sums["kd"]), grad_norm))
        figures[name] = losses
    assert run.teacher.asked == [0, 0, 1, 1] and run.teacher.prefetched == [1, 1, 2, 2]
    for (loss, kd, norm), (loss_ref, kd_ref, norm_ref) in zip(figures["new source"], figures["local"]):
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        assert kd == pytest.approx(kd_ref, rel=1e-5)
        assert norm == pytest.approx(norm_ref, rel=1e-4)
