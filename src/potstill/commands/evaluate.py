"""``potstill evaluate``: score a finished run, a model folder or a model object.

On text: perplexity, bits per byte and bits per character of the model; with a teacher, the
teacher's too, KL(teacher || model) and top-1 agreement
(:func:`potstill.training.evaluation.evaluate_models`). A teacher whose tokenizer differs from the
model's is scored on its own tokenization of the same data, and KL and agreement (which need one
vocabulary) are left out: :data:`CROSS_TOKENIZER_NOTE`.
On tasks: any lm-evaluation-harness task, by name or from local task YAMLs
(:mod:`potstill.training.tasks`), for the model and the teacher.

Cheap before costly: the arguments are checked, then the model folders (without their
weights), the tokenizer, the tasks and the data, and only then are the models loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import MAX_COUNT, MAX_TOKENS, DataConfig, TeacherConfig, read_yaml, validate_config
from ..data import build_datasets
from ..errors import ConfigError, ModelError
from ..models.loading import check_model_folder, freeze, load_causal_lm, load_tokenizer, looks_local, missing_folder
from ..models.precision import autocast_context, resolve_precision
from ..models.teacher_model import load_teacher, teacher_tokenizer
from ..models.vocab import check_vocab, output_rows, same_tokenizer
from ..training.evaluation import evaluate_models

log = logging.getLogger("potstill")

CROSS_TOKENIZER_NOTE = ("the teacher's tokenizer differs from the model's: each model is scored on its own "
                        "tokenization of the same text; perplexities over different tokenizations are not "
                        "comparable; compare bits per byte (KL and agreement need one vocabulary: left out)")


def evaluate(
    model: str | Path | nn.Module,
    *,
    teacher: str | Path | nn.Module | None = None,
    data: Any = None,
    split: str | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    precision: str | None = None,
    packing: bool = False,
    tasks: Sequence[str] = (),
    task_paths: Sequence[str | Path] = (),
    task_limit: int | None = None,
    task_fewshot: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate a model folder, a finished run directory, or a model object.

    For a run directory (one that holds ``config.yaml`` and ``student/``) the run's
    validation data, teacher, precision, batch size and ``eval.tasks`` are used unless given here.
    ``data``: evaluate on this instead, each example in its own row (``packing=True`` packs
    them into blocks of ``max_length``, dropping the last partial block). The result is flat:
    ``ce``, ``ppl``, ``bpb``, ``bpc``, ``tokens`` (scored), ``bytes``, ``chars``, the teacher's
    (``teacher_ce`` ...) and the pair's metrics (``kl``, ``agreement``), and
    ``tasks/<task>/<metric>`` (``teacher_tasks/...``) for each task.

    A teacher whose tokenizer differs from the model's is scored on its own tokenization of the
    same data (built again with its tokenizer, same data settings): ``teacher_ce``,
    ``teacher_ppl``, ``teacher_bpb``, ``teacher_bpc`` and its own ``teacher_tokens``,
    ``teacher_bytes``, ``teacher_chars``; no ``kl`` or ``agreement``. Its perplexity is per
    teacher token: compare ``bpb`` with ``teacher_bpb``.
    """
    check_arguments(batch_size=batch_size, max_length=max_length, max_batches=max_batches, precision=precision,
                    task_limit=task_limit, task_fewshot=task_fewshot)
    model, run_cfg = resolve_model(model)
    teacher_ref = teacher if teacher is not None else (run_cfg.teacher.name_or_path if run_cfg else None)
    teacher_ref = str(teacher_ref) if isinstance(teacher_ref, Path) else teacher_ref
    check_model_ref(model, "model")
    if teacher_ref is not None:
        check_model_ref(teacher_ref, "teacher")
    tasks, task_paths = list(tasks), [str(p) for p in task_paths]
    if not tasks and run_cfg is not None and data is None:
        tasks, task_paths = list(run_cfg.eval.tasks), list(run_cfg.eval.task_paths)
        task_limit = task_limit if task_limit is not None else run_cfg.eval.task_limit
        task_fewshot = task_fewshot if task_fewshot is not None else run_cfg.eval.task_fewshot
    if task_paths and not tasks:
        raise ConfigError("evaluate --task-dir names where local tasks live: give --tasks too (e.g. --tasks my_task)")
    if tasks:
        from ..training.tasks import check_tasks

        check_tasks(tasks, task_paths)
    if data is None and run_cfg is None and not tasks:
        raise ConfigError("evaluate needs --data (or data=), --tasks, or a run directory whose config names its data")
    if precision is None:
        precision = run_cfg.train.precision if run_cfg else "auto"
    if batch_size is None:
        batch_size = (run_cfg.eval.batch_size or run_cfg.train.batch_size) if run_cfg else 8
    precision = resolve_precision(precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if tokenizer is None:
        tokenizer = model if isinstance(model, str) else None
        if tokenizer is None:
            raise ConfigError("evaluate(model=<object>) needs tokenizer=")
    tok = load_tokenizer(str(tokenizer) if isinstance(tokenizer, Path) else tokenizer, role="model")
    t_cfg = t_tok = None
    if teacher_ref is not None:
        t_cfg = TeacherConfig(name_or_path=teacher_ref, tokenizer=None if isinstance(teacher_ref, str) else tok)
        t_tok = teacher_tokenizer(t_cfg)  # before any weights: a different tokenizer needs its own data
    cross = t_tok is not None and not same_tokenizer(t_tok, tok)
    dataset = t_dataset = None
    if data is not None or run_cfg is not None:
        dataset = evaluation_data(tok, data=data, split=split, run_cfg=run_cfg, max_length=max_length,
                                  packing=packing, progress=progress, required=not tasks)
        if cross and dataset is not None:
            t_dataset = evaluation_data(t_tok, data=data, split=split, run_cfg=run_cfg, max_length=max_length,
                                        packing=packing, progress=progress, required=True,
                                        label="teacher evaluation")

    student = load_causal_lm(model, revision=None, dtype=torch.float32, trust_remote_code=False, role="model")
    student = freeze(student).to(device)
    t_model, shared = None, None
    if t_cfg is not None:
        t_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        t_model, t_tok = load_teacher(t_cfg, dtype=t_dtype, tokenizer=t_tok)
        t_model = t_model.to(device)
        if cross:
            check_teacher_head(t_model, t_tok)
        else:
            shared = check_vocab(t_model, t_tok, student, tok).shared
    autocast = autocast_context(precision, device)
    result: dict[str, float] = {}
    if dataset is not None:
        result = evaluate_models(student, dataset, pad_token_id=tok.pad_token_id, batch_size=batch_size, device=device,
                                 teacher=None if cross else t_model, shared_vocab=shared, max_batches=max_batches,
                                 autocast=autocast, progress=progress, tokenizer=tok)
        log.info("scored %d tokens (%d bytes) of %s; %s", int(result["tokens"]), int(result.get("bytes", 0)),
                 describe_items(dataset), describe_losses(dataset))
    if t_dataset is not None:
        t_result = evaluate_models(t_model, t_dataset, pad_token_id=t_tok.pad_token_id, batch_size=batch_size,
                                   device=device, max_batches=max_batches, autocast=autocast, progress=progress,
                                   tokenizer=t_tok, desc="teacher eval")
        result.update({f"teacher_{k}": v for k, v in t_result.items()})
        log.info("teacher: scored %d tokens (%d bytes) of %s; %s", int(t_result["tokens"]),
                 int(t_result.get("bytes", 0)), describe_items(t_dataset), describe_losses(t_dataset))
        log.info("%s", CROSS_TOKENIZER_NOTE)
        log.info("%s", describe_cross(result))
    if tasks:
        from ..training.tasks import TASKS, TEACHER_TASKS, score_models

        # Each model reads the tasks through its own tokenizer (the same one, unless cross).
        same = [(TEACHER_TASKS, t_model)] if t_model is not None and not cross else []
        groups = [([(TASKS, student)] + same, tok)] + ([([(TEACHER_TASKS, t_model)], t_tok)] if cross else [])
        for models, model_tok in groups:
            result.update(score_models(models, model_tok, tasks, autocast=autocast, task_paths=task_paths,
                                       limit=task_limit, num_fewshot=task_fewshot, batch_size=batch_size,
                                       max_length=max_length, device=device, seed=seed, progress=progress))
    return result


def evaluation_data(tok, *, data, split, run_cfg, max_length, packing: bool, progress: bool, required: bool,
                    label: str = "evaluation"):
    """The text to score: ``data`` (each example its own row unless ``packing``), else the run's
    validation split (as the run built it; None if it has none and not ``required``). The same
    arguments with another tokenizer give the same text, tokenized by it."""
    if data is not None:
        d_cfg = DataConfig(source=data, split=split or "train", validation_fraction=0.0, packing=packing,
                           max_length=max_length or (run_cfg.data.max_length if run_cfg else 1024))
        dataset, _ = build_datasets(d_cfg, tok, progress=progress, label=label)
        return dataset
    _, dataset = build_datasets(run_cfg.data, tok, seed=run_cfg.train.seed, progress=progress)
    if dataset is None and required:
        raise ConfigError("the run has no validation split: pass --data (or data=), or --tasks")
    return dataset


def check_teacher_head(t_model: nn.Module, t_tok) -> None:
    """Scored on its own tokens, the teacher needs a head row for each of its tokenizer's tokens."""
    rows = output_rows(t_model)
    if len(t_tok) > rows:
        raise ModelError(f"the teacher tokenizer has {len(t_tok)} tokens but the teacher head has only {rows} rows: "
                         "the teacher and its tokenizer do not belong together")


def describe_cross(result: dict[str, float]) -> str:
    """'bits per byte: model 3.12, teacher 1.05; bits per character: model 3.15, teacher 1.06'."""
    parts = []
    for key, name in (("bpb", "bits per byte"), ("bpc", "bits per character")):
        if key in result and f"teacher_{key}" in result:
            parts.append(f"{name}: model {result[key]:.4f}, teacher {result['teacher_' + key]:.4f}")
    return "; ".join(parts) or "no bytes scored"


def describe_items(dataset) -> str:
    """'412 examples' or '30 blocks of 256 tokens'."""
    return f"{len(dataset)} blocks of {dataset.max_length} tokens" if dataset.packing else f"{len(dataset)} examples"


def describe_losses(dataset) -> str:
    """What tokenizing and packing left out of the data, from the dataset's own counts."""
    s = dataset.stats
    notes = []
    if s.get("dropped_tokens"):
        why = "the last partial block (packing)" if dataset.packing else "truncation to --max-length"
        notes.append(f"{s['dropped_tokens']} tokens dropped by {why}")
    if s.get("truncated"):
        notes.append(f"{s['truncated']} examples truncated")
    return ", ".join(notes) if notes else "nothing dropped"


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def check_arguments(*, batch_size: int | None, max_length: int | None, max_batches: int | None,
                    precision: str | None, task_limit: int | None = None, task_fewshot: int | None = None) -> None:
    """Counts that are whole numbers in range, before anything loads: a batch size of 0 would
    otherwise evaluate nothing and report made-up metrics."""
    limits = (("--batch-size", batch_size, 1, MAX_COUNT), ("--max-length", max_length, 8, MAX_TOKENS),
              ("--max-batches", max_batches, 1, MAX_COUNT), ("--task-limit", task_limit, 1, MAX_COUNT),
              ("--task-fewshot", task_fewshot, 0, 1024))
    for flag, value, low, high in limits:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"evaluate {flag} (or {flag[2:].replace('-', '_')}=) must be a whole number from "
                              f"{low} to {high}, got {value!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"evaluate --precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def resolve_model(model: str | Path | nn.Module) -> tuple[str | nn.Module, Any]:
    """(the model to load, the run's config or None): a run directory gives its student/ folder."""
    if isinstance(model, nn.Module):
        return model, None
    if not isinstance(model, (str, Path)):
        raise ConfigError(f"evaluate: the model must be a run directory, a model folder, a hub id or an nn.Module, "
                          f"not {type(model).__name__}")
    folder = Path(model).expanduser()
    if (folder / "config.yaml").is_file():
        if (folder / "student").is_dir():
            return str(folder / "student"), validate_config(read_yaml(folder / "config.yaml"))
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder} is a run directory without student/: the run has not finished (or was "
                              "stopped); resume it with train.resume=auto, or evaluate a model folder")
    return str(model), None


def check_model_ref(ref: str | nn.Module, role: str) -> None:
    """A local model folder exists and holds config.json and whole weight files (no weights read)."""
    if not isinstance(ref, str):
        return
    path = Path(ref).expanduser()
    if path.is_dir():
        check_model_folder(path, role=role)
    elif path.exists():
        raise ConfigError(f"evaluate: the {role} {ref} is a file: give a run directory or a model folder")
    elif looks_local(ref):
        raise ConfigError(missing_folder(ref, role))
