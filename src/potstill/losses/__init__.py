"""Pure-torch distillation losses. See :mod:`potstill.losses.logits` for conventions.

logits.py (dense divergences; sinkhorn.py the batch-wise Sinkhorn distance), chunked.py and fused_logits.py (the same without B x T x V
float32 copies), sparse.py and sparse_chunked.py (a top-k / sampled teacher), aligned.py (a
teacher with another tokenizer: mapped-vocabulary KL and ULD), features.py (hidden states,
attention relations)."""

from potstill.losses.chunked import ChunkedLossOutput, choose_chunk_size, chunked_distill_loss
from potstill.losses.logits import (
    DIVERGENCES,
    adaptive_kl,
    cakld_divergence,
    cosine_divergence,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    hinge_ranking,
    logistic_ranking,
    logit_divergence,
    logsum_divergence,
    logit_mse,
    per_token_divergence,
    reverse_kl,
    skew_forward_kl,
    sinkhorn_distance,
    skew_reverse_kl,
    soft_cross_entropy,
    soft_mse,
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
    "adaptive_kl",
    "cakld_divergence",
    "cosine_divergence",
    "hinge_ranking",
    "logistic_ranking",
    "logsum_divergence",
    "sinkhorn_distance",
    "soft_cross_entropy",
    "soft_mse",
]

from potstill.losses.features import (  # noqa: E402
    HIDDEN_LOSSES,
    attention_relation_loss,
    hidden_cosine,
    hidden_loss,
    hidden_mse,
    hidden_nmse,
    relation_kl,
)

__all__ += ["HIDDEN_LOSSES", "attention_relation_loss", "hidden_cosine", "hidden_loss", "hidden_mse",
            "hidden_nmse", "relation_kl"]
