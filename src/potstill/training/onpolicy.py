"""On-policy tokens: the student writes the completions it trains on (GKD, Agarwal et al. 2024).

:class:`OnPolicyTokens` is a token source with the same methods as
:class:`~potstill.training.tokens.TokenSource`. For each micro-batch of the data it decides,
per optimizer step or per sequence (``onpolicy.per``), where each row's completion comes from:

    student   with probability ``onpolicy.lmbda``: the current student samples a completion to
              the row's prompt (its tokens before its completion: :mod:`potstill.data.prompts`)
    teacher   otherwise, with ``onpolicy.seq_kd``: the teacher samples it
    data      otherwise: the data's own completion (off-policy, as without this section)

A sampled row is ``prompt + completion`` with labels only on the completion (the stop token
included), right-padded like every micro-batch; ``num_completions`` samples per prompt give as
many rows. The teacher then scores the row like any other (the loop does not know the
difference), so every divergence and every loss path applies.

Reproducible: the decisions and the samples of global micro-batch ``g`` (``m * processes +
rank``, the batcher's order) of step ``s`` draw from seeds derived from (train.seed, s, g)
only (:func:`~potstill.models.sampling.sample_seed`). With the weights restored exactly, a resumed
run samples what the uninterrupted run sampled; and N processes sample what one process with
N times the accumulation samples.

The whole step's micro-batches are sampled before it trains, so the loss is normalized by the
valid tokens of the step on every process as always (:func:`~potstill.training.objective.step_loss`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..config import DistillConfig, OnPolicyConfig
from ..data.batching import MicroBatch
from ..data.prompts import Prompts, find_prompts
from ..data.tokenized import IGNORE_INDEX, collate
from ..errors import ConfigError, DataError
from ..models.sampling import ModelSampler, Sampler, SamplingSettings, sample_seed
from ..models.vocab import output_rows
from ..teachers.signal import TeacherSignal
from .tokens import TokenSource

log = logging.getLogger("potstill")

STUDENT, TEACHER, DATA = "student", "teacher", "data"
_STUDENT_STREAM, _TEACHER_STREAM, _CHOICE_STREAM = 0, 1, 2


def onpolicy_data_config(cfg: DistillConfig):
    """The data section an on-policy run tokenizes with: one example per sequence (no packing)."""
    if cfg.onpolicy.enabled and cfg.data.packing:
        log.info("onpolicy: the data are used one example per sequence (data.packing=false): a completion is "
                 "sampled for each example's prompt")
        return cfg.data.model_copy(update={"packing": False})
    return cfg.data


class OnPolicyTokens:
    """Micro-batches whose completions come from the data, the student or the teacher (module doc).

    ``data``: the run's data token source; ``prompts``: the prompt length of every train item;
    ``student`` / ``teacher``: their samplers (``teacher`` only with seq_kd)."""

    def __init__(self, data: TokenSource, prompts: Prompts, cfg: OnPolicyConfig, *, student: Sampler,
                 teacher: Sampler | None, seed: int, world_size: int, rank: int, pad_id: int,
                 special_ids: set[int] | None = None):
        self.data, self.prompts, self.cfg = data, prompts, cfg
        self.special_ids = special_ids or set()
        self.student, self.teacher = student, teacher
        self.seed, self.world_size, self.rank, self.pad_id = seed, world_size, rank, pad_id
        self.device = data.device

    # -- where each row's completion comes from --------------------------------------------------
    def _draw(self, step: int, micro: int, n: int) -> np.ndarray:
        g = torch.Generator().manual_seed(sample_seed(self.seed, step, micro, _CHOICE_STREAM))
        return torch.rand(n, generator=g, dtype=torch.float64).numpy()

    def _role(self, u: float) -> str:
        # u < lmbda, not <=: lmbda=0 is never on-policy, lmbda=1 always (u is in [0, 1)).
        return STUDENT if u < self.cfg.lmbda else (TEACHER if self.cfg.seq_kd else DATA)

    def step_role(self, step: int) -> str | None:
        """With ``per=step``: the role of every row of ``step``; None with ``per=sequence``."""
        return self._role(float(self._draw(step, -1, 1)[0])) if self.cfg.per == "step" else None

    def origins(self, step: int, micro: int, example_indices: list[int]) -> list[str]:
        """Each row's role in global micro-batch ``micro`` of ``step``; rows without a prompt keep the data's."""
        whole = self.step_role(step)
        roles = [whole] * len(example_indices) if whole is not None else \
            [self._role(float(u)) for u in self._draw(step, micro, len(example_indices))]
        return [DATA if self.prompts.length[i] == 0 else r for r, i in zip(roles, example_indices)]

    # -- the token-source methods ------------------------------------------------------------------
    def take(self, step: int) -> list[MicroBatch]:
        """The micro-batches of ``step`` with their completions sampled where their rows say so."""
        return [self.complete(batch, step, m * self.world_size + self.rank)
                for m, batch in enumerate(self.data.take(step))]

    def upcoming(self, step: int, lookahead: int, max_steps: int) -> list[MicroBatch]:
        """The micro-batches a teacher may score ahead of time: only those of coming steps that are the
        data's own (with ``per=step``); a sampled one does not exist before its step."""
        ahead = []
        for s in range(step + 1, min(step + 1 + lookahead, max_steps)):
            if self.step_role(s) != DATA:
                break
            ahead.extend(self.data.peek(s))
        return ahead

    def after_step(self) -> None:
        """The student's weights changed: a sampler with its own copy reloads them."""
        self.student.sync_weights()

    # -- one micro-batch ----------------------------------------------------------------------------
    def complete(self, batch: MicroBatch, step: int, micro: int) -> MicroBatch:
        origins = self.origins(step, micro, batch.example_indices)
        ids, labels = batch.input_ids.cpu(), batch.labels.cpu()
        lengths = batch.attention_mask.sum(1).tolist()
        n = self.cfg.num_completions
        sampled: dict[str, list[list[int]]] = {}
        for role, sampler, stream in ((STUDENT, self.student, _STUDENT_STREAM),
                                      (TEACHER, self.teacher, _TEACHER_STREAM)):
            rows = [i for i, o in enumerate(origins) if o == role]
            must_join = getattr(sampler, "synced", False) and (self.cfg.per == "sequence" or bool(rows))
            if sampler is None or not (rows or must_join):
                continue
            prompts = [ids[i, :self.prompts.length[batch.example_indices[i]]].tolist() for i in rows for _ in range(n)]
            sampled[role] = sampler.sample(prompts, seed=sample_seed(self.seed, step, micro, stream))
        examples, indices, kinds = [], [], []
        taken = {role: iter(done) for role, done in sampled.items()}
        for i, (origin, example) in enumerate(zip(origins, batch.example_indices)):
            if origin == DATA:
                examples.append({"input_ids": ids[i, :lengths[i]], "labels": labels[i, :lengths[i]]})
                indices.append(example)
                kinds.append(DATA)
                continue
            prompt = ids[i, :self.prompts.length[example]]
            for _ in range(n):
                completion = torch.as_tensor(next(taken[origin]), dtype=torch.long)
                examples.append({"input_ids": torch.cat([prompt, completion]),
                                 "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion])})
                indices.append(example)
                kinds.append(origin)
        b = collate(examples, self.pad_id)
        return MicroBatch(b["input_ids"], b["attention_mask"], b["labels"], indices, step, kinds).to(self.device)


def check_context(prompts: Prompts, max_new_tokens: int, contexts: dict[str, int | None]) -> None:
    """Refuse, in one line, prompts that leave no room for ``max_new_tokens`` in a model's context
    (``contexts``: model role -> its max_position_embeddings, None where unknown)."""
    known = {role: c for role, c in contexts.items() if c}
    if not known:
        return
    role, context = min(known.items(), key=lambda kv: kv[1])
    too_long = prompts.length + max_new_tokens > context
    if too_long.any():
        worst = int(np.argmax(prompts.length))
        raise DataError(
            f"{int(too_long.sum())} of {len(prompts.length)} training prompts are too long for the {role}'s context "
            f"of {context} positions with onpolicy.max_new_tokens={max_new_tokens} (the longest: "
            f"{int(prompts.length[worst])} tokens, item {worst}): lower onpolicy.max_new_tokens to at most "
            f"{max(context - int(prompts.length.max()), 0)}, or shorten or drop the long prompts")


def build_onpolicy_tokens(cfg: DistillConfig, data: TokenSource, train_ds, tokenizer, *, student, teacher_model,
                          shared_vocab: int | None, autocast, synced: bool, world_size: int, rank: int
                          ) -> OnPolicyTokens:
    """The on-policy token source of a run: prompts found and checked, samplers for the student
    (and the teacher, with seq_kd) built. ``shared_vocab``: the logit columns teacher and student
    share (None: the tokenizer's length bounds what is sampled); ``synced``: the models are
    sharded over the processes."""
    op = cfg.onpolicy
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    prompts = find_prompts(train_ds, eos_id=tokenizer.eos_token_id, special_ids=special)
    contexts = {"student": getattr(student.config, "max_position_embeddings", None)}
    if teacher_model is not None:
        contexts["teacher"] = getattr(getattr(teacher_model, "config", None), "max_position_embeddings", None)
    check_context(prompts, op.max_new_tokens, contexts)
    if prompts.n_without:
        log.warning("onpolicy: %d of %d training examples have no prompt part (their completion starts at their first "
                    "token): they keep the data's completion", prompts.n_without, len(prompts.length))
    if op.seq_kd and teacher_model is None:
        raise ConfigError("onpolicy.seq_kd samples completions from the teacher, and no teacher model is loaded "
                          "in this process")
    if cfg.loss.logits.divergence == "token_rkl" and op.lmbda < 1:
        log.warning("loss.logits.divergence=token_rkl estimates the reverse KL only on the student's own samples; "
                    "on the other %.0f%% of the sequences it is a biased objective", 100 * (1 - op.lmbda))
    settings = SamplingSettings(max_new_tokens=op.max_new_tokens, temperature=op.temperature, top_p=op.top_p,
                                top_k=op.top_k)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    vocab = shared_vocab if shared_vocab is not None else len(tokenizer)

    def sampler(model):
        rows = output_rows(model)
        return ModelSampler(model, settings, stop_ids=prompts.stop_ids, pad_id=pad, autocast=autocast, synced=synced,
                            vocab=vocab if rows is None or rows > vocab else None)

    log.info("onpolicy: lmbda %.2f (per %s)%s, %d completion(s) per prompt, up to %d new tokens, temperature %g; "
             "completions end at ids %s", op.lmbda, op.per, ", seq_kd" if op.seq_kd else "", op.num_completions,
             op.max_new_tokens, op.temperature, prompts.stop_ids)
    return OnPolicyTokens(data, prompts, op, student=sampler(student),
                          teacher=sampler(teacher_model) if op.seq_kd else None, seed=cfg.train.seed,
                          world_size=world_size, rank=rank, pad_id=pad, special_ids=special)


# -- what the logs show about the samples ----------------------------------------------------------
def sample_stats(batch: MicroBatch) -> dict[str, float]:
    """Counts of one micro-batch: its sequences, the student-sampled ones, their completion tokens."""
    if batch.origins is None:
        return {"seqs": float(len(batch.example_indices)), "student_seqs": 0.0, "completion_tokens": 0.0}
    student = torch.tensor([o == STUDENT for o in batch.origins], device=batch.labels.device)
    completion = (batch.labels != IGNORE_INDEX).sum(1)
    return {"seqs": float(len(batch.origins)), "student_seqs": float(student.sum()),
            "completion_tokens": float(completion[student].sum())}


@torch.no_grad()
def teacher_nll_of_samples(signal: TeacherSignal, batch: MicroBatch, *, autocast, chunk_rows: int = 2048
                           ) -> tuple[float, float] | None:
    """(sum, count) of the teacher's negative log-likelihood of the student-sampled completion
    tokens of ``batch`` (at temperature 1); None for a sparse signal (a top-k need not hold the
    sampled token) or a batch without student samples. Row chunks: never B x T x V logits."""
    if batch.origins is None or STUDENT not in batch.origins or signal.kind != "dense":
        return None
    student = torch.tensor([o == STUDENT for o in batch.origins], device=batch.labels.device)
    mask = (batch.labels[:, 1:] != IGNORE_INDEX) & student[:, None]
    targets = batch.labels[:, 1:][mask]
    if signal.logits is not None:
        rows = signal.logits[:, :-1][mask].float()
        return float(-(torch.log_softmax(rows, -1).gather(1, targets[:, None])).sum()), float(len(targets))
    hidden, head = signal.hidden[:, :-1][mask], signal.head
    total = 0.0
    for lo in range(0, len(targets), chunk_rows):
        with autocast():
            z = hidden[lo:lo + chunk_rows] @ head.weight.T
        z = z.float()
        if head.bias is not None:
            z = z + head.bias.float()
        if head.softcap is not None:
            z = torch.tanh(z / head.softcap) * head.softcap
        t = targets[lo:lo + chunk_rows]
        total += float((torch.logsumexp(z, -1) - z.gather(1, t[:, None]).squeeze(1)).sum())
    return total, float(len(targets))


# -- evaluation: what the teacher thinks of the student's own completions ------------------------------
_EVAL_STREAM = 3


@torch.no_grad()
def evaluate_samples(tokens: OnPolicyTokens, val_ds, teacher, *, batch_size: int, max_batches: int | None,
                     autocast, accelerator=None, lockstep: bool = False) -> dict[str, float]:
    """``sample_teacher_nll``: the teacher's per-token NLL of completions the student samples (with
    the run's sampling settings) for the validation prompts, and ``sample_len``, their mean length.
    The on-policy quality signal: lower is a student whose own text the teacher finds likelier.
    Each validation batch draws from the same seed at every evaluation, so the curve compares like
    with like. Batches are shared out over the processes as :func:`~.evaluation.evaluate_models`
    does (``lockstep``: extra rounds that sample and score but are not counted). {} when the
    validation data have no prompts."""
    from .evaluation import reduce_sum

    try:
        prompts = find_prompts(val_ds, eos_id=tokens.prompts.stop_ids[0], special_ids=tokens.special_ids,
                               describe="the validation data")
    except DataError:
        return {}
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    usable = [i for i in range(len(val_ds)) if prompts.length[i] > 0]
    batches = [usable[i:i + batch_size] for i in range(0, len(usable), batch_size)][:max_batches]
    mine = list(enumerate(batches))[rank::world]
    rounds = -(-len(batches) // world) if lockstep else len(mine)
    counted = [True] * len(mine) + [False] * (rounds - len(mine))
    mine = mine + [(0, batches[0])] * (rounds - len(mine)) if batches else mine
    sums = {"nll": torch.zeros((), dtype=torch.float64), "n": torch.zeros((), dtype=torch.float64),
            "seqs": torch.zeros((), dtype=torch.float64)}
    device = tokens.device
    was_training = teacher.training
    for (b, idx), count in zip(mine, counted):
        rows = [val_ds[i]["input_ids"][:prompts.length[i]] for i in idx]
        done = tokens.student.sample([r.tolist() for r in rows], seed=sample_seed(tokens.seed, -1, b, _EVAL_STREAM))
        examples = [{"input_ids": torch.cat([r, torch.as_tensor(c, dtype=torch.long)]),
                     "labels": torch.cat([torch.full_like(r, IGNORE_INDEX), torch.as_tensor(c, dtype=torch.long)])}
                    for r, c in zip(rows, done)]
        batch = collate(examples, tokens.pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if not count:
            continue
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        rows_logits = logits[:, :-1][mask].float()
        targets = batch["labels"][:, 1:][mask]
        sums["nll"] += (torch.logsumexp(rows_logits, -1)
                        - rows_logits.gather(1, targets[:, None]).squeeze(1)).sum().double().cpu()
        sums["n"] += float(len(targets))
        sums["seqs"] += float(len(examples))
    teacher.train(was_training)
    totals = reduce_sum(sums, accelerator)
    if not totals["n"]:
        return {}
    # A completion of c tokens predicts c targets after the shift (its first token is predicted from the prompt).
    return {"sample_teacher_nll": totals["nll"] / totals["n"], "sample_len": totals["n"] / max(totals["seqs"], 1.0)}
