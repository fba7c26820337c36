"""The student: loaded, built from a config, or cut from the teacher's layers; made trainable.

``student.bitnet`` turns its linear layers ternary (:mod:`potstill.models.bitnet`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..config import StudentConfig
from ..errors import ModelError
from .bitnet import apply_student_config
from .int4 import dequantized_state_dict
from .layers import decoder_layers, num_layers
from .loading import first_line, load_causal_lm, load_tokenizer

log = logging.getLogger("potstill")


def load_student(cfg: StudentConfig, *, teacher: nn.Module | None, teacher_tokenizer) -> tuple[nn.Module, Any]:
    """(trainable student in float32, tokenizer) from a path/object, a config, or the teacher's layers."""
    if cfg.name_or_path is not None:
        model = load_causal_lm(cfg.name_or_path, revision=cfg.revision, dtype=torch.float32,
                               trust_remote_code=cfg.trust_remote_code, role="student")
        tok_ref = cfg.tokenizer if cfg.tokenizer is not None else (
            cfg.name_or_path if isinstance(cfg.name_or_path, str) else None)
    elif cfg.from_teacher is not None:
        if teacher is None:
            raise ModelError("student.from_teacher needs a teacher: set teacher.name_or_path")
        layers = select_layers(num_layers(teacher), cfg.from_teacher.layers, cfg.from_teacher.every)
        model = student_from_teacher(teacher, layers)
        tok_ref = cfg.tokenizer
    else:
        model = student_from_config(cfg.config or {}, teacher=teacher, tokenizer=teacher_tokenizer)
        tok_ref = cfg.tokenizer
    if tok_ref is None:
        if teacher_tokenizer is None:
            raise ModelError("the student has no tokenizer: set student.tokenizer (or give a teacher)")
        tokenizer = teacher_tokenizer
    else:
        tokenizer = load_tokenizer(tok_ref, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                   role="student")
    model = apply_student_config(model, cfg)  # student.bitnet: ternary linear layers
    model = model.float()
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ModelError(f"student.gradient_checkpointing: {type(model).__name__} does not support it")
        # transformers 5 renamed it; older versions only have gradient_checkpointing_enable.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The KV cache is useless in training and conflicts with checkpointing.
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model, tokenizer


def select_layers(total: int, layers: list[int] | None, every: int | None) -> list[int]:
    """Teacher layer indices to keep. ``every=k`` keeps 0, k, 2k, ... (at least one layer)."""
    if layers is None:
        layers = list(range(0, total, every or 1))
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise ModelError(f"student.from_teacher.layers {bad} out of range: the teacher has {total} layers (0..{total - 1})")
    if len(set(layers)) != len(layers):
        raise ModelError(f"student.from_teacher.layers has repeated indices: {layers}")
    return list(layers)


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of the teacher with only ``layers`` kept (in that order), weights copied.

    Embeddings, final norm and output head are copied whole. Per-layer config lists
    (``layer_types`` for sliding-window models) are cut to match.
    """
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = type(teacher)(config)
    prefix, _ = decoder_layers(teacher)
    teacher_state = dequantized_state_dict(teacher)  # an int4 (CPU) teacher's layers give float weights
    new_state = {}
    for key in student.state_dict():
        if key.startswith(prefix + "."):
            idx, rest = key[len(prefix) + 1:].split(".", 1)
            src = f"{prefix}.{layers[int(idx)]}.{rest}"
        else:
            src = key
        value = teacher_state[src]
        if type(value) not in (torch.Tensor, nn.Parameter) and hasattr(value, "dequantize"):
            value = value.dequantize()  # a quantized teacher (torchao) gives the student its dequantized weights
        new_state[key] = value.detach().clone().float()
    student.load_state_dict(new_state)
    log.info("student from teacher: kept layers %s of %d", layers, num_layers(teacher))
    return student


def student_from_config(fields: dict[str, Any], *, teacher: nn.Module | None, tokenizer) -> nn.Module:
    """A randomly initialized model from config fields; model_type and vocab default to the teacher's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    model_type = fields.pop("model_type", None) or getattr(getattr(teacher, "config", None), "model_type", None)
    if model_type is None:
        raise ModelError("student.config needs a model_type (e.g. llama) when there is no teacher to copy it from")
    if "vocab_size" not in fields:
        if teacher is not None:
            fields["vocab_size"] = teacher.config.vocab_size
        elif tokenizer is not None:
            fields["vocab_size"] = len(tokenizer)
    if tokenizer is not None:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            fields.setdefault(attr, getattr(tokenizer, attr, None))
    try:
        config = AutoConfig.for_model(model_type, **fields)
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError) as err:
        raise ModelError(f"cannot build the student from student.config ({model_type}): {first_line(err)}") from None
