"""Logit distillation needs one vocabulary: check teacher and student share it.

Heads that differ only by padding rows share the real part (``VocabInfo.shared``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ..errors import ModelError
from .loading import describe

log = logging.getLogger("potstill")


@dataclass(frozen=True)
class VocabInfo:
    """``shared`` is the number of logit columns both models agree on (padding rows cut off)."""

    shared: int
    teacher_rows: int
    student_rows: int
    tokenizer_size: int


def output_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def same_tokenizer(a, b) -> bool:
    if a is b:
        return True
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


def check_vocab(teacher: nn.Module, teacher_tokenizer, student: nn.Module, student_tokenizer) -> VocabInfo:
    """Logit KD needs one vocabulary. Heads that differ only by padding rows share the real part."""
    if not same_tokenizer(teacher_tokenizer, student_tokenizer):
        raise ModelError(
            f"teacher tokenizer ({describe(teacher_tokenizer)}, {len(teacher_tokenizer)} tokens) and student tokenizer "
            f"({describe(student_tokenizer)}, {len(student_tokenizer)} tokens) differ: comparing the two token by "
            "token needs one vocabulary; potstill distill aligns the tokenizations for the logit term "
            "(loss.cross_tokenizer), or use a student of the teacher's family")
    t_rows, s_rows = output_rows(teacher), output_rows(student)
    shared = min(t_rows, s_rows)
    n_tok = len(student_tokenizer)
    if n_tok > shared:
        raise ModelError(
            f"the tokenizer has {n_tok} tokens but the {'teacher' if t_rows < s_rows else 'student'} head has only "
            f"{shared} rows: the model and tokenizer do not belong together")
    if t_rows != s_rows:
        log.info("teacher head has %d rows, student %d: distilling over the shared %d (tokenizer: %d tokens)",
                 t_rows, s_rows, shared, n_tok)
    return VocabInfo(shared=shared, teacher_rows=t_rows, student_rows=s_rows, tokenizer_size=n_tok)
