"""The distillation loop, on Hugging Face Accelerate. Read it top to bottom.

    distill(config)
      prepare the run directory (lock, refuse to clobber, find the checkpoint to resume)
      load teacher (frozen) and student, check they share a vocabulary
      tokenize the data (cached), choose the optimizer and schedule
      for each optimizer step:
          count the valid tokens of all its micro-batches on all processes
          for each micro-batch: teacher forward (no grad), student forward, loss, backward
          clip, step, schedule; log; evaluate; checkpoint (atomically)
      save the student with save_pretrained, evaluate, write the summary
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .atomic import atomic_write_text, publish_dir
from .batching import StepBatcher
from .config import DistillConfig, apply_overrides, config_to_dict, config_to_yaml, load_config, validate_config
from .errors import ConfigError, DivergedError, ModelError, RunDirError
from .evaluate import evaluate_models, reduce_sum
from .feature_kd import RUN_DIR_NAME as PROJECTORS_DIR, FeatureDistiller, capture_student, capture_teacher
from .hidden import forward_hidden, supports_chunked
from .metrics import MetricsLogger, peak_memory_mb, run_info
from .models import check_vocab, load_student, load_teacher
from .objective import Objective, count_valid, step_loss
from .precision import accelerate_mixed_precision, autocast_context, compute_dtype, resolve_precision

log = logging.getLogger("potstill")

RUN_ARTIFACTS = ("checkpoints", "student", PROJECTORS_DIR, "metrics.jsonl", "tensorboard", "summary.json", "config.yaml",
                 "run_info.json")


@dataclass
class RunResult:
    """What a finished run left behind."""

    output_dir: Path
    student_dir: Path
    steps: int
    final_eval: dict[str, float] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"


def as_config(config: DistillConfig | dict | str | Path, overrides=()) -> DistillConfig:
    """A validated config from an object, a dict or a YAML path, with dotted overrides applied."""
    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    cfg = config if isinstance(config, DistillConfig) else validate_config(config)
    return apply_overrides(cfg, overrides) if overrides else cfg


def distill(config: DistillConfig | dict | str | Path, *, overrides=(), progress: bool = True) -> RunResult:
    """Run one distillation. ``config`` is a DistillConfig, a dict, or a YAML path."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = as_config(config, overrides)
    if cfg.stages:  # several runs in a row (e.g. sequence-level KD on generated data, then the original data)
        from .stages import run_stages

        return run_stages(cfg, progress=progress)
    precision = resolve_precision(cfg.train.precision)
    # cpu=True where there is no GPU: only then does Accelerate see a torchrun/mpirun world on CPUs.
    accelerator = Accelerator(mixed_precision=accelerate_mixed_precision(precision), cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RunDirError(f"launched as {launched} processes but Accelerate sees {accelerator.num_processes}: "
                          "each would train alone; check the launcher's distributed settings")
    run_dir = Path(cfg.output.dir)
    lock = ckpt.RunLock(run_dir).acquire() if accelerator.is_main_process else None
    try:
        resume_from = prepare_run_dir(cfg, run_dir, is_main=accelerator.is_main_process)
        accelerator.wait_for_everyone()
        set_seed(cfg.train.seed)
        return _train(cfg, accelerator, run_dir, precision, resume_from, progress)
    finally:
        if lock is not None:
            lock.release()


def prepare_run_dir(cfg: DistillConfig, run_dir: Path, *, is_main: bool) -> Path | None:
    """The checkpoint to resume from (or None), after refusing to clobber an existing run."""
    resume = cfg.train.resume
    if resume not in (False, "auto"):
        path = Path(resume)
        if not (path / ckpt.STATE_FILE).is_file():
            raise RunDirError(f"train.resume: {path} is not a complete checkpoint (no {ckpt.STATE_FILE})")
        return path
    existing = [name for name in RUN_ARTIFACTS if (run_dir / name).exists() and name != "config.yaml"]
    if resume == "auto":
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None and existing and not cfg.output.overwrite:
            raise RunDirError(f"train.resume=auto: {run_dir} holds a run but no complete checkpoint to resume; "
                              "set output.overwrite=true to start over there")
        if latest is not None:
            return latest
    if existing:
        if not cfg.output.overwrite:
            steps = ckpt.list_checkpoints(run_dir)
            what = f"checkpoints up to step {steps[-1][0]}" if steps else ", ".join(existing)
            raise RunDirError(f"output.dir {run_dir} already holds a run ({what}): continue it with train.resume=auto, "
                              "start over with output.overwrite=true, or choose another output.dir")
        if is_main:
            for name in RUN_ARTIFACTS:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    return None


def _train(cfg: DistillConfig, accelerator, run_dir: Path, precision: str, resume_from: Path | None,
           progress: bool) -> RunResult:
    from transformers import get_scheduler

    from .data import build_datasets, collate

    is_main = accelerator.is_main_process
    device = accelerator.device
    autocast = autocast_context(precision, device)
    objective_cfg = cfg.loss

    # -- models ---------------------------------------------------------------------------
    teacher, teacher_tok = None, None
    if cfg.teacher.name_or_path is not None and cfg.teacher.cache is None:  # a cache replaces the teacher
        t_dtype = {"auto": compute_dtype(precision) or torch.float32, "float32": torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.teacher.dtype]
        teacher, teacher_tok = load_teacher(cfg.teacher, dtype=t_dtype)
    student, tokenizer = load_student(cfg.student, teacher=teacher, teacher_tokenizer=teacher_tok)
    shared_vocab = None
    if teacher is not None:
        try:
            shared_vocab = check_vocab(teacher, teacher_tok, student, tokenizer).shared
        except ModelError:
            if objective_cfg.logits.weight > 0 or objective_cfg.uses_features:
                raise
            log.warning("teacher and student vocabularies differ: the teacher is not used in evaluation")
            teacher = None
    objective = Objective(objective_cfg, shared_vocab)
    features = FeatureDistiller.build(objective_cfg, teacher, student, seed=cfg.train.seed)  # None: logits/CE only
    if features is not None:
        features.to(device)
    if teacher is not None:
        teacher.to(device)
    n_params = sum(p.numel() for p in student.parameters())
    log.info("student: %s, %.2fM parameters; teacher: %s; precision %s on %s x%d",
             type(student).__name__, n_params / 1e6, type(teacher).__name__ if teacher is not None else "none",
             precision, device, accelerator.num_processes)

    # -- data -----------------------------------------------------------------------------
    with accelerator.main_process_first():
        train_ds, val_ds = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed, progress=progress and is_main)
    cached = None
    if cfg.teacher.cache is not None:
        from .teacher import CachedTeacher

        cached = CachedTeacher(cfg.teacher.cache, tokenizer=tokenizer, train_ds=train_ds, loss_cfg=cfg.loss)
    tc = cfg.train
    batcher = StepBatcher(len(train_ds), batch_size=tc.batch_size, grad_accum=tc.grad_accum,
                          world_size=accelerator.num_processes, rank=accelerator.process_index, seed=tc.seed)
    max_steps = tc.max_steps or batcher.steps_for_epochs(tc.epochs)

    # -- optimizer, schedule --------------------------------------------------------------
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]  # norms and biases
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        + ([{"params": features.parameters(), "weight_decay": tc.weight_decay}]  # feature projectors
           if features is not None and features.parameters() else []),
        lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps)
    warmup = tc.warmup_steps or int(tc.warmup_ratio * max_steps)
    extra = {"num_decay_steps": max(1, max_steps // 10)} if tc.scheduler == "warmup_stable_decay" else None
    scheduler = get_scheduler(tc.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps,
                              scheduler_specific_kwargs=extra)
    student, optimizer = accelerator.prepare(student, optimizer)
    raw_student = accelerator.unwrap_model(student)
    path = cfg.loss.path
    if cached is not None and not cached.chunked_ok(cfg.loss):
        log.info("teacher cache with loss.logits.divergence=%s: the sparse loss has no chunked form, so the "
                 "plain path is used", cfg.loss.logits.divergence)
        path = "plain"
    student_head, teacher_head = choose_loss_path(path, raw_student, teacher if objective.needs_teacher else None)

    # -- resume ---------------------------------------------------------------------------
    start_step = 0
    if resume_from is not None:
        state = ckpt.read_state(resume_from)
        ckpt.load_student_weights(resume_from, raw_student)
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=device, weights_only=False))
        scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=False))
        ckpt.load_rng(resume_from, accelerator.process_index)
        if features is not None:
            features.load_checkpoint(resume_from)
        start_step = int(state["step"])
        log.info("resumed from %s (step %d of %d)", resume_from, start_step, max_steps)
        if state.get("max_steps") != max_steps:
            log.warning("the checkpoint was written by a run of %s steps, this one has %d: the learning-rate "
                        "schedule continues from the old run's state", state.get("max_steps"), max_steps)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
        atomic_write_text(run_dir / "run_info.json", json.dumps(run_info(), indent=2))
    metrics = MetricsLogger(run_dir, enabled=is_main, tensorboard=cfg.output.tensorboard,
                            resume_step=start_step if resume_from is not None else None)

    def run_eval(step: int) -> dict[str, float]:
        if val_ds is None:
            return {}
        result = evaluate_models(
            raw_student, val_ds, pad_token_id=tokenizer.pad_token_id,
            batch_size=cfg.eval.batch_size or tc.batch_size, device=device, teacher=teacher,
            objective=objective, shared_vocab=shared_vocab, max_batches=cfg.eval.max_batches,
            autocast=autocast, accelerator=accelerator)
        metrics.log(step, {f"eval/{k}": v for k, v in result.items()})
        log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    def save_checkpoint(step: int) -> Path:
        tmp = ckpt.temp_checkpoint_dir(run_dir, step)
        accelerator.wait_for_everyone()
        ckpt.write_process_state(tmp, accelerator.process_index)
        accelerator.wait_for_everyone()
        final = ckpt.final_checkpoint_dir(run_dir, step)
        if is_main:
            ckpt.write_main_state(tmp, model=raw_student, tokenizer=tokenizer, optimizer=optimizer,
                                  scheduler=scheduler, state={"step": step, "max_steps": max_steps,
                                                              "config": config_to_dict(cfg)},
                                  extra_modules=features.checkpoint_modules() if features else None)
            publish_dir(tmp, final)
            ckpt.prune_checkpoints(run_dir, tc.keep_checkpoints)
        accelerator.wait_for_everyone()
        return final

    # -- the loop -------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=start_step, desc="distill", unit="step",
               disable=not (progress and is_main), dynamic_ncols=True)
    window: dict[str, float] = {}
    window_start = time.perf_counter()
    last_good = ckpt.latest_checkpoint(run_dir)
    train_metrics: dict[str, float] = {}
    student.train()
    for step in range(start_step, max_steps):
        micro = batcher.micro_batches(step)
        batches = [collate([train_ds[i] for i in idx], tokenizer.pad_token_id) for idx in micro]
        local_valid = sum(count_valid(b["labels"]) for b in batches)
        n_valid_step = reduce_sum({"n": torch.as_tensor(local_valid)}, accelerator)["n"]
        sums = {"loss": torch.zeros(()), "tokens": torch.zeros(())}
        for m, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = m == len(batches) - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(student)):
                ids, attn = batch["input_ids"], batch["attention_mask"]
                teacher_out = student_out = None
                if student_head is not None:  # chunked: hidden states in, never B x T x V logits
                    if features is not None or (objective.needs_teacher and cached is None):
                        with torch.no_grad(), autocast(), capture_teacher(features, teacher) as teacher_feats:
                            teacher_out = forward_hidden(teacher, teacher, ids, attn)
                    with capture_student(features, raw_student) as student_feats:
                        student_out = forward_hidden(student, raw_student, ids, attn)
                    with autocast():
                        if cached is not None:  # sparse targets from disk instead of the teacher
                            out = cached.fused_objective(objective, student_out, student_head, batch["labels"],
                                                         micro[m])
                        else:
                            out = objective.fused(student_out, student_head, batch["labels"], teacher_out, teacher_head,
                                                  chunk_size=cfg.loss.chunk_size,
                                                  memory_budget_mb=cfg.loss.memory_budget_mb)
                else:
                    if teacher is not None and (objective.needs_teacher or features is not None):
                        with torch.no_grad(), autocast(), capture_teacher(features, teacher) as teacher_feats:
                            teacher_out = teacher(input_ids=ids, attention_mask=attn).logits
                    with capture_student(features, raw_student) as student_feats:
                        student_out = student(input_ids=ids, attention_mask=attn).logits
                    out = objective(student_out, batch["labels"], teacher_out) if cached is None else \
                        cached.objective(objective, student_out, batch["labels"], micro[m])
                if features is not None:  # hidden-state / attention-relation terms, float32, outside autocast
                    features.add_terms(out, student_feats, teacher_feats, batch["labels"], attn)
                if not torch.isfinite(out.weighted_sum):
                    raise DivergedError(_diverged_message(step + 1, f"loss is {out.weighted_sum.item()}", last_good))
                accelerator.backward(step_loss(out.weighted_sum, n_valid_step, accelerator.num_processes))
            sums["loss"] += out.weighted_sum.detach().float().cpu()
            sums["tokens"] += batch["attention_mask"].sum().cpu()
            for name, value in out.term_sums.items():
                sums.setdefault(name, torch.zeros(()))
                sums[name] += value.float().cpu()
            del student_out, teacher_out, out
            student_feats = teacher_feats = None
        if features is not None:
            features.sync_gradients(accelerator)
        trained = list(student.parameters()) + (features.parameters() if features else [])
        grad_norm = accelerator.clip_grad_norm_(trained, tc.max_grad_norm or float("inf"))
        if precision != "fp16" and not torch.isfinite(torch.as_tensor(grad_norm)):
            raise DivergedError(_diverged_message(step + 1, f"gradient norm is {float(grad_norm)}", last_good))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        totals = reduce_sum(sums, accelerator)
        n = max(n_valid_step, 1.0)
        step_values = {"loss": totals["loss"] / n, **{f"loss/{k}": totals[k] / n for k in out_terms(totals)}}
        for k, v in step_values.items():
            window[k] = window.get(k, 0.0) + v
        window["tokens"] = window.get("tokens", 0.0) + totals["tokens"]
        window["steps"] = window.get("steps", 0.0) + 1
        done = step + 1
        bar.update(1)
        if done % tc.log_every == 0 or done == max_steps:
            elapsed = time.perf_counter() - window_start
            steps_in = window.pop("steps")
            tokens = window.pop("tokens")
            train_metrics = {k: v / steps_in for k, v in window.items()}
            train_metrics.update({
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tokens / elapsed,
                "step_time_s": elapsed / steps_in, "peak_mem_mb": peak_memory_mb(device),
                "epoch": batcher.epoch_of(done)})
            metrics.log(done, train_metrics)
            bar.set_postfix(loss=f"{train_metrics['loss']:.4f}", tok_s=f"{train_metrics['tokens_per_s']:.0f}")
            window, window_start = {}, time.perf_counter()
        if cfg.eval.every and done % cfg.eval.every == 0 and done != max_steps:
            run_eval(done)
        if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done != max_steps:
            last_good = save_checkpoint(done)
    bar.close()

    # -- finish ---------------------------------------------------------------------------
    final_eval = run_eval(max_steps)
    save_checkpoint(max_steps)
    student_dir = run_dir / "student"
    if is_main:
        tmp = run_dir / ".tmp-student"
        shutil.rmtree(tmp, ignore_errors=True)
        raw_student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, student_dir)
        if features is not None and features.hidden_pairs:  # beside the student, not inside it
            tmp = run_dir / ".tmp-projectors"
            shutil.rmtree(tmp, ignore_errors=True)
            features.projectors.save(tmp)
            publish_dir(tmp, run_dir / PROJECTORS_DIR)
        summary = {"steps": max_steps, "final_eval": final_eval, "train": train_metrics,
                   "student_parameters": n_params, "train_examples": len(train_ds),
                   "train_tokens_per_epoch": getattr(train_ds, "n_tokens", None)}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    metrics.close()
    accelerator.wait_for_everyone()
    log.info("done: student saved to %s", student_dir)
    return RunResult(output_dir=run_dir, student_dir=student_dir, steps=max_steps, final_eval=final_eval,
                     train_metrics=train_metrics)


def choose_loss_path(path: str, student, teacher):
    """(student head, teacher head) for the chunked path, or (None, None) for the plain one."""
    if path == "plain":
        log.info("loss path: plain (full logits), as configured")
        return None, None
    student_head, why = supports_chunked(student)
    teacher_head = None
    if student_head is not None and teacher is not None:
        teacher_head, why = supports_chunked(teacher)
    if student_head is None or (teacher is not None and teacher_head is None):
        if path == "chunked":
            raise ConfigError(f"loss.path=chunked is not possible: {why}; use loss.path=auto or plain")
        log.info("loss path: plain (full logits), because %s", why)
        return None, None
    log.info("loss path: chunked (logits a chunk of tokens at a time)")
    return student_head, teacher_head


def out_terms(totals: dict[str, float]) -> list[str]:
    return [k for k in totals if k not in ("loss", "tokens")]


def _diverged_message(step: int, what: str, last_good: Path | None) -> str:
    keep = f"the last good checkpoint is {last_good} (resume it with train.resume=auto)" if last_good else \
        "no checkpoint was written yet"
    return (f"training diverged at step {step}: {what}; stopped without saving, {keep}; "
            "lower train.lr, keep train.max_grad_norm set, or use train.precision=fp32")
