"""The teacher model in this process: loaded (optionally quantized), frozen, with its tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from ..config import TeacherConfig
from ..errors import ModelError
from .loading import DTYPES, freeze, load_causal_lm, load_tokenizer, set_attention


def teacher_dtype(setting: str, compute: torch.dtype | None) -> torch.dtype:
    """``teacher.dtype`` ('auto' | 'float32' | 'bfloat16' | 'float16') -> a dtype; 'auto' runs in the
    training precision's compute dtype (bf16 / fp16) or float32."""
    if setting == "auto":
        return compute or torch.float32
    return DTYPES[setting]


def load_teacher(cfg: TeacherConfig, *, dtype: torch.dtype | None, tokenizer: Any = None, meta: bool = False):
    """(frozen teacher model, tokenizer). The tokenizer defaults to the model's own; ``tokenizer``
    is one already loaded (by :func:`~.preflight.preflight`), so it is not loaded twice. ``meta``:
    see :func:`~.loading.load_causal_lm` (a quantized teacher always loads its weights)."""
    if cfg.quantization != "none":
        from .quantize import load_quantized_teacher

        model = load_quantized_teacher(cfg, dtype=dtype)
    else:
        model = load_causal_lm(cfg.name_or_path, revision=cfg.revision, dtype=dtype,
                               trust_remote_code=cfg.trust_remote_code, role="teacher", meta=meta)
    if dtype is not None and not isinstance(cfg.name_or_path, str) and cfg.quantization == "none":
        model = model.to(dtype)
    set_attention(model, cfg.attn_implementation, "teacher")
    if tokenizer is None:
        tokenizer = teacher_tokenizer(cfg)
    return freeze(model), tokenizer


def teacher_tokenizer(cfg: TeacherConfig) -> Any:
    """The teacher's tokenizer: teacher.tokenizer, else the teacher's own folder / hub id."""
    tok_ref = cfg.tokenizer if cfg.tokenizer is not None else cfg.name_or_path
    if not isinstance(tok_ref, str) and cfg.tokenizer is None:
        raise ModelError("teacher.name_or_path is an object: also give teacher.tokenizer (a tokenizer or its path)")
    return load_tokenizer(tok_ref, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, role="teacher")
