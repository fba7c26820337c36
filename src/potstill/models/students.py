"""The student: loaded, built from a config, or cut from the teacher's layers; made trainable.

``student.bitnet`` turns its linear layers ternary (:mod:`potstill.models.bitnet`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import inspect
import logging
import re
from functools import lru_cache
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import StudentConfig
from ..errors import ModelError, one_line
from .bitnet import apply_student_config
from .int4 import dequantized_state_dict, plain_tensor
from .layers import decoder_layers, num_layers
from .loading import load_causal_lm, load_tokenizer, set_attention

log = logging.getLogger("potstill")


def load_student(cfg: StudentConfig, *, teacher: nn.Module | None, teacher_tokenizer,
                 tokenizer: Any = None, meta: bool = False, own_vocab: bool = False,
                 calibration: Callable[[int], Iterable[dict]] | None = None,
                 progress: bool = False) -> tuple[nn.Module, Any]:
    """(trainable student in float32, tokenizer) from a path/object, a config, or the teacher.

    ``tokenizer``: the student's tokenizer, already loaded (by :func:`~.preflight.preflight`);
    else it is loaded here from ``student.tokenizer``, the student's folder, or the teacher's.
    ``meta``: built on the meta device, no weights read or initialized (its shards come from the
    main process: training/sharding.py); a BitNet student is always built for real.
    ``own_vocab``: a cross-tokenizer run; a student built from ``student.config`` takes its own
    tokenizer's vocabulary size (else the teacher's).
    ``calibration``: ``n -> n batches`` of the run's train data (dicts of ``input_ids``,
    ``attention_mask``, ``labels``, each (B, T)), for ``student.from_teacher.prune``.

    Then, in this order: the attention kernel, the embeddings from the teacher, BitNet layers,
    LoRA adapters, and the frozen parts (:func:`make_trainable`)."""
    meta = meta and not cfg.bitnet
    if cfg.name_or_path is not None:
        model = load_causal_lm(cfg.name_or_path, revision=cfg.revision, dtype=torch.float32,
                               trust_remote_code=cfg.trust_remote_code, role="student", meta=meta)
        tok_ref = student_tokenizer_ref(cfg)
    elif cfg.from_teacher is not None:
        if teacher is None:
            raise ModelError("student.from_teacher needs a teacher: set teacher.name_or_path")
        model = cut_or_prune(teacher, cfg.from_teacher, meta=meta, calibration=calibration, progress=progress)
        tok_ref = cfg.tokenizer
    else:
        tok_ref = cfg.tokenizer
        if own_vocab and tokenizer is None:
            tokenizer = student_tokenizer(cfg, tok_ref, teacher_tokenizer)
        with torch.device("meta") if meta else contextlib.nullcontext():
            # Across tokenizers the student gets its own tokenizer's vocabulary, else the teacher's.
            model = student_from_config(cfg.config or {}, teacher=None if own_vocab else teacher,
                                        tokenizer=tokenizer if own_vocab else teacher_tokenizer,
                                        model_type_from=teacher)
    if tokenizer is None:
        tokenizer = student_tokenizer(cfg, tok_ref, teacher_tokenizer)
    set_attention(model, cfg.attn_implementation, "student")
    if cfg.embeddings_from_teacher is not None and not meta:  # meta: the values come from the main process
        from .teacher_embeddings import embeddings_from_teacher

        if teacher is None:
            raise ModelError("student.embeddings_from_teacher needs a teacher loaded in this process: set "
                             "teacher.name_or_path (a cache or a server holds no embeddings)")
        log.info("student embeddings: %s", embeddings_from_teacher(
            model, teacher, mode=cfg.embeddings_from_teacher.mode, freeze=False))
    model = apply_student_config(model, cfg)  # student.bitnet: ternary linear layers
    model = model.float()
    model.train()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return make_trainable(model, cfg), tokenizer


def cut_or_prune(teacher: nn.Module, rule, *, meta: bool, calibration, progress: bool) -> nn.Module:
    """``student.from_teacher``: the teacher's ``layers`` / ``every`` kept, or pruned (``prune``)."""
    if rule.prune is None:
        return student_from_teacher(teacher, select_layers(num_layers(teacher), rule.layers, rule.every), meta=meta)
    from .pruning import prune_teacher, pruned_config

    if meta:
        with torch.device("meta"):
            return type(teacher)(pruned_config(teacher.config, rule.prune))
    if calibration is None:
        raise ModelError("student.from_teacher.prune measures importance on the run's data: none were given")
    return prune_teacher(teacher, rule.prune, calibration(rule.prune.calibration_batches), progress=progress)


def make_trainable(model: nn.Module, cfg: StudentConfig) -> nn.Module:
    """Every parameter trains, except: with ``student.lora`` all but the adapters; then the
    ``student.freeze`` / ``train_only`` / ``spectrum`` patterns, and embeddings taken from the
    teacher with ``freeze``. The optimizer sees only what trains (training/setup.build_optimizer)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.lora is not None:
        from .lora import add_lora

        model = add_lora(model, cfg.lora)
    if cfg.embeddings_from_teacher is not None and cfg.embeddings_from_teacher.freeze:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            for p in module.parameters() if module is not None else ():
                p.requires_grad_(False)  # the weight, and a head's bias (copied from the teacher's too)
    if cfg.freeze or cfg.train_only or cfg.spectrum:
        from .freezing import apply_freezing

        log.info("student: %s", apply_freezing(model, freeze=cfg.freeze, train_only=cfg.train_only,
                                               spectrum=cfg.spectrum).describe())
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
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


def student_tokenizer_ref(cfg: StudentConfig) -> Any:
    """What the student's tokenizer is loaded from: student.tokenizer, else the student's own
    folder / hub id; None means the teacher's tokenizer."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    return cfg.name_or_path if isinstance(cfg.name_or_path, str) else None


def student_tokenizer(cfg: StudentConfig, tok_ref: Any, teacher_tokenizer) -> Any:
    """The student's tokenizer: loaded from ``tok_ref``, else the teacher's."""
    if tok_ref is None:
        if teacher_tokenizer is None:
            raise ModelError("the student has no tokenizer: set student.tokenizer (or give a teacher)")
        return teacher_tokenizer
    return load_tokenizer(tok_ref, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, role="student")


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


def student_from_teacher(teacher: nn.Module, layers: list[int], *, meta: bool = False) -> nn.Module:
    """A copy of the teacher with only ``layers`` kept (in that order), weights copied.

    Embeddings, final norm and output head are copied whole. Per-layer config lists
    (``layer_types`` for sliding-window models) are cut to match. ``meta``: the structure only,
    on the meta device (no weights copied).
    """
    config = cut_config(teacher.config, layers)
    if meta:
        with torch.device("meta"):
            return type(teacher)(config)
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
        value = plain_tensor(teacher_state[src])  # a torchao teacher's weights, dequantized one at a time
        new_state[key] = value.detach().clone().float()
    student.load_state_dict(new_state)
    log.info("student from teacher: kept layers %s of %d", layers, num_layers(teacher))
    return student


def cut_config(teacher_config, layers: list[int]):
    """A copy of the teacher's config with only ``layers`` (teacher indices, in order): the layer
    count and the per-layer ``layer_types`` list (sliding-window models) follow them."""
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    return config


def student_from_config(fields: dict[str, Any], *, teacher: nn.Module | None, tokenizer,
                        model_type_from: nn.Module | None = None) -> nn.Module:
    """A randomly initialized model from config fields; model_type and vocab default to the teacher's
    (``teacher`` None: the vocabulary from ``tokenizer``, the model type from ``model_type_from``)."""
    from transformers import AutoModelForCausalLM

    fields = dict(fields)
    model_type = fields.pop("model_type", None) or getattr(getattr(teacher or model_type_from, "config", None),
                                                           "model_type", None)
    if model_type is None:
        raise ModelError("student.config needs a model_type (e.g. llama) when there is no teacher to copy it from")
    fields = complete_student_fields(fields, model_type, vocab_size=(
        teacher.config.vocab_size if teacher is not None else None), tokenizer=tokenizer)
    config = build_student_config(model_type, fields)
    try:
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AssertionError) as err:
        raise ModelError(f"cannot build the student from student.config ({model_type}): {one_line(err)}") from None


def complete_student_fields(fields: dict[str, Any], model_type: str, *, vocab_size: int | None,
                            tokenizer) -> dict[str, Any]:
    """``student.config`` (without model_type) checked for unknown names, with the vocabulary size
    (the teacher's, else the tokenizer's) and special token ids (the tokenizer's) filled in."""
    check_config_fields(fields, model_type)
    fields = dict(fields)
    if "vocab_size" not in fields:
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        elif tokenizer is not None:
            fields["vocab_size"] = len(tokenizer)
    if tokenizer is not None:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            fields.setdefault(attr, getattr(tokenizer, attr, None))
    return fields


def build_student_config(model_type: str, fields: dict[str, Any]):
    """``AutoConfig.for_model(model_type, **fields)``, its validation errors as one ModelError line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # noqa: BLE001 - ValueError, TypeError, and huggingface_hub's StrictDataclassError
        if not isinstance(err, (ValueError, TypeError, KeyError, AssertionError)) and \
                "StrictDataclassError" not in {c.__name__ for c in type(err).__mro__}:
            raise
        raise ModelError(f"cannot build the student from student.config ({model_type}): {one_line(err)}") from None


# Keyword arguments every config class takes through **kwargs but that are loader options, not
# model settings: accepting them in student.config would silently do nothing.
_LOADER_KWARGS = frozenset({"cache_dir", "force_download", "proxies", "token", "local_files_only", "revision",
                            "subfolder", "trust_remote_code", "return_unused_kwargs", "gguf_file", "commit_message",
                            "repo_id", "use_auth_token", "resume_download"})


def check_config_fields(fields: dict[str, Any], model_type: str) -> None:
    """Refuse ``student.config`` names that the model type's config class does not know.

    transformers keeps unknown keyword arguments as plain attributes, so a typo
    (``hiden_size``) would build the model from the default silently."""
    known = config_field_names(model_type)
    unknown = [str(k) for k in fields if str(k) not in known]
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    hint = f"did you mean 'student.config.{close[0]}'?" if close else (
        f"the {model_type} config takes: {', '.join(sorted(k for k in known if not k.startswith('_'))[:40])}, ...")
    more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""
    raise ModelError(f"student.config.{name} is not a setting of the {model_type} model config{more}: {hint}")


@lru_cache(maxsize=16)
def config_field_names(model_type: str) -> frozenset[str]:
    """Every name a ``model_type`` config takes: its class's __init__ parameters and dataclass
    fields, attribute_map aliases, the attributes of a default instance, and the keyword arguments
    the base classes read from **kwargs (e.g. ``rope_theta``, ``torch_dtype``)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1, cutoff=0.6)
        raise ModelError(f"student.config.model_type '{model_type}' is not a model type transformers knows"
                         + (f": did you mean '{close[0]}'?" if close else ": e.g. llama, qwen2, gpt2"))
    cls = CONFIG_MAPPING[model_type]
    names: set[str] = {"model_type"}
    for klass in cls.__mro__:
        if klass is object:
            continue
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(p for p in inspect.signature(init).parameters if p not in ("self", "kwargs", "args"))
        names.update(getattr(klass, "attribute_map", {}) or {})
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names.update(re.findall(r'kwargs(?:\.pop|\.get|\.setdefault)\(\s*["\'](\w+)["\']', source))
        names.update(re.findall(r'["\'](\w+)["\'] in kwargs', source))
    if dataclasses.is_dataclass(cls):
        names.update(f.name for f in dataclasses.fields(cls))
    try:
        names.update(AutoConfig.for_model(model_type).to_dict())
    except Exception:  # noqa: BLE001 - a config class without usable defaults: the names above remain
        pass
    return frozenset(n for n in names if n not in _LOADER_KWARGS and not n.startswith("_"))
