"""Load teacher and student, freeze the teacher, build students, check vocabularies.

Everything goes through the real Hugging Face loaders (``AutoModelForCausalLM``,
``AutoTokenizer``), so a hub id works for users with hub access and a local folder works
everywhere. Objects built in Python are accepted as they are.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import StudentConfig, TeacherConfig
from .errors import ModelError

log = logging.getLogger("potstill")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def describe(ref: Any) -> str:
    """A short human name for a model/tokenizer reference (path or object)."""
    if isinstance(ref, str):
        return ref
    name = getattr(ref, "name_or_path", None) or getattr(getattr(ref, "config", None), "_name_or_path", None)
    return f"{type(ref).__name__}({name})" if name else f"<{type(ref).__name__} object>"


def load_tokenizer(ref: Any, *, revision: str | None = None, trust_remote_code: bool = False, role: str):
    """A tokenizer from a hub id / folder, or the object itself."""
    if not isinstance(ref, str):
        if not callable(getattr(ref, "convert_tokens_to_ids", None)):
            raise ModelError(f"{role}.tokenizer is a {type(ref).__name__}, not a transformers tokenizer")
        return ref
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load the {role} tokenizer from '{ref}': not a local folder with tokenizer files and not "
            f"reachable on the hub ({_first_line(err)}); set {role}.tokenizer to a folder that has one") from None
    if tok.pad_token_id is None:
        # Padding is only used with masks, so the EOS id is a safe stand-in.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: Any, *, revision: str | None, dtype: torch.dtype | None, trust_remote_code: bool,
                   role: str) -> nn.Module:
    """A causal LM from a hub id / local folder, or an ``nn.Module`` passed in."""
    if not isinstance(ref, str):
        if not isinstance(ref, nn.Module):
            raise ModelError(f"{role}.name_or_path must be a hub id, a local folder or an nn.Module, "
                             f"not {type(ref).__name__}")
        return ref
    from transformers import AutoModelForCausalLM

    from .bitnet import is_packed_folder, load_packed, reapply_marker

    if is_packed_folder(ref):  # `potstill export --bitnet` output
        return load_packed(ref, dtype=dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load the {role} model '{ref}': not a local folder with config.json and weights, and not "
            f"reachable on the hub ({_first_line(err)}); check {role}.name_or_path") from None
    return reapply_marker(model)  # a student saved by a BitNet run gets its ternary layers back


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher never trains and never builds an autograd graph."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(cfg: TeacherConfig, *, dtype: torch.dtype | None):
    """(frozen teacher model, tokenizer). The tokenizer defaults to the model's own."""
    if cfg.quantization != "none":
        from .quantize import load_quantized_teacher

        model = load_quantized_teacher(cfg, dtype=dtype)
    else:
        model = load_causal_lm(cfg.name_or_path, revision=cfg.revision, dtype=dtype,
                               trust_remote_code=cfg.trust_remote_code, role="teacher")
    if dtype is not None and not isinstance(cfg.name_or_path, str) and cfg.quantization == "none":
        model = model.to(dtype)
    tok_ref = cfg.tokenizer if cfg.tokenizer is not None else cfg.name_or_path
    if not isinstance(tok_ref, str) and cfg.tokenizer is None:
        raise ModelError("teacher.name_or_path is an object: also give teacher.tokenizer (a tokenizer or its path)")
    tokenizer = load_tokenizer(tok_ref, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                               role="teacher")
    return freeze(model), tokenizer


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
    from .bitnet import apply_student_config

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


# ----------------------------------------------------------------------------------------
# Building students


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the transformer blocks: ``model.layers``, ``transformer.h``..."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__} "
                         "(no ModuleList with config.num_hidden_layers blocks)")
    return best


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model)[1])


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
    from .int4 import dequantized_state_dict

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
        raise ModelError(f"cannot build the student from student.config ({model_type}): {_first_line(err)}") from None


# ----------------------------------------------------------------------------------------
# Vocabulary


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
            f"({describe(student_tokenizer)}, {len(student_tokenizer)} tokens) differ: logit distillation needs the "
            "same tokenizer; use a student of the teacher's family, or train on labels alone "
            "(loss.logits.weight=0, loss.ce.weight=1)")
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
