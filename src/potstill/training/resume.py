"""Resuming with changed settings: which keys may change, refusing the others, using the new values.

A checkpoint stores the config of the run that wrote it. Resuming compares it with the config
given now. Keys in :data:`MAY_CHANGE` take their new values (a lower learning rate after a
divergence, a longer schedule, another evaluation cadence); any other difference is refused
in one line that names the keys, before a model is loaded: data, batch shape, models, seed
and precision decide what the saved state means, so changing them would silently train
something else.

The learning-rate schedule is rebuilt from the new settings and set to the resumed step, so
``lr(step)`` is what a run started with the new settings would use at that step. Without a
change the saved optimizer and scheduler state are used as they are (bit-exact resume).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from ..config import DistillConfig, config_to_dict
from ..errors import ConfigError

log = logging.getLogger("potstill")

# Keys (or whole sections, ending in '.') whose value may differ on resume.
MAY_CHANGE: tuple[str, ...] = (
    # the schedule and the optimizer's hyperparameters
    "train.lr", "train.max_steps", "train.epochs", "train.scheduler", "train.warmup_steps", "train.warmup_ratio",
    "train.weight_decay", "train.adam_betas", "train.adam_eps", "train.max_grad_norm",
    # cadence, bookkeeping and how the run was started
    "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.resume",
    "eval.", "output.", "cache.", "generate.", "stages",
    # the logit and CE terms carry no state; the loss path computes the same values
    "loss.logits.", "loss.ce.", "loss.path", "loss.chunk_size", "loss.memory_budget_mb",
    # memory only
    "student.gradient_checkpointing", "data.cache_dir", "train.fsdp.reshard_after_forward", "train.fsdp.cpu_offload",
    # where and how patiently a served teacher is reached (the model and its top_k decide the targets)
    "teacher.server.url", "teacher.server.timeout_s", "teacher.server.retries", "teacher.server.backoff_s",
    "teacher.server.max_concurrency", "teacher.server.lookahead", "teacher.server.api_key_env",
)
# Changing these rebuilds the learning-rate schedule from the new settings.
SCHEDULE_KEYS = ("train.lr", "train.max_steps", "train.epochs", "train.scheduler", "train.warmup_steps",
                 "train.warmup_ratio")
OPTIMIZER_KEYS = {"train.weight_decay": "weight_decay", "train.adam_betas": "betas", "train.adam_eps": "eps"}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: dict[str, Any], cfg: DistillConfig) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs between the checkpoint's config and ``cfg``: key -> (saved, now).

    Keys the saved config does not have (written by an older potstill) are not compared, nor
    values given as objects from Python on either side (a model or dataset object saved as its
    type name cannot be compared with a path)."""
    old, new = flatten(saved), flatten(config_to_dict(cfg))
    changes = {k: (old[k], new[k]) for k in sorted(old)
               if k in new and not (_is_object(old[k]) or _is_object(new[k])) and _normal(old[k]) != _normal(new[k])}
    # An optional section given on one side only (teacher.server: null -> {url: ...}): its keys exist on
    # one side, its name as a null leaf on the other. Reported under the section's name, which no
    # MAY_CHANGE entry covers, so adding or dropping a section is refused.
    for mine, other, flip in ((old, new, False), (new, old, True)):
        for key in mine:
            section = _null_parent(key, other)
            if section is not None and section not in changes:
                pair = ("(none)", "{...}") if flip else ("{...}", "(none)")
                changes[section] = pair
    return dict(sorted(changes.items()))


def _null_parent(key: str, flat: dict[str, Any]) -> str | None:
    """The prefix of dotted ``key`` that is a null leaf in ``flat`` (that side has no such section), or None."""
    parts = key.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in flat and flat[p] is None),
                None)


def _is_object(value: Any) -> bool:
    """A placeholder of :func:`~potstill.config.config_to_dict` for an object passed from Python."""
    return isinstance(value, str) and value.startswith(("<object ", "<in-memory "))


def _normal(value: Any) -> Any:
    """Lists and tuples alike; a path to an existing file or folder by where it leads (``data.jsonl``
    and ``/work/data.jsonl`` are the same data)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, str) and 0 < len(value) <= 4096 and "\n" not in value:
        try:
            if os.path.exists(value):
                return os.path.realpath(value)
        except (OSError, ValueError):
            pass
    return value


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def check_resume_changes(saved: dict[str, Any], cfg: DistillConfig, checkpoint,
                         processes: tuple[int | None, int] = (None, 1)) -> dict[str, tuple[Any, Any]]:
    """The allowed changes (logged); raises one ConfigError line naming every key that may not change.

    ``processes``: (the number that wrote the checkpoint, or None when it did not record it; the
    number now). See :func:`check_processes`."""
    changes = config_changes(saved, cfg)
    if check_processes(saved, cfg, processes, checkpoint):
        changes.pop("train.grad_accum", None)
    refused = {k: v for k, v in changes.items() if not may_change(k)}
    if refused:
        shown = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in refused.items())
        raise ConfigError(
            f"cannot resume {checkpoint} with changed {shown}: data, batch shape, models, seed and precision must "
            "stay as the checkpoint's run had them; restore them, or start a new run in another output.dir "
            "(keys that may change on resume: docs/distill.md, 'Stopping, resuming')")
    allowed = {k: v for k, v in changes.items() if k != "train.resume" and not k.startswith("output.")}
    if allowed:
        log.info("resuming with changed %s", ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in allowed.items()))
    return changes


def check_processes(saved: dict[str, Any], cfg: DistillConfig, processes: tuple[int | None, int],
                    checkpoint) -> bool:
    """Whether the run resumes on another number of processes than wrote the checkpoint.

    That is allowed when each optimizer step keeps its examples: the step batcher gives micro-batch
    ``m`` of process ``p`` the ``(m * processes + p)``-th run of ``batch_size`` examples, so the same
    ``processes x grad_accum`` (and batch size) means the same examples per step, in the same order.
    Otherwise one line says which ``train.grad_accum`` keeps them."""
    was, now = processes
    if was is None or was == now:
        return False
    old_accum = int(flatten(saved).get("train.grad_accum", cfg.train.grad_accum))
    if was * old_accum != now * cfg.train.grad_accum:
        per_step = was * old_accum
        advice = (f"set train.grad_accum={per_step // now}" if per_step % now == 0
                  else f"use a number of processes that divides {per_step}")
        raise ConfigError(
            f"cannot resume {checkpoint} on {now} processes with train.grad_accum={cfg.train.grad_accum}: it was "
            f"written by {was} processes with train.grad_accum={old_accum} ({per_step} micro-batches a step); "
            f"{advice} so that each step trains on the same examples, or resume on {was} processes")
    log.info("resuming on %d processes (the checkpoint was written by %d) with train.grad_accum %d -> %d: the same "
             "examples each step; not bit-exact (sums are reduced in another order)", now, was, old_accum,
             cfg.train.grad_accum)
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def apply_resume_changes(changes: dict[str, Any], *, optimizer, scheduler, fresh_groups: list[dict[str, Any]],
                         saved_scheduler_state: dict[str, Any], step: int) -> None:
    """Load the scheduler state, or rebuild the schedule at ``step`` when its settings changed.

    ``fresh_groups`` are the optimizer's param-group hyperparameters as built from the new
    config (before the checkpoint's optimizer state overwrote them); ``scheduler`` was built
    from the new config too. ``optimizer`` already holds the checkpoint's state."""
    for key, name in OPTIMIZER_KEYS.items():
        if key in changes:
            for group, fresh in zip(optimizer.param_groups, fresh_groups):
                group[name] = fresh[name]
    if not any(k in changes for k in SCHEDULE_KEYS):
        scheduler.load_state_dict(saved_scheduler_state)
        return
    peaks = [fresh.get("initial_lr", fresh["lr"]) for fresh in fresh_groups]  # the schedule already scaled "lr"
    for group, peak in zip(optimizer.param_groups, peaks):
        group["initial_lr"] = peak
    scheduler.base_lrs = peaks
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        scheduler.step()  # sets every group's lr to lr(step) of the new schedule
