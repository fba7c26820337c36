"""Feature losses: hidden states and MiniLMv2 attention relations. Pure torch.

Conventions as in :mod:`potstill.losses.logits`: inputs are tensors and a bool ``mask``
(B, T) of the positions that count; each function returns ``(loss_sum, n_valid)``, the
per-token loss summed over valid positions and their number. Normalization (by the valid
tokens of the whole optimizer step) happens in one place, the objective. Work is float32
whatever the inputs' dtype (bf16 activations come in from autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HIDDEN_LOSSES = ("mse", "nmse", "cosine")
EPS = 1e-6


def _prepare(student: torch.Tensor, teacher: torch.Tensor, layer_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student.shape)}, teacher "
                         f"{tuple(teacher.shape)} (project the student to the teacher's width first)")
    s, t = student.float(), teacher.float()
    if layer_norm:  # no affine parameters: compares the direction and spread of each token's vector
        s = F.layer_norm(s, s.shape[-1:])
        t = F.layer_norm(t, t.shape[-1:])
    return s, t


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
               layer_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the hidden dimension of (s - t)^2, summed over valid tokens. (B, T, H) x2, (B, T)."""
    s, t = _prepare(student, teacher, layer_norm)
    per_token = (s - t).pow(2).mean(-1)
    return per_token[mask].sum(), mask.sum()


def hidden_nmse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
                layer_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized MSE per token, ``||s - t||^2 / ||t||^2``: the error relative to the teacher's
    scale, so layers whose activations are large do not dominate. (B, T, H) x2, (B, T)."""
    s, t = _prepare(student, teacher, layer_norm)
    per_token = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=EPS)
    return per_token[mask].sum(), mask.sum()


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
                  layer_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - cos(s, t)`` per token (scale invariant), summed over valid tokens. (B, T, H) x2, (B, T)."""
    s, t = _prepare(student, teacher, layer_norm)
    per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=EPS)
    return per_token[mask].sum(), mask.sum()


def hidden_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
                layer_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on ``kind`` (one of :data:`HIDDEN_LOSSES`)."""
    fn = {"mse": hidden_mse, "nmse": hidden_nmse, "cosine": hidden_cosine}.get(kind)
    if fn is None:
        raise ValueError(f"unknown hidden-state loss '{kind}': one of {', '.join(HIDDEN_LOSSES)}")
    return fn(student, teacher, mask, layer_norm=layer_norm)


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
