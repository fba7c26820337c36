"""Everything a command can check before it loads a model: :func:`preflight`.

A user with a 70B teacher must not wait for it to load to learn that line 18 of the data is
malformed. ``preflight(cfg, role=...)`` checks, cheapest first, each failure one
:class:`~potstill.errors.PotstillError` line:

1. config values: the settings the command needs (``role``: distill | cache-teacher | generate);
2. local model paths exist;
3. tokenizers load (they are cheap; the loaded ones are returned so nothing loads them twice);
4. model folders hold a parsable config.json and whole weight files (headers only, no weights read);
5. ``student.config`` names only settings of its model type, and the student it describes builds
   (on the meta device: no memory, no random numbers drawn);
6. data: every row of the local sources parses and has the fields its format needs (one line
   naming file and line), unless the caller tokenizes the data next, before any model loads.

It warns (one line each) where ``data.max_length`` runs past a model's context.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DistillConfig, as_config
from ..data import require_eos
from ..data.preflight import check_data as check_data_rows
from ..errors import ConfigError, ModelError, one_line
from .loading import check_model_folder, looks_local, missing_folder
from .vocab import same_tokenizer
from .students import build_student_config, complete_student_fields, student_tokenizer, student_tokenizer_ref
from .teacher_model import teacher_tokenizer

log = logging.getLogger("potstill")

ROLES = ("distill", "cache-teacher", "generate")
# Names that config classes give the longest sequence a model was trained on.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass
class Preflight:
    """What preflight loaded on the way: the tokenizer the data are tokenized with (the student's
    for distill, the teacher's otherwise) and the teacher's (None where no teacher loads)."""

    tokenizer: Any
    teacher_tokenizer: Any | None


@dataclass
class _Model:
    """A model the command will load: by path / hub id (``ref`` a str) or an object."""

    role: str  # "teacher" | "student"
    ref: Any
    trust_remote_code: bool
    config: Any = None  # config.json (dict) of a local folder, or an object's config, once known


def preflight(cfg: DistillConfig | dict | str | os.PathLike, *, role: str = "distill",
              check_data: bool = True) -> Preflight:
    """Check ``cfg`` for command ``role`` before any model loads; see the module doc.

    ``check_data=False`` skips step 6 for a caller that tokenizes the data right after, before
    loading models (:func:`potstill.training.setup.build_run`): tokenizing checks the same rows."""
    if role not in ROLES:
        raise ValueError(f"preflight role {role!r}: one of {ROLES}")
    cfg = as_config(cfg)
    check_settings(cfg, role)
    models = models_to_load(cfg, role)
    for model in models:
        check_path(model)
    teacher = next((m for m in models if m.role == "teacher"), None)
    teacher_tok = teacher_tokenizer(cfg.teacher) if teacher is not None or served_tokenizer_given(cfg) else None
    if role != "distill" and cfg.teacher.server is not None and teacher_tok is None:
        raise ModelError("teacher.server: potstill needs a local copy of the served model's tokenizer to tokenize the "
                         "data: set teacher.tokenizer (its hub id or folder)")
    if role == "distill":
        if teacher_tok is None and student_tokenizer_ref(cfg.student) is None and cfg.teacher.cache is not None:
            raise ModelError("teacher.cache loads no teacher (nor its tokenizer), so the student needs its own: set "
                             "student.tokenizer to the tokenizer the cache was captured with")
        if teacher_tok is None and student_tokenizer_ref(cfg.student) is None and cfg.teacher.server is not None:
            raise ModelError("teacher.server loads no teacher here (nor its tokenizer), so the student needs its own: "
                             "set student.tokenizer (or teacher.tokenizer) to the tokenizer the server uses")
        tok = student_tokenizer(cfg.student, student_tokenizer_ref(cfg.student), teacher_tok)
    else:
        tok = teacher_tok
    if role != "generate":
        require_eos(tok)
    for model in models:
        model.config = model_config(model)
    if role == "distill" and teacher is not None and teacher.config is not None and \
            cfg.student.from_teacher is not None and cfg.student.from_teacher.prune is not None:
        check_prune_target(teacher.config, cfg.student.from_teacher.prune)
    student_context = None
    if role == "distill" and cfg.student.config is not None:
        # Across tokenizers (its own differs from the teacher's) the student takes its own vocabulary.
        own = student_tokenizer_ref(cfg.student) is not None and teacher_tok is not None and \
            not same_tokenizer(tok, teacher_tok)
        student_context = context_of(check_student_config(cfg.student.config, teacher, tok if own else teacher_tok,
                                                          own_vocab=own))
    warn_about_context(cfg, role, models, student_context)
    if check_data:
        check_data_rows(cfg.data, tok if role != "generate" else None, seed=cfg.train.seed,
                        fields=role != "generate")
    return Preflight(tokenizer=tok, teacher_tokenizer=teacher_tok)


def check_prune_target(teacher_config: Any, prune) -> None:
    """``student.from_teacher.prune``'s target against the teacher's config (a config.json dict or a
    config object): a target the teacher cannot be pruned to is one line before any weight loads."""
    from .pruning import pruned_config

    if isinstance(teacher_config, dict):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if teacher_config.get("model_type") not in CONFIG_MAPPING:
            return  # not a type transformers knows: loading the teacher says so
        teacher_config = CONFIG_MAPPING[teacher_config["model_type"]].from_dict(teacher_config)
    pruned_config(teacher_config, prune)


def served_tokenizer_given(cfg: DistillConfig) -> bool:
    """Whether a served teacher's tokenizer is named here (teacher.tokenizer, else teacher.name_or_path)."""
    return cfg.teacher.server is not None and (cfg.teacher.tokenizer is not None or cfg.teacher.name_or_path is not None)


def check_settings(cfg: DistillConfig, role: str) -> None:
    """The settings a command cannot start without (the config itself is already validated)."""
    if role in ("cache-teacher", "generate") and cfg.teacher.name_or_path is None and cfg.teacher.server is None:
        what = "the model whose logits to capture" if role == "cache-teacher" else "the model that answers the prompts"
        raise ConfigError(f"{role} needs teacher.name_or_path: {what}")
    if role == "generate":
        if cfg.generate.output is None:
            raise ConfigError("generate.output is required: a .jsonl or .parquet file for the teacher's answers")
        if Path(cfg.generate.output).suffix not in (".jsonl", ".parquet"):
            raise ConfigError(f"generate.output={cfg.generate.output}: use a .jsonl or .parquet file name")
    if role == "distill" and cfg.student.from_teacher is not None and cfg.teacher.server is not None:
        raise ModelError("student.from_teacher (the default student) needs the teacher's weights, which a served "
                         "teacher keeps in its server: give student.name_or_path or student.config")
    if role == "distill" and cfg.student.from_teacher is not None and not loads_teacher(cfg, role):
        raise ModelError("student.from_teacher needs a teacher: set teacher.name_or_path")
    if role == "distill" and cfg.student.embeddings_from_teacher is not None and not loads_teacher(cfg, role):
        raise ModelError("student.embeddings_from_teacher needs the teacher's weights in this process: set "
                         "teacher.name_or_path (a cache or a server holds no embeddings)")
    if role == "distill" and cfg.student.lora is not None:
        from .lora import import_peft

        import_peft()  # before the data are tokenized: a missing package is one line at once
        if cfg.train.strategy == "fsdp":
            raise ConfigError("student.lora with train.strategy=fsdp is not supported yet: use ddp "
                              "(train.strategy=auto); the adapters are small enough to replicate")
    if role == "distill" and (cfg.loss.balance != "fixed" or cfg.loss.log_term_gradients) \
            and cfg.train.strategy == "fsdp":
        what = f"loss.balance={cfg.loss.balance}" if cfg.loss.balance != "fixed" else "loss.log_term_gradients"
        raise ConfigError(f"{what} is not supported with train.strategy=fsdp (per-term gradients of sharded "
                          "parameters): use ddp (train.strategy=auto) or loss.balance=fixed")
    if role == "distill" and cfg.student.spectrum is not None:
        from .freezing import read_spectrum

        read_spectrum(cfg.student.spectrum)  # a missing or malformed file is one line before anything loads


def loads_teacher(cfg: DistillConfig, role: str) -> bool:
    """Whether the command loads the teacher model (a served teacher never does, nor a distill run
    from a teacher cache)."""
    if cfg.teacher.server is not None:
        return False
    if role != "distill":
        return True
    return cfg.teacher.name_or_path is not None and cfg.teacher.cache is None


def models_to_load(cfg: DistillConfig, role: str) -> list[_Model]:
    models = []
    if loads_teacher(cfg, role):
        models.append(_Model("teacher", cfg.teacher.name_or_path, cfg.teacher.trust_remote_code))
    if role == "distill" and cfg.student.name_or_path is not None:
        models.append(_Model("student", cfg.student.name_or_path, cfg.student.trust_remote_code))
    return models


def check_path(model: _Model) -> None:
    """A model given as a local path must be a folder that exists (hub ids are left to the loader)."""
    if not isinstance(model.ref, str):
        if not isinstance(model.ref, nn.Module):
            raise ModelError(f"{model.role}.name_or_path must be a hub id, a local folder or an nn.Module, "
                             f"not {type(model.ref).__name__}")
        return
    path = Path(model.ref).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelError(f"{model.role}.name_or_path {model.ref} is a file, not a model folder: give the folder "
                         "that holds config.json and the weights")
    if looks_local(model.ref):
        raise ModelError(missing_folder(model.ref, model.role))


def model_config(model: _Model) -> Any:
    """The model's config without loading weights: a local folder's checked config.json (dict),
    an object's ``.config``; None for a hub id."""
    if not isinstance(model.ref, str):
        return getattr(model.ref, "config", None)
    path = Path(model.ref).expanduser()
    if not path.is_dir():
        return None
    return check_model_folder(path, role=model.role, trust_remote_code=model.trust_remote_code)


def config_value(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def context_of(config: Any) -> int | None:
    """The longest sequence a model config allows, where it says."""
    if config is None:
        return None
    for key in CONTEXT_KEYS:
        value = config_value(config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_student_config(fields: dict[str, Any], teacher: _Model | None, teacher_tok, *, own_vocab: bool = False) -> Any:
    """student.config: known settings of its model type, and a student that builds; returns its config.

    The model type and vocabulary size default to the teacher's, as when the student is built
    (``own_vocab``: the student has its own tokenizer, ``teacher_tok`` is then that one and gives the size)."""
    from transformers import AutoModelForCausalLM

    fields = dict(fields)
    teacher_config = teacher.config if teacher is not None else None
    model_type = fields.pop("model_type", None) or config_value(teacher_config, "model_type")
    if model_type is None:
        if teacher is None:
            raise ModelError("student.config needs a model_type (e.g. llama) when there is no teacher to copy it from")
        return None  # a hub teacher: its type is known once it loads, where the same checks run
    vocab = None if own_vocab else config_value(teacher_config, "vocab_size")
    fields = complete_student_fields(fields, model_type, vocab_size=vocab if isinstance(vocab, int) else None,
                                     tokenizer=teacher_tok)
    config = build_student_config(model_type, fields)
    # fork_rng: building on the meta device must not move the random state the real build starts from.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            AutoModelForCausalLM.from_config(config)
        except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as err:
            raise ModelError(f"cannot build the student from student.config ({model_type}): {one_line(err)}") from None
    return config


def warn_about_context(cfg: DistillConfig, role: str, models: list[_Model], student_context: int | None) -> None:
    """One warning line per model whose context is shorter than the sequences it will see."""
    contexts = {m.role: context_of(m.config) for m in models}
    if role == "distill" and cfg.student.from_teacher is not None:
        contexts["student"] = contexts.get("teacher")
    if student_context is not None:
        contexts["student"] = student_context
    if role == "generate":
        need = cfg.generate.max_prompt_length + cfg.generate.max_new_tokens
        setting = f"generate.max_prompt_length + generate.max_new_tokens = {need}"
    else:
        need, setting = cfg.data.max_length, f"data.max_length={cfg.data.max_length}"
    for context in sorted({c for c in contexts.values() if c is not None and need > c}):
        who = " and ".join(f"{role}'s" for role, c in contexts.items() if c == context)
        log.warning("%s is beyond the %s context of %d tokens: positions past it were never trained (models "
                    "with learned positions fail on them); lower it to %d or less", setting, who, context, context)
