"""Feature losses: hidden states and MiniLMv2 attention relations. Pure torch.

Conventions as in :mod:`potstill.losses.logits`: inputs are tensors and a bool ``mask``
(B, T) of the positions that count; each function returns ``(loss_sum, n_valid)``, the
per-token loss summed over valid positions and their number. Normalization (by the valid
tokens of the whole optimizer step) happens in one place, the objective. Work is float32
whatever the inputs' dtype (bf16 activations come in from autocast).

Hidden states can be preprocessed on both sides before the loss (``preprocess``): ``none``,
``layernorm`` (each token's vector, no affine), ``standardize`` ((x - mean) / std per channel)
or ``whitening`` ((x - mean) W, ZCA); the last two with the teacher's statistics at that layer
(:class:`LayerStats`, fitted by :mod:`potstill.features.preprocess`), the same map for both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

HIDDEN_LOSSES = ("mse", "nmse", "cosine")
PREPROCESS = ("none", "layernorm", "standardize", "whitening")
FITTED = ("standardize", "whitening")  # need the teacher's statistics (:class:`LayerStats`)
EPS = 1e-6


@dataclass(frozen=True)
class LayerStats:
    """The teacher's statistics at one layer, fitted once before training (float32, no gradient).

    mean (H,): per-channel mean; std (H,): per-channel ``sqrt(var + eps)`` (standardize);
    whitening (H, H): the symmetric ZCA matrix ``Sigma^{-1/2}`` (whitening). H: the teacher's width.
    """

    mean: torch.Tensor
    std: torch.Tensor | None = None
    whitening: torch.Tensor | None = None


def standardize(x: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """(x - mean) / std per channel. (..., H) float32 -> (..., H)."""
    return (x - stats.mean) / stats.std


def whiten(x: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """ZCA whitening (x - mean) W. (..., H) float32 -> (..., H)."""
    return (x - stats.mean) @ stats.whitening


def _resolve(preprocess: str | None, layer_norm: bool) -> str:
    if preprocess is None:
        return "layernorm" if layer_norm else "none"
    if preprocess not in PREPROCESS:
        raise ValueError(f"unknown hidden-state preprocess '{preprocess}': one of {', '.join(PREPROCESS)}")
    if layer_norm and preprocess != "layernorm":
        raise ValueError(f"layer_norm=True and preprocess='{preprocess}' disagree: give preprocess alone")
    return preprocess


def _prepare(student: torch.Tensor, teacher: torch.Tensor, layer_norm: bool = False, *,
             preprocess: str | None = None, stats: LayerStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides in float32, through the same map (the teacher's statistics for standardize /
    whitening: a fixed target, whatever the student does)."""
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student.shape)}, teacher "
                         f"{tuple(teacher.shape)} (project the student to the teacher's width first)")
    preprocess = _resolve(preprocess, layer_norm)
    s, t = student.float(), teacher.float()
    if preprocess == "layernorm":  # no affine parameters: compares the direction and spread of each token's vector
        s = F.layer_norm(s, s.shape[-1:])
        t = F.layer_norm(t, t.shape[-1:])
    elif preprocess in FITTED:
        if stats is None or (stats.std if preprocess == "standardize" else stats.whitening) is None:
            raise ValueError(f"preprocess='{preprocess}' needs the teacher's fitted statistics (stats=LayerStats(...))")
        fn = standardize if preprocess == "standardize" else whiten
        s, t = fn(s, stats), fn(t, stats)
    return s, t


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *, layer_norm: bool = False,
               preprocess: str | None = None, stats: LayerStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the hidden dimension of (s - t)^2, summed over valid tokens. (B, T, H) x2, (B, T)."""
    s, t = _prepare(student, teacher, layer_norm, preprocess=preprocess, stats=stats)
    per_token = (s - t).pow(2).mean(-1)
    return per_token[mask].sum(), mask.sum()


def hidden_nmse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *, layer_norm: bool = False,
                preprocess: str | None = None, stats: LayerStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized MSE per token, ``||s - t||^2 / ||t||^2``: the error relative to the teacher's
    scale, so layers whose activations are large do not dominate. (B, T, H) x2, (B, T)."""
    s, t = _prepare(student, teacher, layer_norm, preprocess=preprocess, stats=stats)
    per_token = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=EPS)
    return per_token[mask].sum(), mask.sum()


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *, layer_norm: bool = False,
                  preprocess: str | None = None, stats: LayerStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - cos(s, t)`` per token (scale invariant), summed over valid tokens. (B, T, H) x2, (B, T)."""
    s, t = _prepare(student, teacher, layer_norm, preprocess=preprocess, stats=stats)
    per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=EPS)
    return per_token[mask].sum(), mask.sum()


def hidden_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
                layer_norm: bool = False, preprocess: str | None = None,
                stats: LayerStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on ``kind`` (one of :data:`HIDDEN_LOSSES`).

    ``preprocess`` (one of :data:`PREPROCESS`; default: ``layernorm`` if ``layer_norm`` else
    ``none``) maps both sides before the loss; ``standardize`` and ``whitening`` use ``stats``,
    the teacher's statistics at this layer (student: already projected to the teacher's width)."""
    fn = {"mse": hidden_mse, "nmse": hidden_nmse, "cosine": hidden_cosine}.get(kind)
    if fn is None:
        raise ValueError(f"unknown hidden-state loss '{kind}': one of {', '.join(HIDDEN_LOSSES)}")
    return fn(student, teacher, mask, layer_norm=layer_norm, preprocess=preprocess, stats=stats)


def relation_log_probs(x: torch.Tensor, heads: int, key_mask: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
    """MiniLMv2 self-relation: (B, T, D) -> log softmax(x_h x_h^T / sqrt(D/heads)) of shape (B, heads, T, T).

    ``x`` is split into ``heads`` relation heads of D/heads columns. Keys outside ``key_mask``
    (B, T) (padding), and with ``causal`` keys after the query (a causal LM's token never
    sees them), get probability 0.
    """
    b, t, d = x.shape
    if d % heads:
        raise ValueError(f"relation heads ({heads}) must divide the projection width ({d})")
    xh = x.float().view(b, t, heads, d // heads).transpose(1, 2)          # (B, R, T, d_r)
    scores = xh @ xh.transpose(-1, -2) / (d // heads) ** 0.5               # (B, R, T, T)
    allowed = key_mask[:, None, None, :].bool()
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    # Rows with no allowed key (a padded query) are all -inf: keep the diagonal so they stay finite;
    # those rows are outside the query mask and never counted.
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=x.device)
    return scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *, heads: int,
                key_mask: torch.Tensor | None = None, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher relation || student relation) per query token, averaged over relation heads.

    student (B, T, Ds), teacher (B, T, Dt): the same projection (queries, keys or values)
    of one layer of each model; the widths may differ, ``heads`` must divide both.
    mask (B, T) bool: the query positions that count. key_mask (B, T): the attention mask.
    """
    if key_mask is None:
        key_mask = torch.ones_like(mask)
    s = relation_log_probs(student, heads, key_mask, causal=causal)
    with torch.no_grad():
        t = relation_log_probs(teacher.detach(), heads, key_mask, causal=causal)
    p = t.exp()
    # 0 * log 0 terms (masked keys) are 0, not nan.
    kl = torch.where(p > 0, p * (t - s), torch.zeros((), device=s.device)).sum(-1).mean(1)   # (B, T)
    return kl[mask].sum(), mask.sum()


def attention_relation_loss(student_qkv, teacher_qkv, mask: torch.Tensor, *, heads: int,
                            key_mask: torch.Tensor | None = None, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLMv2: the sum of the query-query, key-key and value-value relation KLs per token.

    ``student_qkv`` / ``teacher_qkv``: (queries, keys, values), each (B, T, D*) from the
    attention projections of one layer (before rotary embeddings).
    """
    total, n_valid = None, mask.sum()
    for s, t in zip(student_qkv, teacher_qkv, strict=True):
        part, _ = relation_kl(s, t, mask, heads=heads, key_mask=key_mask, causal=causal)
        total = part if total is None else total + part
    return total, n_valid
