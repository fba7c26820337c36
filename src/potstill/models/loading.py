"""Load a causal LM or a tokenizer from a hub id, a local folder, or an object the user built.

Everything goes through the real Hugging Face loaders (``AutoModelForCausalLM``,
``AutoTokenizer``), so a hub id works for users with hub access and a local folder works
everywhere. Objects built in Python are accepted as they are.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

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
            f"reachable on the hub ({first_line(err)}); set {role}.tokenizer to a folder that has one") from None
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
            f"reachable on the hub ({first_line(err)}); check {role}.name_or_path") from None
    return reapply_marker(model)  # a student saved by a BitNet run gets its ternary layers back


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher never trains and never builds an autograd graph."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
