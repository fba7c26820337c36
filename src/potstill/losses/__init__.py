"""Pure-torch distillation losses. See :mod:`potstill.losses.logits` for conventions."""

from potstill.losses.chunked import ChunkedLossOutput, choose_chunk_size, chunked_distill_loss
from potstill.losses.logits import (
    DIVERGENCES,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    logit_divergence,
    logit_mse,
    per_token_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

__all__ = [
    "ChunkedLossOutput",
    "choose_chunk_size",
    "chunked_distill_loss",
    "DIVERGENCES",
    "cross_entropy",
    "forward_kl",
    "generalized_jsd",
    "logit_divergence",
    "logit_mse",
    "per_token_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
]
