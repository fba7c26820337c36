"""Final hidden states without full logits, for the chunked loss path.

The chunked path computes logits itself, a chunk of tokens at a time, so the models must
not materialize ``B x T x V`` logits first. We call the model's own forward (so a
DistributedDataParallel wrapper still sees the call and syncs gradients) with
``logits_to_keep=1`` (the head then works on one position only), and capture the output
of its decoder, which is exactly what the head consumes (after the final norm), with a
forward hook.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .heads import HeadParams, head_params


def supports_chunked(model: nn.Module) -> tuple[HeadParams | None, str]:
    """(head params, '') when the chunked path reproduces ``model``'s logits, else (None, why)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "logits_to_keep" not in params:
        return None, f"{type(model).__name__}.forward has no logits_to_keep argument"
    if not callable(getattr(model, "get_decoder", None)):
        return None, f"{type(model).__name__} has no get_decoder()"
    head = head_params(model)
    if head is None:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        return None, f"the output head of {type(model).__name__} ({model_type}) is not a plain linear layer we know"
    return head, ""


def forward_hidden(model: nn.Module, raw_model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, H) final hidden states of ``raw_model``, computed through ``model`` (its wrapper)."""
    captured: list[torch.Tensor] = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = raw_model.get_decoder().register_forward_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call in {type(raw_model).__name__}.forward, saw {len(captured)}")
    return captured[0]
