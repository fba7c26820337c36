"""``potstill evaluate``: score a finished run, a model folder or a model object on a dataset.

Perplexity of the model; with a teacher, the teacher's perplexity, KL(teacher || model) and
top-1 agreement (:func:`potstill.training.evaluation.evaluate_models`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DataConfig, TeacherConfig, read_yaml, validate_config
from ..data import build_datasets
from ..errors import ConfigError
from ..models.loading import freeze, load_causal_lm, load_tokenizer
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
    run_cfg = None
    if isinstance(model, (str, Path)) and (Path(model) / "config.yaml").is_file() and (Path(model) / "student").is_dir():
        run_cfg = validate_config(read_yaml(Path(model) / "config.yaml"))
        model = Path(model) / "student"
    if precision is None:
        precision = run_cfg.train.precision if run_cfg else "auto"
    if batch_size is None:
        batch_size = (run_cfg.eval.batch_size or run_cfg.train.batch_size) if run_cfg else 8
    precision = resolve_precision(precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = load_causal_lm(str(model) if isinstance(model, Path) else model, revision=None, dtype=torch.float32,
                             trust_remote_code=False, role="model")
    student = freeze(student).to(device)
    if tokenizer is None:
        tokenizer = model if isinstance(model, (str, Path)) else None
        if tokenizer is None:
            raise ConfigError("evaluate(model=<object>) needs tokenizer=")
    tok = load_tokenizer(str(tokenizer) if isinstance(tokenizer, Path) else tokenizer, role="model")

    t_model, shared = None, None
    teacher_ref = teacher if teacher is not None else (run_cfg.teacher.name_or_path if run_cfg else None)
    if teacher_ref is not None:
        t_cfg = TeacherConfig(name_or_path=str(teacher_ref) if isinstance(teacher_ref, Path) else teacher_ref,
                              tokenizer=None if isinstance(teacher_ref, (str, Path)) else tok)
        t_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        t_model, t_tok = load_teacher(t_cfg, dtype=t_dtype)
        t_model = t_model.to(device)
        shared = check_vocab(t_model, t_tok, student, tok).shared

    if data is not None:
        d_cfg = DataConfig(source=data, split=split or "train", validation_fraction=0.0,
                           max_length=max_length or (run_cfg.data.max_length if run_cfg else 1024))
        dataset, _ = build_datasets(d_cfg, tok, progress=progress)
    elif run_cfg is not None:
        _, dataset = build_datasets(run_cfg.data, tok, seed=run_cfg.train.seed, progress=progress)
        if dataset is None:
            raise ConfigError("the run has no validation split: pass --data (or data=)")
    else:
        raise ConfigError("evaluate needs --data (or data=), or a run directory whose config names its data")
    return evaluate_models(student, dataset, pad_token_id=tok.pad_token_id, batch_size=batch_size, device=device,
                           teacher=t_model, shared_vocab=shared, max_batches=max_batches,
                           autocast=autocast_context(precision, device), progress=progress)
