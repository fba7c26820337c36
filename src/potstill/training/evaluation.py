"""Evaluation: perplexity, bits per byte and per character, teacher-student divergence and top-1 agreement.

``evaluate_models`` is what the training loop calls every ``eval.every`` steps, and what
``potstill evaluate`` (:mod:`potstill.commands.evaluate`) runs on a finished run or any model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import collate
from ..losses import cross_entropy, logit_divergence
from .objective import Objective, shift

log = logging.getLogger("potstill")


def reduce_sum(values: dict[str, torch.Tensor], accelerator=None) -> dict[str, float]:
    """Sum scalar tensors over processes (when distributed) and return floats."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].detach().double().reshape(()) for k in keys])
    if accelerator is not None and accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="sum")
    return {k: float(v) for k, v in zip(keys, stacked.cpu())}


@torch.no_grad()
def evaluate_models(
    student: nn.Module,
    dataset,
    *,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    teacher: nn.Module | None = None,
    objective: Objective | None = None,
    shared_vocab: int | None = None,
    max_batches: int | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    accelerator=None,
    progress: bool = False,
    lockstep: bool = False,
    tokenizer: Any = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Score the student (and its agreement with the teacher) on ``dataset``.

    Returns ``ce`` and ``ppl`` of the student; with a teacher also ``teacher_ce``,
    ``teacher_ppl``, ``kl`` (forward KL(teacher || student) at temperature 1, per token)
    and ``agreement`` (fraction of tokens where both models' top-1 prediction is the same);
    with an objective also ``kd`` (the configured divergence, per token). With ``tokenizer``
    also ``bpb`` (and ``teacher_bpb``): bits per UTF-8 byte of the scored text
    (:func:`scored_bytes`), which compares models whatever their tokenizers, ``bpc`` (and
    ``teacher_bpc``): bits per character of it (:func:`scored_chars`), and the ``bytes`` and
    ``chars`` counted. Every process
    takes its own slice of the data; sums are reduced before dividing. ``lockstep``: every
    process runs as many forwards as the busiest one (FSDP gathers weights with collectives);
    the extra ones repeat a batch and are not counted.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    # The cap applies to the whole evaluation, then processes share out its batches, so the
    # result is the same however many processes run it.
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    batches = batches[:max_batches]
    mine = batches[rank::world]
    rounds = -(-len(batches) // world) if lockstep else len(mine)
    counted = [True] * len(mine) + [False] * (rounds - len(mine))
    mine = mine + [batches[0]] * (rounds - len(mine))  # uncounted: only to take part in the gathers
    was_training = student.training
    student.eval()
    sums = {k: torch.zeros((), dtype=torch.float64) for k in ("ce", "n")}
    if tokenizer is not None:
        sums["bytes"] = torch.zeros((), dtype=torch.float64)
        sums["chars"] = torch.zeros((), dtype=torch.float64)
    if teacher is not None:
        sums.update({k: torch.zeros((), dtype=torch.float64) for k in ("teacher_ce", "kl", "agree")})
    if objective is not None and teacher is not None and objective.needs_teacher:
        sums["kd"] = torch.zeros((), dtype=torch.float64)
    for idx, count in tqdm(list(zip(mine, counted)), desc=desc, disable=not progress, leave=False):
        batch = collate([dataset[i] for i in idx], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if not count:
            batch["labels"] = torch.full_like(batch["labels"], -100)  # every term sums to zero
        with autocast():
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, targets, mask = shift(s_logits, batch["labels"])
        ce, n = cross_entropy(s, targets)
        sums["ce"] += ce.double().cpu()
        sums["n"] += n.double().cpu()
        if "bytes" in sums:
            n_bytes, n_chars = scored_sizes(tokenizer, targets, mask)
            sums["bytes"] += n_bytes
            sums["chars"] += n_chars
        if teacher is None:
            continue
        with autocast():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = t_logits[:, :-1]
        v = shared_vocab or min(s.shape[-1], t.shape[-1])
        t_ce, _ = cross_entropy(t, targets)
        kl, _ = logit_divergence("fkl", s[..., :v], t[..., :v], mask)
        agree = ((s[..., :v].argmax(-1) == t[..., :v].argmax(-1)) & mask).sum()
        sums["teacher_ce"] += t_ce.double().cpu()
        sums["kl"] += kl.double().cpu()
        sums["agree"] += agree.double().cpu()
        if "kd" in sums:
            kd, _ = objective.kd_sum(s_logits, t_logits, batch["labels"])
            sums["kd"] += kd.double().cpu()
    if was_training:
        student.train()
    totals = reduce_sum(sums, accelerator)
    n = max(totals.pop("n"), 1.0)
    n_bytes = totals.pop("bytes", 0.0)
    n_chars = totals.pop("chars", 0.0)
    out = {"ce": totals["ce"] / n}
    out["ppl"] = math.exp(min(out["ce"], 50.0))
    if n_bytes > 0:
        out["bpb"] = totals["ce"] / (math.log(2) * n_bytes)
    if n_chars > 0:
        out["bpc"] = totals["ce"] / (math.log(2) * n_chars)
    if teacher is not None:
        out["teacher_ce"] = totals["teacher_ce"] / n
        out["teacher_ppl"] = math.exp(min(out["teacher_ce"], 50.0))
        if n_bytes > 0:
            out["teacher_bpb"] = totals["teacher_ce"] / (math.log(2) * n_bytes)
        if n_chars > 0:
            out["teacher_bpc"] = totals["teacher_ce"] / (math.log(2) * n_chars)
        out["kl"] = totals["kl"] / n
        out["agreement"] = totals["agree"] / n
    if "kd" in totals:
        out["kd"] = totals["kd"] / n
    out["tokens"] = n
    if n_bytes > 0:
        out["bytes"] = n_bytes
    if n_chars > 0:
        out["chars"] = n_chars
    return out


def scored_bytes(tokenizer, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """UTF-8 bytes of the text the scored tokens spell.

    targets, mask: [batch, seq] (the shifted labels and which of them count). Each run of
    consecutive scored tokens is decoded as one piece (special tokens spell nothing), so a
    character split over several byte-level tokens counts once. Dividing the summed
    negative log-likelihood by ``ln 2`` times this gives bits per byte: a figure two models
    with different tokenizers share, where their perplexities (per token) are not comparable.
    """
    return scored_sizes(tokenizer, targets, mask)[0]


def scored_chars(tokenizer, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """Characters (Unicode code points) of the text the scored tokens spell, counted as
    :func:`scored_bytes` counts bytes; the denominator of bits per character."""
    return scored_sizes(tokenizer, targets, mask)[1]


def scored_sizes(tokenizer, targets: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(UTF-8 bytes, characters) of the text the scored tokens spell, each run decoded once."""
    n_bytes = n_chars = 0
    for piece in scored_pieces(tokenizer, targets, mask):
        n_bytes += len(piece.encode("utf-8"))
        n_chars += len(piece)
    return float(n_bytes), float(n_chars)


def scored_pieces(tokenizer, targets: torch.Tensor, mask: torch.Tensor):
    """The text of each run of consecutive scored tokens (targets, mask: [batch, seq]), row by
    row, decoded as one piece without special tokens."""
    ids, keep = targets.cpu().tolist(), mask.cpu().tolist()
    for row_ids, row_keep in zip(ids, keep):
        run: list[int] = []
        for token, counted in zip(row_ids + [0], row_keep + [False]):  # a sentinel closes the last run
            if counted:
                run.append(token)
            elif run:
                yield tokenizer.decode(run, skip_special_tokens=True)
                run = []
