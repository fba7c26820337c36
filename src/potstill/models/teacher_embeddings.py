"""``student.embeddings_from_teacher``: the student's input embeddings and output head from the teacher's.

Why: a randomly initialized student spends its first steps learning what every token is; the
teacher's embeddings already say it, in a space its output head reads. Starting the student
there (and optionally keeping it fixed) gives it the teacher's token geometry and a head whose
logits already rank tokens like the teacher's, for the price of one matrix copy.

Method. The teacher's input embeddings ``E_t`` and head ``W_t`` are (V, H_t), the student's (V, H_s);
the rows are tokens, so both models must share the vocabulary (the teacher's tokenizer).

* ``copy`` (H_s == H_t): ``E_s = E_t``, ``W_s = W_t``.
* ``project`` (H_s <= H_t): PCA. ``P`` (H_t, H_s) holds the top H_s right singular vectors of the
  centered embeddings ``E_t - mean`` (the directions along which the tokens differ most), computed
  in float64 as the eigenvectors of the (H_t, H_t) Gram matrix ``(E_t - mean)^T (E_t - mean)``
  (the same vectors as ``torch.linalg.svd``'s, without its (V, H_t) left factor: a 150k x 4096
  vocabulary would need two 5 GB float64 matrices). Then ``E_s = (E_t - mean) P + mean P = E_t P``
  and ``W_s = W_t P``, so a student hidden state ``h_s`` standing for ``h_t ~= P h_s`` gives the
  logits ``h_s (W_t P)^T = (P h_s)^T W_t^T ~= h_t W_t^T``: the teacher's, exactly where ``h_t``
  and the head rows lie in the kept subspace. A student wider than the teacher is refused: a
  projection cannot add directions.

A student that ties its head to its input embeddings gets only the input embeddings (from the
teacher's input embeddings): they are its head too. A head bias is copied when both have one.
The teacher may be quantized: potstill's int4 layer and torchao weights are dequantized first.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from .int4 import Int4Linear, plain_tensor

SETTING = "student.embeddings_from_teacher"
ROWS_PER_CHUNK = 8192  # bounds the float64 temporaries of `project` to ROWS_PER_CHUNK x H_t


@torch.no_grad()
def embeddings_from_teacher(student: nn.Module, teacher: nn.Module, *, mode: str, freeze: bool) -> str:
    """Set the student's input embeddings and output head from the teacher's, in place (see the
    module doc); ``freeze`` turns their ``requires_grad`` off. Returns one line for the log.
    One-line ModelErrors: an unknown mode, different vocabularies, widths the mode cannot map."""
    if mode not in ("copy", "project"):
        raise ModelError(f"{SETTING}.mode {mode!r} is not a mode: use copy (equal widths) or project (PCA)")
    s_embed = student.get_input_embeddings().weight
    s_head = student.get_output_embeddings()
    tied = s_head is None or s_head.weight is s_embed
    t_embed = dense_weight(teacher.get_input_embeddings())
    pairs = [(t_embed, s_embed)]  # (teacher (V, H_t), student (V, H_s))
    if not tied:
        pairs.append((dense_weight(_teacher_head(teacher)), s_head.weight))
    for t, s in pairs:
        _check_shapes(t, s, mode)
    if mode == "copy":
        for t, s in pairs:
            s.copy_(t)
        how = f"copied (V={s_embed.shape[0]}, H={s_embed.shape[1]})"
    else:
        basis, kept = pca_basis(t_embed, s_embed.shape[1])
        for t, s in pairs:
            project_rows_(s, t, basis)
        how = (f"projected from width {t_embed.shape[1]} to {s_embed.shape[1]} on the teacher embeddings' "
               f"top principal directions (PCA, {kept:.1%} of their variance)")
    params = [s for _, s in pairs] + _copy_head_bias(s_head, teacher.get_output_embeddings())
    if freeze:
        for p in params:
            p.requires_grad_(False)
    what = ("input embeddings (the student ties its head to them: the teacher's head is not used)" if tied
            else "input embeddings and output head")
    extras = ("; head bias copied" if len(params) > len(pairs) else "") + ("; frozen" if freeze else "")
    return f"embeddings from teacher: {what} {how}{extras}"


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A teacher layer's (rows, H_t) weight as a plain tensor in its own dtype, dequantized when the
    layer is quantized (potstill's CPU :class:`Int4Linear`, or a torchao tensor subclass)."""
    if isinstance(module, Int4Linear):
        return module.dequantize(torch.float32)
    return plain_tensor(module.weight.detach())


def pca_basis(embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """``(P, kept)`` for (V, H) ``embeddings``: P (H, k) float64 with orthonormal columns, the top k
    principal directions of the rows (right singular vectors of the centered matrix, largest
    first), and the share of the centered variance they keep (1.0 when the rows span <= k directions)."""
    mean = embeddings.mean(0, dtype=torch.float64)  # (H,)
    gram = embeddings.new_zeros(embeddings.shape[1], embeddings.shape[1], dtype=torch.float64)  # (H, H)
    for chunk in embeddings.split(ROWS_PER_CHUNK):
        centered = chunk.double() - mean
        gram += centered.T @ centered
    variances, vectors = torch.linalg.eigh(gram)  # ascending
    total = float(variances.clamp_min(0).sum())
    kept = float(variances[-k:].clamp_min(0).sum()) / total if total > 0 else 1.0
    return vectors[:, -k:].flip(-1), kept


def project_rows_(dst: torch.Tensor, src: torch.Tensor, basis: torch.Tensor) -> None:
    """``dst`` (V, k) = ``src`` (V, H) @ ``basis`` (H, k), in float64 by chunks of rows, cast to dst's dtype."""
    for start, chunk in zip(range(0, src.shape[0], ROWS_PER_CHUNK), src.split(ROWS_PER_CHUNK)):
        dst[start:start + chunk.shape[0]].copy_(chunk.double() @ basis)


def _teacher_head(teacher: nn.Module) -> nn.Module:
    head = teacher.get_output_embeddings()
    if head is None:
        raise ModelError(f"{SETTING}: the teacher has no output head to initialize the student's from: "
                         "remove embeddings_from_teacher or give a causal LM teacher")
    return head


def _check_shapes(t: torch.Tensor, s: torch.Tensor, mode: str) -> None:
    """Same rows (tokens); widths the mode can map. One-line ModelErrors."""
    (v_t, h_t), (v_s, h_s) = t.shape, s.shape
    if v_t != v_s:
        raise ModelError(f"{SETTING}: the teacher's and student's vocabularies differ ({v_t} vs {v_s} rows): "
                         "embeddings_from_teacher needs the teacher's tokenizer")
    if mode == "copy" and h_s != h_t:
        raise ModelError(f"{SETTING}: mode copy needs equal widths, but the teacher's is {h_t} and the "
                         f"student's {h_s}: use mode: project")
    if mode == "project" and h_s > h_t:
        raise ModelError(f"{SETTING}: mode project cannot widen {h_t} to {h_s} (a projection cannot add "
                         "directions): use mode: copy with equal widths, or a student no wider than the teacher")


def _copy_head_bias(s_head: nn.Module | None, t_head: nn.Module | None) -> list[torch.Tensor]:
    """Copy the teacher's head bias (V,) into the student's when both have one; returns [the student's bias] or []."""
    s_bias, t_bias = getattr(s_head, "bias", None), getattr(t_head, "bias", None)
    if s_bias is None or t_bias is None:
        return []
    s_bias.copy_(t_bias.detach())
    return [s_bias]
