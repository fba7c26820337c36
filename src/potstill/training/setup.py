"""Everything a run needs before its first step, built in one place: :func:`build_run`.

    models     teacher model (frozen; skipped when a cache replaces it), student, shared vocabulary
    features   the feature terms' layer pairs and projectors (None without feature terms)
    data       tokenized train / validation sets, the step batcher, the token source
    teacher    the signal source (:func:`potstill.teachers.build_teacher`)
    objective  the loss terms, and the loss path (chunked or plain) both sides agree on
    optimizer  AdamW (no decay on norms and biases) and the schedule, prepared by Accelerate
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import DistillConfig
from ..data import build_datasets, build_teacher_view
from ..data.batching import StepBatcher
from ..data.preflight import warn_about_datasets
from ..errors import ConfigError, ModelError
from ..features.distiller import FeatureDistiller
from ..losses.aligned import ALIGNED_DIVERGENCES
from ..models.heads import HeadParams
from ..models.hidden import supports_chunked
from ..models.precision import autocast_context, compute_dtype
from ..models.preflight import Preflight, preflight
from ..models.students import load_student
from ..models.teacher_model import load_teacher, teacher_dtype
from ..models.vocab import check_vocab
from ..teachers import Teacher, build_teacher, connect_server
from ..teachers.cache_format import check_manifest, read_manifest
from .forward import StudentForward
from .balance import TermBalancer
from .confidence import measure_confidence
from .objective import Objective
from .onpolicy import OnPolicyTokens, build_onpolicy_tokens, onpolicy_data_config
from .sharding import Strategy, local_bytes, make_strategy
from .tokens import TokenSource

log = logging.getLogger("potstill")


@dataclass
class Run:
    """The parts of one training run, as :func:`build_run` made them."""

    cfg: DistillConfig
    accelerator: Any
    strategy: Strategy            # ddp or fsdp: placement, gradient sync, clipping, checkpoint format
    precision: str
    run_dir: Path
    autocast: Callable[[], contextlib.AbstractContextManager]
    student: nn.Module            # as Accelerate wrapped it (DDP); call this one
    raw_student: nn.Module        # the model itself (sharded in place under FSDP): hooks, head, saving
    tokenizer: Any
    teacher: Teacher
    features: FeatureDistiller | None
    objective: Objective
    student_forward: StudentForward
    train_ds: Any
    val_ds: Any
    batcher: StepBatcher
    tokens: TokenSource | OnPolicyTokens  # the data's tokens, or with onpolicy: the samples too
    max_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    shared_vocab: int | None
    n_params: int
    balancer: TermBalancer | None = None  # per-term gradients (loss.balance, loss.log_term_gradients)
    measured: dict = field(default_factory=dict)  # what the run measured before training (cakld_confidence)

    def restore_measured(self, saved: dict) -> None:
        """A resumed run keeps what its first session measured (the same data give the same value;
        this holds even where they would not)."""
        if "cakld_confidence" in saved and self.measured.get("cakld_confidence") != saved["cakld_confidence"]:
            self.measured["cakld_confidence"] = float(saved["cakld_confidence"])
            self.objective.set_divergence_params(
                self.cfg.loss.logits.divergence_params(confidence=self.measured["cakld_confidence"]))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def state_module(self) -> nn.Module:
        """Every module the optimizer steps: the student, with the feature projectors beside it."""
        if self.features is not None and self.features.parameters():
            return nn.ModuleDict({"student": self.raw_student, "projectors": self.features.projectors})
        return self.raw_student

    def model_state_bytes(self) -> int:
        """Bytes this process holds for the student's parameters, their gradients (counted at the
        parameters' size: they exist from backward to the optimizer step) and optimizer state,
        and the teacher's weights; a shard's local part under FSDP. Activations and buffers of
        the loss are not included."""
        student = [p for p in self.trained_parameters()]
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        teacher = self.teacher.model
        held = [*teacher.parameters(), *teacher.buffers()] if teacher is not None else []
        return 2 * local_bytes(student) + local_bytes(state) + local_bytes(held)

    def trained_parameters(self) -> list[nn.Parameter]:
        """Student and feature-projector parameters that train: what clipping and the optimizer see."""
        return [p for p in self.student.parameters() if p.requires_grad] + (
            self.features.parameters() if self.features else [])


def build_run(cfg: DistillConfig, accelerator, precision: str, run_dir: Path, *, progress: bool) -> Run:
    """Check, then build everything: cheap before costly, so that a mistake in the config, a
    tokenizer, a model folder or the data is one line before any model loads.

    preflight (config, tokenizers, model folders), data (tokenized, or a cache hit), models,
    optimizer. Tokenizing draws no random numbers (the validation split has its own seeded
    generator), so the models are initialized from the same random state as before it, and a
    run and its resumed continuation start identically."""
    device = accelerator.device
    autocast = autocast_context(precision, device)
    strategy = make_strategy(cfg, accelerator)
    # Data are tokenized next, before any model loads: that checks every row, so preflight need not.
    manifest = None
    if cfg.teacher.cache is not None:  # its manifest first: a missing or damaged cache is one line
        manifest = read_manifest(Path(cfg.teacher.cache))
        check_manifest(Path(cfg.teacher.cache), manifest)
    checked = preflight(cfg, role="distill", check_data=False)
    cross = plan_cross_tokenizer(cfg, checked, manifest)
    if cfg.eval.tasks:  # lm-eval installed, the task names known, the local task folders there
        from .tasks import check_tasks

        check_tasks(cfg.eval.tasks, cfg.eval.task_paths)
    with accelerator.main_process_first():
        train_ds, val_ds = build_datasets(onpolicy_data_config(cfg), checked.tokenizer, seed=cfg.train.seed,
                                          progress=progress and accelerator.is_main_process, spans=cross is not None)
        if cross is not None and cfg.teacher.cache is None:
            cross.view = build_teacher_view(cfg.data, cross.teacher_tokenizer, seed=cfg.train.seed,
                                            progress=progress and accelerator.is_main_process)
    tc = cfg.train
    batcher = StepBatcher(len(train_ds), batch_size=tc.batch_size, grad_accum=tc.grad_accum,
                          world_size=accelerator.num_processes, rank=accelerator.process_index, seed=tc.seed)
    max_steps = tc.max_steps or batcher.steps_for_epochs(tc.epochs)
    if accelerator.is_main_process:
        warn_about_datasets(train_ds, val_ds, epochs=batcher.epoch_of(max_steps))

    server = connect_server(cfg, tokenizer=checked.tokenizer, train_ds=train_ds)  # a served teacher: checked first
    teacher_model, student, tokenizer, shared_vocab = load_models(
        cfg, precision, checked, meta=strategy.meta_init, cross=cross is not None,
        calibration=calibration_batches(train_ds, cfg.train.batch_size, checked.tokenizer.pad_token_id, device),
        progress=progress and accelerator.is_main_process)
    features = FeatureDistiller.build(cfg.loss, teacher_model, student, seed=cfg.train.seed)
    if features is not None:
        features.to(device)
    strategy.place_teacher(teacher_model)  # sharded under FSDP
    if features is not None and features.needs_fit:  # loss.hidden.preprocess: the teacher's statistics
        features.fit(teacher_model, calibration_batches(train_ds, tc.batch_size, checked.tokenizer.pad_token_id, device)(
            cfg.loss.hidden.fit_batches), autocast=autocast, progress=progress and accelerator.is_main_process,
            accelerator=accelerator)
        strategy.release_teacher(teacher_model)
    n_params = sum(p.numel() for p in student.parameters())
    log.info("student: %s, %.2fM parameters; teacher: %s; precision %s on %s x%d",
             type(student).__name__, n_params / 1e6,
             type(teacher_model).__name__ if teacher_model is not None else "none",
             precision, device, accelerator.num_processes)

    if cross is not None:
        teacher = build_aligned_teacher(cfg, cross, model=teacher_model, student=student, tokenizer=tokenizer,
                                        train_ds=train_ds, autocast=autocast)
    else:
        teacher = build_teacher(cfg, model=teacher_model, student=student, tokenizer=tokenizer, train_ds=train_ds,
                                features=features, server=server, autocast=autocast)
    student = strategy.place_student(student)
    optimizer, scheduler = build_optimizer(cfg, student, features, max_steps)
    wrapped, raw_student, optimizer = strategy.prepare(student, optimizer)
    student_head = choose_loss_path(cfg.loss.path, raw_student, teacher)
    measured = {}
    lc = cfg.loss.logits
    if lc.weight > 0 and lc.divergence == "cakld" and lc.cakld_confidence is None:
        measured["cakld_confidence"] = measure_confidence(
            teacher, train_ds, batches=lc.cakld_batches, batch_size=tc.batch_size,
            pad_token_id=tokenizer.pad_token_id, device=device)
        strategy.release_teacher(teacher.model)
    objective = Objective(cfg.loss, shared_vocab, features=features, autocast=autocast,
                          divergence_params=lc.divergence_params(confidence=measured.get("cakld_confidence")))
    balancer = TermBalancer.build(cfg.loss, [p for p in raw_student.parameters() if p.requires_grad],
                                  features.parameters() if features is not None else [], seed=tc.seed,
                                  precision=precision)
    tokens = TokenSource(train_ds, batcher, tokenizer.pad_token_id, device)
    if cfg.onpolicy.enabled:
        tokens = build_onpolicy_tokens(cfg, tokens, train_ds, tokenizer, student=raw_student,
                                       teacher_model=teacher.model, shared_vocab=shared_vocab, autocast=autocast,
                                       synced=strategy.lockstep,
                                       world_size=accelerator.num_processes, rank=accelerator.process_index)
    return Run(cfg=cfg, accelerator=accelerator, strategy=strategy, precision=precision, run_dir=run_dir, autocast=autocast,
               student=wrapped, raw_student=raw_student, tokenizer=tokenizer, teacher=teacher, features=features,
               objective=objective, student_forward=StudentForward(wrapped, raw_student, student_head, features),
               train_ds=train_ds, val_ds=val_ds, batcher=batcher,
               tokens=tokens, max_steps=max_steps,
               optimizer=optimizer, scheduler=scheduler, shared_vocab=shared_vocab, n_params=n_params,
               balancer=balancer, measured=measured)


def load_models(cfg: DistillConfig, precision: str, checked: Preflight | None = None, *, meta: bool = False,
                cross: bool = False, calibration: Callable[[int], list[dict]] | None = None,
                progress: bool = False) -> tuple[nn.Module | None, nn.Module, Any, int | None]:
    """(frozen teacher model or None, trainable student, tokenizer, shared vocabulary or None).

    ``checked``: what :func:`~potstill.models.preflight.preflight` loaded (the tokenizers); run
    here when not given. A teacher cache replaces the teacher model. A teacher whose vocabulary
    differs from the student's is refused where a logit or feature term needs it, else dropped
    (no evaluation against it), unless ``cross`` (a cross-tokenizer run: the logit term aligns
    the two tokenizations). ``meta``: models built on the meta device where they can be, no
    weights read (their shards come from the main process: :mod:`.sharding`). ``calibration``:
    ``n -> n batches`` of the train data, for a pruned student (:func:`calibration_batches`)."""
    checked = checked or preflight(cfg, role="distill", check_data=False)
    teacher, teacher_tok = None, None
    if cfg.teacher.name_or_path is not None and cfg.teacher.cache is None and cfg.teacher.server is None:
        dtype = teacher_dtype(cfg.teacher.dtype, compute_dtype(precision))
        teacher, teacher_tok = load_teacher(cfg.teacher, dtype=dtype, tokenizer=checked.teacher_tokenizer, meta=meta)
    student, tokenizer = load_student(cfg.student, teacher=teacher, teacher_tokenizer=teacher_tok,
                                      tokenizer=checked.tokenizer, meta=meta, own_vocab=cross,
                                      calibration=calibration, progress=progress)
    shared_vocab = None
    if teacher is not None and not cross:
        try:
            shared_vocab = check_vocab(teacher, teacher_tok, student, tokenizer).shared
        except ModelError:
            if cfg.loss.logits.weight > 0 or cfg.loss.uses_features:
                raise
            log.warning("teacher and student vocabularies differ: the teacher is not used in evaluation")
            teacher = None
    return teacher, student, tokenizer, shared_vocab


@dataclass
class CrossTokenizerPlan:
    """A run whose teacher tokenizes differently: the teacher's tokenizer, the cache's manifest
    (a cache captured with offsets) or the teacher's view of the train split (online)."""

    teacher_tokenizer: Any
    manifest: dict | None = None
    view: Any = None


def plan_cross_tokenizer(cfg: DistillConfig, checked: Preflight, manifest: dict | None = None
                         ) -> CrossTokenizerPlan | None:
    """Whether this run distills across tokenizers, decided before the data are tokenized (the
    student's tokens then carry character spans); what such a run cannot do is refused here, in
    one line. A cache captured with ``cache.offsets`` always aligns (it holds the teacher's own
    tokenization); a teacher loaded here does when its tokenizer differs from the student's.
    ``manifest``: the cache's, read and checked already."""
    from ..models.teacher_model import teacher_tokenizer
    from ..models.vocab import same_tokenizer

    if cfg.teacher.cache is not None:  # ``manifest``: the cache's, already read and checked
        if not manifest.get("offsets"):
            return None
        if cfg.teacher.tokenizer is None and cfg.teacher.name_or_path is None:
            raise ModelError(f"teacher.cache {cfg.teacher.cache} holds the teacher's own tokenization (captured with "
                             "cache.offsets): set teacher.tokenizer (or teacher.name_or_path) to the teacher's tokenizer, "
                             "which maps its token ids to the student's")
        teacher_tok = checked.teacher_tokenizer or teacher_tokenizer(cfg.teacher)
    else:
        teacher_tok = checked.teacher_tokenizer
        if teacher_tok is None or cfg.teacher.server is not None or same_tokenizer(teacher_tok, checked.tokenizer):
            return None
        if cfg.loss.logits.weight <= 0 and not cfg.loss.uses_features:
            return None  # hard labels only: the teacher is not used (models/vocab drops it from evaluation)
    what = "this cache (captured with cache.offsets)" if manifest else "a teacher with another tokenizer"
    if cfg.loss.uses_features:
        raise ModelError(f"loss.hidden / loss.attention compare the two models token by token, which {what} does "
                         "not allow (the two tokenizations differ): set their weights to 0, or use a student with the "
                         "teacher's tokenizer")
    if cfg.onpolicy.enabled:
        raise ConfigError(f"onpolicy with {what} is not supported yet (the student's samples have no teacher "
                          "tokenization): set onpolicy.lmbda=0, or use a student with the teacher's tokenizer")
    if cfg.train.strategy == "fsdp":
        raise ConfigError(f"train.strategy=fsdp with {what} is not supported yet: use ddp (train.strategy=auto)")
    if cfg.loss.logits.weight > 0 and cfg.loss.logits.divergence not in ALIGNED_DIVERGENCES:
        raise ConfigError(f"loss.logits.divergence={cfg.loss.logits.divergence} with {what}: the aligned loss "
                          f"supports {', '.join(ALIGNED_DIVERGENCES)} on the mapped top-k (and ULD elsewhere)")
    log.info("cross-tokenizer distillation: teacher %s (%d tokens), student %s (%d tokens); tokens aligned by "
             "character (loss.cross_tokenizer.mode=%s)", type(teacher_tok).__name__, len(teacher_tok),
             type(checked.tokenizer).__name__, len(checked.tokenizer), cfg.loss.cross_tokenizer.mode)
    return CrossTokenizerPlan(teacher_tokenizer=teacher_tok, manifest=manifest)


def build_aligned_teacher(cfg: DistillConfig, cross: CrossTokenizerPlan, *, model: nn.Module | None,
                          student: nn.Module, tokenizer, train_ds, autocast) -> Teacher:
    """The teacher source of a cross-tokenizer run: the cache, or the model reading its own view."""
    from ..data import text_fingerprint
    from ..data.alignment import context_token
    from ..models.vocab import output_rows
    from ..models.vocab_map import build_vocab_map
    from ..teachers.aligned import CachedAlignedTeacher, OnlineAlignedTeacher
    from ..teachers.cache_format import CacheReader, CacheError
    from ..teachers.cached import check_temperature, tokenizer_sha256

    cc = cfg.loss.cross_tokenizer
    if cross.manifest is not None:
        reader = CacheReader(cfg.teacher.cache)
        m = reader.manifest
        where = f"teacher.cache {cfg.teacher.cache}"
        if m["tokenizer_sha256"] != tokenizer_sha256(cross.teacher_tokenizer):
            raise CacheError(f"{where} was captured with another tokenizer than teacher.tokenizer "
                             f"({type(cross.teacher_tokenizer).__name__}, {len(cross.teacher_tokenizer)} tokens): "
                             "name the tokenizer of the teacher that made the cache")
        if m["offsets"]["text_fingerprint"] != text_fingerprint(cfg.data, seed=cfg.train.seed):
            raise CacheError(f"{where} was captured on other texts than this run's (data source, split or format "
                             "settings differ): capture it with this data section")
        check_temperature(m, cfg.loss.logits.temperature, where)
        vmap = build_vocab_map(tokenizer, cross.teacher_tokenizer, student_rows=output_rows(student),
                               teacher_rows=int(m["teacher"]["vocab_size"]))
        log.info("vocabulary map: %s", vmap.describe())
        return CachedAlignedTeacher(reader, train_ds=train_ds, vocab_map=vmap, temperature=cfg.loss.logits.temperature,
                                    examples=m["offsets"]["examples"])
    vmap = build_vocab_map(tokenizer, cross.teacher_tokenizer, student_rows=output_rows(student),
                           teacher_rows=output_rows(model))
    log.info("vocabulary map: %s", vmap.describe())
    return OnlineAlignedTeacher(model, view=cross.view, train_ds=train_ds, vocab_map=vmap, top_k=cc.top_k,
                                temperature=cfg.loss.logits.temperature,
                                pad_token_id=cross.teacher_tokenizer.pad_token_id, autocast=autocast,
                                context_token=context_token(cross.teacher_tokenizer))


def calibration_batches(train_ds, batch_size: int, pad_token_id: int | None, device: torch.device
                        ) -> Callable[[int], list[dict]]:
    """``n -> the first n batches of the train split`` in its order (the same on every process),
    as dicts of ``input_ids``, ``attention_mask``, ``labels`` (B, T): what a pruned student's
    importance is measured on."""
    from ..data.batching import MicroBatch

    def batches(n: int) -> list[dict]:
        starts = range(0, min(n * batch_size, len(train_ds)), batch_size)
        out = []
        for start in starts:
            b = MicroBatch.collate(train_ds, list(range(start, min(start + batch_size, len(train_ds)))),
                                   pad_token_id).to(device)
            out.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels})
        return out

    return batches


def build_optimizer(cfg: DistillConfig, student: nn.Module, features: FeatureDistiller | None, max_steps: int):
    """AdamW without weight decay on norms and biases (1-d parameters), and the schedule. Frozen
    parameters (LoRA's base weights, ``student.freeze``) are left out: no optimizer state, and
    weight decay never touches them."""
    from transformers import get_scheduler

    tc = cfg.train
    trained = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]  # norms and biases
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        + ([{"params": features.parameters(), "weight_decay": tc.weight_decay}]  # feature projectors
           if features is not None and features.parameters() else []),
        lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps)
    warmup = tc.warmup_steps or int(tc.warmup_ratio * max_steps)
    extra = {"num_decay_steps": max(1, max_steps // 10)} if tc.scheduler == "warmup_stable_decay" else None
    scheduler = get_scheduler(tc.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps,
                              scheduler_specific_kwargs=extra)
    return optimizer, scheduler


def choose_loss_path(path: str, student: nn.Module, teacher: Teacher) -> HeadParams | None:
    """The student's head params for the chunked path, or None for the plain one; tells the
    teacher which dense form to give. ``path`` is ``loss.path``: auto | chunked | plain."""
    head = None
    if path == "plain":
        log.info("loss path: plain (full logits), as configured")
    else:
        head, why = supports_chunked(student)
        if head is not None:
            why = teacher.chunked_problem()
            head = head if why is None else None
        if head is None:
            if path == "chunked":
                raise ConfigError(f"loss.path=chunked is not possible: {why}; use loss.path=auto or plain")
            log.info("loss path: plain (full logits), because %s", why)
        else:
            log.info("loss path: chunked (logits a chunk of tokens at a time)")
    teacher.use_loss_path("chunked" if head is not None else "plain")
    return head
