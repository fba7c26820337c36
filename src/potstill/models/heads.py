"""Find a causal LM's output head, so the chunked loss can compute logits itself.

The chunked path (:func:`potstill.losses.chunked_distill_loss`) needs the final hidden
states (after the final norm: ``model.get_decoder()(...).last_hidden_state``) and the head
that turns them into logits. That is only exact where the model's logits are
``last_hidden_state @ W.T (+ b)``, optionally soft-capped (Gemma 2/3). Models that scale
their logits (Cohere ``logit_scale``, Granite ``logits_scaling``, Falcon-H1
``lm_head_multiplier``, ...) or that we have not read are refused: ``head_params`` returns
None and the caller uses the plain path. ``head_matches`` checks a model numerically.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# model_type -> how its *ForCausalLM turns the last hidden state into logits, read in
# transformers' modeling_<type>.py: `logits = self.lm_head(hidden_states)`, and for the
# Gemma 2/3 family then `tanh` soft-capping by `config.final_logit_softcapping`.
PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
    "gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "gpt_neox", "phi", "phi3",
    "olmo", "olmo2", "smollm3", "starcoder2",
})
# Config attributes that mean the logits are transformed after the head.
LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier_scale",
                    "mup_width_multiplier", "scale_emb", "dim_model_base")


class HeadParams(NamedTuple):
    weight: torch.Tensor           # (V, H)
    bias: Optional[torch.Tensor]   # (V,) or None
    softcap: Optional[float]       # logits = softcap * tanh(logits / softcap), or None


def head_params(model) -> Optional[HeadParams]:
    """``(weight, bias, softcap)`` of a Hugging Face causal LM's output head, or None when its
    logits are not exactly ``hidden @ weight.T (+ bias)`` (then use the plain path)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "model_type", None) not in PLAIN_HEAD_TYPES and \
            getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    if any(getattr(c, name, None) not in (None, 1, 1.0)
           for c in (config, text_config) for name in LOGIT_TRANSFORMS):
        return None
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Linear) or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 2 or not weight.is_floating_point():
        return None  # quantized (int8 / 4-bit) or wrapped heads: plain path
    if callable(getattr(head, "quantized_weight", None)):
        return None  # a BitNet (ternary) head quantizes its input too: plain path
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return HeadParams(weight, head.bias, float(softcap) if softcap else None)


@torch.no_grad()
def head_matches(model, input_ids: torch.Tensor, *, rtol: float = 1e-4, atol: float = 1e-4) -> bool:
    """True when ``head_params`` applied to ``model.get_decoder()``'s last hidden state gives
    the model's own logits on ``input_ids`` (B, T). One extra forward; for new model types."""
    params = head_params(model)
    if params is None:
        return False
    logits = model(input_ids=input_ids).logits
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    z = torch.nn.functional.linear(hidden, params.weight, params.bias)
    if params.softcap is not None:
        z = torch.tanh(z / params.softcap) * params.softcap
    return z.shape == logits.shape and torch.allclose(z.float(), logits.float(), rtol=rtol, atol=atol)
