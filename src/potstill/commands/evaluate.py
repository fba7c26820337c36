"""``potstill evaluate``: score a finished run, a model folder or a model object on a dataset.

Perplexity of the model; with a teacher, the teacher's perplexity, KL(teacher || model) and
top-1 agreement (:func:`potstill.training.evaluation.evaluate_models`).

Cheap before costly: the arguments are checked, then the model folders (without their
weights), the tokenizer and the data, and only then are the models loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import MAX_COUNT, MAX_TOKENS, DataConfig, TeacherConfig, read_yaml, validate_config
from ..data import build_datasets
from ..errors import ConfigError
from ..models.loading import check_model_folder, freeze, load_causal_lm, load_tokenizer, looks_local, missing_folder
from ..models.precision import autocast_context, resolve_precision
from ..models.teacher_model import load_teacher
from ..models.vocab import check_vocab
from ..training.evaluation import evaluate_models


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
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate a model folder, a finished run directory, or a model object.

    For a run directory (one that holds ``config.yaml`` and ``student/``) the run's
    validation data, teacher, precision and batch size are used unless given here.
    """
    check_arguments(batch_size=batch_size, max_length=max_length, max_batches=max_batches, precision=precision)
    model, run_cfg = resolve_model(model)
    teacher_ref = teacher if teacher is not None else (run_cfg.teacher.name_or_path if run_cfg else None)
    teacher_ref = str(teacher_ref) if isinstance(teacher_ref, Path) else teacher_ref
    check_model_ref(model, "model")
    if teacher_ref is not None:
        check_model_ref(teacher_ref, "teacher")
    if data is None and run_cfg is None:
        raise ConfigError("evaluate needs --data (or data=), or a run directory whose config names its data")
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
    if data is not None:
        d_cfg = DataConfig(source=data, split=split or "train", validation_fraction=0.0,
                           max_length=max_length or (run_cfg.data.max_length if run_cfg else 1024))
        dataset, _ = build_datasets(d_cfg, tok, progress=progress)
    else:
        _, dataset = build_datasets(run_cfg.data, tok, seed=run_cfg.train.seed, progress=progress)
        if dataset is None:
            raise ConfigError("the run has no validation split: pass --data (or data=)")

    student = load_causal_lm(model, revision=None, dtype=torch.float32, trust_remote_code=False, role="model")
    student = freeze(student).to(device)
    t_model, shared = None, None
    if teacher_ref is not None:
        t_cfg = TeacherConfig(name_or_path=teacher_ref, tokenizer=None if isinstance(teacher_ref, str) else tok)
        t_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        t_model, t_tok = load_teacher(t_cfg, dtype=t_dtype)
        t_model = t_model.to(device)
        shared = check_vocab(t_model, t_tok, student, tok).shared
    return evaluate_models(student, dataset, pad_token_id=tok.pad_token_id, batch_size=batch_size, device=device,
                           teacher=t_model, shared_vocab=shared, max_batches=max_batches,
                           autocast=autocast_context(precision, device), progress=progress)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def check_arguments(*, batch_size: int | None, max_length: int | None, max_batches: int | None,
                    precision: str | None) -> None:
    """Counts that are whole numbers in range, before anything loads: a batch size of 0 would
    otherwise evaluate nothing and report made-up metrics."""
    limits = (("--batch-size", batch_size, 1, MAX_COUNT), ("--max-length", max_length, 8, MAX_TOKENS),
              ("--max-batches", max_batches, 1, MAX_COUNT))
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
