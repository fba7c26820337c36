"""One distillation run, on Hugging Face Accelerate. Read it top to bottom.

    train(cfg)
      lock the run directory, refuse to clobber it, find the newest intact checkpoint   (rundir.py)
      refuse settings a resume cannot change; a finished run returns at once            (resume.py)
      build_run: checks, data, models, teacher source, objective, optimizer             (setup.py)
      resume: weights, optimizer, schedule (rebuilt if changed), RNG, projectors        (resume_run)
      for each optimizer step:                                                          (train_step)
          count the valid tokens of all its micro-batches on all processes
          for each micro-batch: teacher signal, student forward, objective, backward
          clip, step, schedule
          log; evaluate; checkpoint (atomically)              (StepLog, evaluate, save_checkpoint)
          on SIGTERM / Ctrl-C: checkpoint and stop, every process after the same step   (stopping.py)
      evaluate, checkpoint, save the student, write the summary                         (finish)

A full or read-only disk anywhere in there is one line (:func:`potstill.atomic.disk_errors`).

The loop never asks where the teacher signal came from (:mod:`potstill.teachers`) nor which
loss form applies (:meth:`potstill.training.objective.Objective.compute`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import disk_errors, publish_dir
from ..config import DistillConfig, config_to_dict
from ..data.batching import MicroBatch
from ..errors import DivergedError, RunDirError, ServerError
from ..models.precision import accelerate_mixed_precision, resolve_precision
from ..ownership import read_json_object
from ..stopping import StopRequest
from . import checkpoint as ckpt
from .evaluation import evaluate_models, reduce_sum
from .metrics import MetricsLogger, cpu_name, peak_memory_mb, read_metrics
from .objective import step_loss
from .onpolicy import OnPolicyTokens, evaluate_samples, sample_stats, teacher_nll_of_samples
from .resume import apply_resume_changes, check_resume_changes
from .rundir import (
    STUDENT_DIR,
    prepare_run_dir,
    publish_student,
    write_run_files,
    write_summary,
)
from .setup import Run, build_run
from .tasks import TASKS, TEACHER_TASKS, score_models

log = logging.getLogger("potstill")


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


def train(cfg: DistillConfig, *, progress: bool = True) -> RunResult:
    """Run one training (no ``stages:``; see :func:`potstill.commands.distill.distill`)."""
    from accelerate.utils import set_seed

    precision = resolve_precision(cfg.train.precision)
    accelerator = make_accelerator(precision)
    run_dir = Path(cfg.output.dir)
    lock = ckpt.RunLock(run_dir).acquire() if accelerator.is_main_process else None
    try:
        resume_from = share_resume_point(
            prepare_run_dir(cfg, run_dir, is_main=True) if accelerator.is_main_process else None, accelerator)
        changes: dict = {}
        saved: dict = {}
        if resume_from is not None:
            saved = ckpt.read_state(resume_from)
            changes = check_resume_changes(saved.get("config") or {}, cfg, resume_from,  # before any model loads
                                           processes=(saved.get("processes"), accelerator.num_processes))
            complete = completed_run(run_dir, saved, changes)
            if complete is not None:
                return complete
        set_seed(cfg.train.seed)
        run = build_run(cfg, accelerator, precision, run_dir, progress=progress)
        try:
            return run_steps(run, resume_from, saved, changes, progress)
        finally:
            run.teacher.close()  # on every way out: a served teacher's threads must not outlive the run
    finally:
        if lock is not None:
            lock.release()


def run_steps(run: Run, resume_from: Path | None, saved: dict, changes: dict, progress: bool) -> RunResult:
    """From the built run to its result: resume, the steps, the final save."""
    run_dir = run.run_dir
    start_step = resume_run(run, resume_from, saved, changes) if resume_from is not None else 0
    # No ``where=``: this block also runs the model, whose errors must not be read as a full disk.
    with disk_errors(f"writing the run in {run_dir}", advice=lambda: resume_advice(run_dir)):
        if run.is_main:
            write_run_files(run.cfg, run_dir)
        metrics = MetricsLogger(run_dir, enabled=run.is_main, tensorboard=run.cfg.output.tensorboard,
                                resume_step=start_step if resume_from is not None else None)
        last_good = ckpt.latest_checkpoint(run_dir)
        step_log = StepLog(run, metrics, start_step, progress)
        with StopRequest() as stop:
            if resume_from is None:
                with step_log.paused("eval"):
                    evaluate_start(run, metrics, progress)
            train_steps(run, step_log, start_step, last_good, stop)
        return finish(run, metrics, step_log, progress,
                      resumed_at_end=resume_from is not None and start_step == run.max_steps)


def share_resume_point(resume_from: Path | None, accelerator) -> Path | None:
    """The main process's choice of checkpoint (it verified them and set damaged ones aside), on every process."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [str(resume_from) if resume_from is not None else None]
        broadcast_object_list(box, from_process=0)
        resume_from = Path(box[0]) if box[0] else None
    return resume_from


def train_steps(run: Run, step_log: "StepLog", start_step: int, last_good: Path | None, stop: StopRequest) -> None:
    """The optimizer steps from ``start_step`` to the end, with evaluation and checkpoints on their cadence;
    after each step, stops cleanly (checkpoint, :class:`~potstill.errors.StoppedError`) if asked to.
    ``step_log`` keeps the records (its last one: mean loss terms, lr, tokens/s, ...); the time spent
    evaluating and checkpointing is not training time, so it is left out of tokens/s."""
    cfg, metrics, progress = run.cfg, step_log.metrics, step_log.progress
    run.student.train()
    try:
        for step in range(start_step, run.max_steps):
            try:
                run.teacher.prefetch(run.tokens.upcoming(step, run.teacher.lookahead, run.max_steps))
                started = time.perf_counter()
                batches = run.tokens.take(step)  # with onpolicy: the completions are sampled here
                generate_s = time.perf_counter() - started
                sums, grad_norm = train_step(run, batches, step, last_good)
                run.tokens.after_step()
                sums["generate_s"] = torch.as_tensor(generate_s)
            except ServerError as err:  # the teacher's server went away: say what is kept and how to go on
                raise ServerError(f"{err}; stopped at step {step + 1} without saving, {kept_checkpoint(last_good)}, "
                                  "once the server answers") from None
            done = step + 1
            step_log.add(done, sums, grad_norm)
            if cfg.eval.every and done % cfg.eval.every == 0 and done != run.max_steps:
                with step_log.paused("eval"):
                    evaluate(run, metrics, done, progress)
            if cfg.eval.tasks_every and done % cfg.eval.tasks_every == 0 and done != run.max_steps:
                with step_log.paused("eval"):
                    evaluate_tasks(run, metrics, done, progress)
            saved = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
            if saved and done != run.max_steps:
                with step_log.paused("checkpoint"):
                    last_good = save_checkpoint(run, done)
            if done != run.max_steps and stop.agreed(run.accelerator):
                if not saved:
                    step_log.flush(done)
                    last_good = save_checkpoint(run, done)
                raise stop.stopped(f"after step {done} of {run.max_steps}; checkpoint {last_good} is complete: "
                                   "continue with the same command and train.resume=auto")
    finally:
        step_log.close()


def make_accelerator(precision: str):
    """Accelerate's view of the processes; refuses a launch whose ranks would each train alone."""
    from accelerate import Accelerator

    # cpu=True where there is no GPU: only then does Accelerate see a torchrun/mpirun world on CPUs.
    accelerator = Accelerator(mixed_precision=accelerate_mixed_precision(precision), cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RunDirError(f"launched as {launched} processes but Accelerate sees {accelerator.num_processes}: "
                          "each would train alone; check the launcher's distributed settings")
    return accelerator


def train_step(run: Run, batches: list[MicroBatch], step: int,
               last_good: Path | None) -> tuple[dict[str, torch.Tensor], float]:
    """One optimizer step over this process's micro-batches: (summed loss terms, gradient norm).

    Each micro-batch's loss is normalized by the valid tokens of the whole step on all
    processes (:func:`~potstill.training.objective.step_loss`), so accumulation and many
    processes give the gradient of one big batch."""
    acc = run.accelerator
    n_valid_step = reduce_sum({"n": sum(b.n_valid.cpu() for b in batches)}, acc)["n"]
    sums = {"loss": torch.zeros(()), "tokens": torch.zeros(())}
    # The on-policy counts of the step (StepLog); every key on every process, for the reduction.
    samples = dict.fromkeys(SAMPLE_KEYS, 0.0) if run.cfg.onpolicy.enabled else None
    teacher_s = 0.0
    balancer = run.balancer
    for m, batch in enumerate(batches):
        # With a balancer nothing is synchronized by DDP: it sums each term's gradient itself.
        with run.strategy.gradient_sync(run.student, sync=m == len(batches) - 1 and balancer is None):
            started = time.perf_counter()
            signal = run.teacher.signal(batch)
            teacher_s += time.perf_counter() - started
            student_out = run.student_forward(batch)
            out = run.objective.compute(student_out, signal, batch)
            if samples is not None:
                add_sample_stats(samples, batch, signal, run.autocast)
            run.strategy.release_teacher(run.teacher.model)
            if not torch.isfinite(out.weighted_sum):
                raise DivergedError(diverged_message(step + 1, f"loss is {out.weighted_sum.item()}", last_good))
            if balancer is None:
                acc.backward(step_loss(out.weighted_sum, n_valid_step, acc.num_processes))
            else:  # one backward per term; summed over processes in balancer.finish
                balancer.accumulate({k: step_loss(v, n_valid_step, 1) for k, v in out.term_losses.items()})
        sums["loss"] += out.weighted_sum.detach().float().cpu()
        sums["tokens"] += batch.n_tokens.cpu()
        for name, value in out.term_sums.items():
            sums[name] = sums.get(name, torch.zeros(())) + value.float().cpu()
        del signal, student_out, out  # free this micro-batch's activations before the next one
    balance_metrics = {}
    if balancer is not None:
        balance_metrics = balancer.finish(acc, step)
    elif run.features is not None:
        run.features.sync_gradients(acc)
    grad_norm = run.strategy.clip_grad_norm(run.trained_parameters(), run.cfg.train.max_grad_norm or float("inf"))
    if run.precision != "fp16" and not torch.isfinite(torch.as_tensor(grad_norm)):
        raise DivergedError(diverged_message(step + 1, f"gradient norm is {float(grad_norm)}", last_good))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    sums["n_valid"] = torch.as_tensor(n_valid_step)
    sums["teacher_s"] = torch.as_tensor(teacher_s)
    for name, value in (samples or {}).items():
        sums[f"{SAMPLES}{name}"] = torch.as_tensor(value)
    for name, value in balance_metrics.items():  # the same on every process: averaged over processes
        sums[f"{BALANCE}{name}"] = torch.as_tensor(value / acc.num_processes)
    return sums, float(grad_norm)


SAMPLES = "samples/"  # prefix of the on-policy counts in a step's sums
BALANCE = "balance:"  # prefix of the balancer's measurements in a step's sums (not divided by tokens)
SAMPLE_KEYS = ("seqs", "student_seqs", "completion_tokens", "teacher_nll", "teacher_nll_n")


def add_sample_stats(samples: dict[str, float], batch: MicroBatch, signal, autocast) -> None:
    """Add one micro-batch's on-policy counts (sequences, student-sampled ones, their completion tokens,
    the teacher's NLL of those tokens) to ``samples``."""
    for name, value in sample_stats(batch).items():
        samples[name] += value
    nll = teacher_nll_of_samples(signal, batch, autocast=autocast)
    if nll is not None:
        samples["teacher_nll"] += nll[0]
        samples["teacher_nll_n"] += nll[1]


def onpolicy_metrics(samples: dict[str, float]) -> dict[str, float]:
    """The logged view of a window's on-policy counts (all processes): the fraction of sequences the
    student sampled, their mean completion length, the teacher's per-token NLL of those tokens."""
    get = lambda k: samples.get(SAMPLES + k, 0.0)  # noqa: E731
    out = {"onpolicy/fraction": get("student_seqs") / max(get("seqs"), 1.0),
           "onpolicy/completion_len": get("completion_tokens") / max(get("student_seqs"), 1.0)}
    if get("teacher_nll_n") > 0:
        out["onpolicy/teacher_nll"] = get("teacher_nll") / get("teacher_nll_n")
    return out


class StepLog:
    """Per-step sums -> the progress bar, and every ``train.log_every`` steps one metrics record
    (mean loss terms per valid token, lr, grad norm, tokens/s, step time, the time spent waiting
    for the teacher per step, peak memory, the main process's model state: Run.model_state_bytes)."""

    def __init__(self, run: Run, metrics: MetricsLogger, start_step: int, progress: bool):
        from tqdm.auto import tqdm

        self.run, self.metrics = run, metrics
        self.bar = tqdm(total=run.max_steps, initial=start_step, desc="distill", unit="step",
                        disable=not (progress and run.is_main), dynamic_ncols=True)
        self.window: dict[str, float] = {}
        self.samples: dict[str, float] = {}
        self.window_start = time.perf_counter()
        self.train_metrics: dict[str, float] = {}
        self.grad_norm = 0.0
        self.progress = progress
        # Whole-run totals of this session (a resumed run counts from its resume): tokens/s over all
        # of training, and where the rest of the wall time went.
        self.started = time.perf_counter()
        self.totals = {"steps": 0.0, "tokens": 0.0, "train_time_s": 0.0, "eval_time_s": 0.0,
                       "checkpoint_time_s": 0.0}
        self.start_step = start_step

    @contextlib.contextmanager
    def paused(self, what: str):
        """Time spent in ``what`` ('eval' or 'checkpoint') is not training: it moves the window's
        start forward, so tokens/s and step time count only the steps, and adds to its own total."""
        started = time.perf_counter()
        shown = None if self.bar.disable else self.bar.postfix
        if not self.bar.disable:
            self.bar.set_postfix_str(f"{what}...", refresh=True)  # the bar says why it stopped moving
        try:
            yield
        finally:
            if not self.bar.disable:
                self.bar.set_postfix_str(shown or "", refresh=True)
            spent = time.perf_counter() - started
            self.window_start += spent
            self.totals[f"{what}_time_s"] += spent

    def overall(self) -> dict[str, float]:
        """This session's training totals (since ``since_step``: a resumed run counts from its resume):
        steps, tokens (all processes), tokens/s and step time over the training time alone, the time
        spent evaluating and checkpointing, the wall time, peak memory."""
        t = dict(self.totals)
        t["since_step"] = self.start_step  # 0, or the step this session resumed from
        t["tokens_per_s"] = t["tokens"] / t["train_time_s"] if t["train_time_s"] > 0 else 0.0
        t["step_time_s"] = t["train_time_s"] / t["steps"] if t["steps"] else 0.0
        t["wall_time_s"] = time.perf_counter() - self.started
        t["peak_mem_mb"] = peak_memory_mb(self.run.device)
        return t

    def add(self, done: int, sums: dict[str, torch.Tensor], grad_norm: float) -> None:
        n_valid = float(sums.pop("n_valid"))
        # Seconds this process waited for the teacher's signal (a local forward, a cache read, or the
        # part of a server's latency that prefetching did not hide).
        self.window["teacher_s"] = self.window.get("teacher_s", 0.0) + float(sums.pop("teacher_s", 0.0))
        # Seconds this process spent sampling the step's completions (on-policy; 0 without), and the rest.
        generate_s = float(sums.pop("generate_s", 0.0))
        self.window["time/generate_s"] = self.window.get("time/generate_s", 0.0) + generate_s
        totals = reduce_sum(sums, self.run.accelerator)
        for k in [k for k in totals if k.startswith(SAMPLES)]:  # summed over the window, ratios at _log
            self.samples[k] = self.samples.get(k, 0.0) + totals.pop(k)
        balance = {k[len(BALANCE):]: totals.pop(k) for k in [k for k in totals if k.startswith(BALANCE)]}
        n = max(n_valid, 1.0)
        values = {"loss": totals["loss"] / n,
                  **{f"loss/{k}": v / n for k, v in totals.items() if k not in ("loss", "tokens")}, **balance}
        for k, v in values.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.window["tokens"] = self.window.get("tokens", 0.0) + totals["tokens"]
        self.window["steps"] = self.window.get("steps", 0.0) + 1
        self.bar.update(1)
        self.grad_norm = grad_norm
        if done % self.run.cfg.train.log_every == 0 or done == self.run.max_steps:
            self._log(done, grad_norm)

    def _log(self, done: int, grad_norm: float) -> None:
        elapsed = time.perf_counter() - self.window_start
        steps_in, tokens = self.window.pop("steps"), self.window.pop("tokens")
        self.totals["steps"] += steps_in
        self.totals["tokens"] += tokens
        self.totals["train_time_s"] += elapsed
        m = {k: v / steps_in for k, v in self.window.items()}
        m.update({"lr": self.run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_s": tokens / elapsed, "step_time_s": elapsed / steps_in,
                  "peak_mem_mb": peak_memory_mb(self.run.device), "epoch": self.run.batcher.epoch_of(done),
                  "model_state_mb": self.run.model_state_bytes() / 2**20})
        postfix = {"loss": f"{m['loss']:.4f}", "tok_s": f"{m['tokens_per_s']:.0f}"}
        if self.run.cfg.onpolicy.enabled:
            m.update(onpolicy_metrics(self.samples))
            m["time/train_s"] = max(m["step_time_s"] - m["time/generate_s"], 0.0)
            postfix.update(gen_s=f"{m['time/generate_s']:.2f}", train_s=f"{m['time/train_s']:.2f}")
        else:
            m.pop("time/generate_s", None)
        self.metrics.log(done, m)
        self.bar.set_postfix(postfix)
        self.train_metrics, self.window, self.samples, self.window_start = m, {}, {}, time.perf_counter()

    def flush(self, done: int) -> None:
        """Log the steps since the last record now (the run stops before the next record is due)."""
        if self.window.get("steps"):
            self._log(done, self.grad_norm)

    def close(self) -> None:
        self.bar.close()


def evaluate_start(run: Run, metrics: MetricsLogger, progress: bool) -> None:
    """Before the first step of a fresh run: the student-before point of the validation curves
    (``eval.at_start``) and of the task scores, and the teacher's task scores for reference."""
    if run.cfg.eval.at_start:
        evaluate(run, metrics, 0, progress)
        evaluate_tasks(run, metrics, 0, progress, with_teacher=True)


def evaluate(run: Run, metrics: MetricsLogger, step: int, progress: bool = False) -> dict[str, float]:
    """Validation metrics of the student (and against the teacher, where one is loaded)."""
    if run.val_ds is None:
        return {}
    cfg = run.cfg
    result = evaluate_models(
        run.raw_student, run.val_ds, pad_token_id=run.tokenizer.pad_token_id,
        batch_size=cfg.eval.batch_size or cfg.train.batch_size, device=run.device, teacher=run.teacher.model,
        objective=run.objective, shared_vocab=run.shared_vocab, max_batches=cfg.eval.max_batches,
        autocast=run.autocast, accelerator=run.accelerator, lockstep=run.strategy.lockstep,
        tokenizer=run.tokenizer, progress=progress and run.is_main, desc=f"eval (step {step})")
    if isinstance(run.tokens, OnPolicyTokens) and run.teacher.model is not None:  # the student's own completions
        result.update(evaluate_samples(run.tokens, run.val_ds, run.teacher.model,
                                       batch_size=cfg.eval.batch_size or cfg.train.batch_size,
                                       max_batches=cfg.eval.max_batches, autocast=run.autocast,
                                       accelerator=run.accelerator, lockstep=run.strategy.lockstep))
    metrics.log(step, {f"eval/{k}": v for k, v in result.items()})
    log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return result


def evaluate_tasks(run: Run, metrics: MetricsLogger, step: int, progress: bool, *,
                   with_teacher: bool = False) -> dict[str, float]:
    """``eval.tasks`` through lm-evaluation-harness on the student (main process; the others wait),
    logged as ``tasks/<task>/<metric>``; ``with_teacher`` (and ``eval.tasks_teacher``): the teacher
    too, as ``teacher_tasks/<task>/<metric>``. The run's RNG streams are left as they were."""
    cfg = run.cfg.eval
    if not cfg.tasks:
        return {}
    record: dict[str, float] = {}
    if run.is_main:
        models = [(TASKS, run.raw_student)]
        if with_teacher and cfg.tasks_teacher and run.teacher.model is not None:
            models.append((TEACHER_TASKS, run.teacher.model))
        log.info("step %d: lm-eval tasks %s on the student%s", step, ", ".join(cfg.tasks),
                 " and the teacher" if len(models) > 1 else "")
        record = score_models(models, run.tokenizer, cfg.tasks, autocast=run.autocast, task_paths=cfg.task_paths,
                              limit=cfg.task_limit, num_fewshot=cfg.task_fewshot,
                              batch_size=cfg.batch_size or run.cfg.train.batch_size,
                              max_length=run.cfg.data.max_length, device=run.device, seed=run.cfg.train.seed,
                              progress=progress)
        metrics.log(step, record)
        log.info("step %d tasks: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
    run.accelerator.wait_for_everyone()
    return record


def save_checkpoint(run: Run, step: int) -> Path:
    """Every process's RNG (and, under FSDP, its shard of the weights and optimizer state), then
    the main process's weights, optimizer, schedule and state, published atomically as
    ``checkpoints/step-N`` once every process has written its part; older ones pruned. A full
    or read-only disk is one line, and the partial checkpoint is removed."""
    acc, run_dir = run.accelerator, run.run_dir
    sharded = run.strategy.sharded_checkpoints
    tmp = ckpt.temp_checkpoint_dir(run_dir, step)
    acc.wait_for_everyone()
    with disk_errors(f"writing checkpoint step {step} to {run_dir}", cleanup=tmp,
                     advice=lambda: resume_advice(run_dir)):
        ckpt.write_process_state(tmp, acc.process_index)
        if sharded:
            ckpt.write_sharded_state(tmp, run.state_module, run.optimizer)
        acc.wait_for_everyone()  # complete only when every process has written its part
        final = ckpt.final_checkpoint_dir(run_dir, step)
        if run.is_main:
            state = {"step": step, "max_steps": run.max_steps, "format": "sharded" if sharded else "full",
                     "processes": acc.num_processes, "config": config_to_dict(run.cfg)}
            if run.balancer is not None:
                state["balance"] = run.balancer.state_dict()
            if run.measured:
                state["measured"] = dict(run.measured)
            ckpt.write_main_state(tmp, model=None if sharded else run.raw_student, tokenizer=run.tokenizer,
                                  optimizer=None if sharded else run.optimizer, scheduler=run.scheduler, state=state,
                                  extra_modules=run.features.checkpoint_modules() if run.features else None)
            publish_dir(tmp, final)
            ckpt.prune_checkpoints(run_dir, run.cfg.train.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def resume_advice(run_dir: Path) -> str:
    """What to do after a file-system failure: fix it, then resume (from which checkpoint)."""
    latest = ckpt.latest_checkpoint(run_dir)
    where = f"from {latest}" if latest is not None else "(no checkpoint was written yet: it starts over)"
    return f"free space or make the folder writable, then run the same command with train.resume=auto {where}"


def resume_run(run: Run, checkpoint: Path, state: dict, changes: dict) -> int:
    """Restore everything a checkpoint holds (``state``: its state.json, already read), with the
    allowed ``changes`` of settings applied (:mod:`potstill.training.resume`); returns the step to
    continue from."""
    step = int(state["step"])
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    if state.get("format") == "sharded":
        ckpt.load_sharded_state(checkpoint, run.state_module, run.optimizer)
    else:
        ckpt.load_student_weights(checkpoint, run.raw_student)
        # "cpu", not run.device: under torchrun on CPUs the device is cpu:<rank>, which torch.load cannot map to.
        where = run.device if run.device.type != "cpu" else "cpu"
        run.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=where, weights_only=False))
    apply_resume_changes(changes, optimizer=run.optimizer, scheduler=run.scheduler, fresh_groups=fresh_groups,
                         saved_scheduler_state=torch.load(checkpoint / "scheduler.pt", weights_only=False), step=step)
    if state.get("processes", run.accelerator.num_processes) == run.accelerator.num_processes:
        ckpt.load_rng(checkpoint, run.accelerator.process_index)
    else:  # another number of processes (resume.check_processes): a fresh stream per process and step
        from accelerate.utils import set_seed

        set_seed(run.cfg.train.seed + 1_000_003 * step + run.accelerator.process_index)
    if run.features is not None:
        run.features.load_checkpoint(checkpoint)
    if run.balancer is not None and "balance" in state:
        run.balancer.load_state_dict(state["balance"])
    if state.get("measured"):
        run.restore_measured(state["measured"])
    if step > run.max_steps:
        raise RunDirError(f"{checkpoint} is at step {step}, past this run's {run.max_steps} steps: raise "
                          "train.max_steps (or train.epochs) to at least that, or start a new run")
    log.info("resumed from %s (step %d of %d)", checkpoint, step, run.max_steps)
    return step


def completed_run(run_dir: Path, saved: dict, changes: dict) -> RunResult | None:
    """The finished run's result when ``saved`` (the resumed checkpoint's state) is its last step, its
    summary and student were written, and its length is unchanged: nothing to do, nothing rewritten."""
    summary_path, student_dir = run_dir / "summary.json", run_dir / STUDENT_DIR
    if saved.get("step") != saved.get("max_steps") or "train.max_steps" in changes or "train.epochs" in changes:
        return None
    if not (summary_path.is_file() and student_dir.is_dir()):
        return None  # stopped after its last checkpoint: finish() completes it
    summary = read_json_object(summary_path)
    if summary is None or summary.get("steps") != saved.get("step"):
        return None  # a damaged summary, or one of an earlier, shorter finish: this run completes it again
    log.info("%s is already complete (step %d of %d): nothing to do; raise train.max_steps to train longer",
             run_dir, saved["step"], saved["max_steps"])
    return RunResult(output_dir=run_dir, student_dir=student_dir, steps=int(saved["step"]),
                     final_eval=summary.get("final_eval") or {}, train_metrics=summary.get("train") or {})


def finish(run: Run, metrics: MetricsLogger, step_log: StepLog, progress: bool, *,
           resumed_at_end: bool = False) -> RunResult:
    """Final evaluation (and tasks) and checkpoint, the student saved with save_pretrained, the summary.

    ``resumed_at_end``: the run was stopped after its final checkpoint; its final evaluation
    (already in metrics.jsonl) and checkpoint are reused, not recorded twice."""
    final_eval = logged_eval(metrics.path, run.max_steps) if resumed_at_end else None
    if final_eval is None:
        with step_log.paused("eval"):
            final_eval = evaluate(run, metrics, run.max_steps, progress)
            evaluate_tasks(run, metrics, run.max_steps, progress,
                           with_teacher=not run.cfg.eval.at_start)  # otherwise scored at the start
    if not resumed_at_end:
        with step_log.paused("checkpoint"):
            save_checkpoint(run, run.max_steps)
    train_metrics = step_log.train_metrics or last_train_record(metrics.path)
    student_dir = run.run_dir / STUDENT_DIR
    whole = run.strategy.full_student_state(run.raw_student)  # every process: FSDP gathers the shards
    if run.is_main:
        projectors = run.features.projectors if run.features is not None and run.features.hidden_pairs else None
        with disk_errors(f"saving the student to {student_dir}", cleanup=run.run_dir / ".tmp-student",
                         advice=lambda: resume_advice(run.run_dir)):
            student_dir = publish_student(run.run_dir, run.raw_student, run.tokenizer, projectors, state_dict=whole,
                                          base_model=run.cfg.student.name_or_path)
            write_summary(run.run_dir, {
                "steps": run.max_steps, "final_eval": final_eval,
                "initial_eval": logged_eval(metrics.path, 0) or {},
                "train": train_metrics, "train_overall": step_log.overall(),
                "tasks": logged_tasks(metrics.path, run.max_steps),
                "student_parameters": run.n_params,
                "trained_parameters": sum(p.numel() for p in run.raw_student.parameters() if p.requires_grad),
                "teacher_parameters": sum(p.numel() for p in run.teacher.model.parameters())
                if run.teacher.model is not None else (run.teacher.summary() or {}).get("teacher_parameters"),
                **({"cross_tokenizer": run.teacher.summary()} if run.teacher.summary() is not None else {}),
                "train_examples": len(run.train_ds),
                "train_tokens_per_epoch": getattr(run.train_ds, "n_tokens", None),
                **({"measured": dict(run.measured)} if run.measured else {}),
                "hardware": hardware(run)})
    metrics.close()
    run.accelerator.wait_for_everyone()
    run.teacher.close()
    log.info("done: student saved to %s", student_dir)
    return RunResult(output_dir=run.run_dir, student_dir=student_dir, steps=run.max_steps, final_eval=final_eval,
                     train_metrics=train_metrics)


def logged_eval(path: Path, step: int) -> dict[str, float] | None:
    """The evaluation recorded at ``step`` in metrics.jsonl (without the ``eval/`` prefix), if any."""
    for record in reversed(read_metrics(path)):
        if record.get("step") == step and any(k.startswith("eval/") for k in record):
            return {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
    return None


def logged_tasks(path: Path, final_step: int) -> dict[str, dict[str, dict[str, float]]]:
    """The task scores of metrics.jsonl: {"student_before" (step 0), "student" (``final_step``),
    "teacher"}: {task: {metric: value}}; roles never scored are left out."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for record in read_metrics(path):
        for key, value in record.items():
            for prefix, role in ((TASKS, "student"), (TEACHER_TASKS, "teacher")):
                if not key.startswith(prefix):
                    continue
                if role == "student":
                    if record["step"] not in (0, final_step):
                        continue
                    role = "student" if record["step"] == final_step else "student_before"
                task, _, metric = key[len(prefix):].rpartition("/")
                out.setdefault(role, {}).setdefault(task, {})[metric] = value
    return out


def hardware(run: Run) -> dict[str, object]:
    """Where the run trained: device kind and name, processes, precision, strategy."""
    device = run.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": device.type, "device_name": name, "processes": run.accelerator.num_processes,
            "cpu_threads": torch.get_num_threads(), "precision": run.precision, "strategy": run.cfg.train.strategy}


def last_train_record(path: Path) -> dict[str, float]:
    """The newest training record of metrics.jsonl (loss terms, lr, ...), without its step."""
    for record in reversed(read_metrics(path)):
        if "loss" in record:
            return {k: v for k, v in record.items() if k != "step"}
    return {}


def kept_checkpoint(last_good: Path | None) -> str:
    return f"the last good checkpoint is {last_good} (resume it with train.resume=auto)" if last_good else \
        "no checkpoint was written yet (run again with train.resume=auto)"


def diverged_message(step: int, what: str, last_good: Path | None) -> str:
    keep = kept_checkpoint(last_good) if last_good else "no checkpoint was written yet"
    return (f"training diverged at step {step}: {what}; stopped without saving, {keep}; "
            "lower train.lr, keep train.max_grad_norm set, or use train.precision=fp32")
