"""Capture intermediate activations of just the mapped layers, with forward hooks.

Hidden states: layer ``i`` (1-based) is the output of decoder layer ``i``, hooked on
``decoder_layers(model)[i - 1]`` (see :mod:`potstill.features.layer_map`). The full stack's
``output_hidden_states=True`` is never asked for.

Attention relations need each mapped layer's query, key and value projections (before
rotary embeddings). They are found per family:

  llama, qwen2, mistral, gemma (and their relatives)   ``self_attn.q_proj / k_proj / v_proj``
  gpt2                                                 ``attn.c_attn`` (fused), split in three

Anything else gets a :class:`~potstill.errors.ModelError` naming what is missing.

Hooks live only inside :func:`capture` (a context manager around one forward call), so
gradient checkpointing's recomputation during backward does not fire them again; what
they keep is the forward's own tensors, with their autograd history.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..errors import ModelError
from ..models.layers import decoder_layers

# Attention-projection layouts we have read in transformers' modeling files.
SEPARATE_QKV = ("q_proj", "k_proj", "v_proj")
ATTENTION_NAMES = ("self_attn", "attn", "attention")
SUPPORTED_FAMILIES = "Llama, Qwen2, Mistral, Gemma (self_attn.q_proj/k_proj/v_proj) and GPT-2 (attn.c_attn)"


@dataclass
class Captured:
    """What one forward left: ``hidden[i]`` (B, T, H) and ``qkv[i]`` = (q, k, v), each (B, T, D)."""

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _parts: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


def model_name(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    return f"{type(model).__name__} ({model_type})"


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layers(model)[1])


def _layer(model: nn.Module, index: int) -> nn.Module:
    name, layers = decoder_layers(model)
    if not 1 <= index <= len(layers):
        raise ModelError(f"{model_name(model)} has {len(layers)} decoder layers ({name}); layer {index} "
                         "does not exist (layers count from 1)")
    return layers[index - 1]


def qkv_projections(model: nn.Module, index: int) -> tuple[str, dict[str, nn.Module]]:
    """('separate', {q, k, v}) or ('fused', {qkv}) for decoder layer ``index`` (1-based)."""
    layer = _layer(model, index)
    for attn_name in ATTENTION_NAMES:
        attn = getattr(layer, attn_name, None)
        if attn is None:
            continue
        if all(isinstance(getattr(attn, p, None), nn.Module) for p in SEPARATE_QKV):
            return "separate", {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}
        if isinstance(getattr(attn, "c_attn", None), nn.Module) and getattr(attn, "split_size", None) \
                and not getattr(attn, "is_cross_attention", False):
            return "fused", {"qkv": attn.c_attn}
    children = ", ".join(name for name, _ in layer.named_children())
    raise ModelError(
        f"attention-relation distillation needs the query/key/value projections of {model_name(model)}, but its "
        f"decoder layer {index} ({type(layer).__name__}: {children}) has neither self_attn.q_proj/k_proj/v_proj "
        f"nor attn.c_attn; supported: {SUPPORTED_FAMILIES}. Set loss.attention.weight=0 for this model")


def projection_widths(model: nn.Module, index: int) -> tuple[int, int, int]:
    """Output widths of layer ``index``'s query, key and value projections (keys and values are
    narrower than queries under grouped-query attention)."""
    kind, modules = qkv_projections(model, index)
    if kind == "fused":
        attn = next(getattr(_layer(model, index), n) for n in ATTENTION_NAMES
                    if hasattr(getattr(_layer(model, index), n, None), "c_attn"))
        return (attn.split_size,) * 3

    def width(module):
        out = getattr(module, "out_features", None)
        return int(out) if out is not None else int(module.weight.shape[0])

    return width(modules["q"]), width(modules["k"]), width(modules["v"])


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def capture(model: nn.Module, hidden_layers=(), attention_layers=()) -> Iterator[Captured]:
    """Hooks on ``model``'s mapped layers for the duration of the ``with`` block.

    ``model`` is the raw model (not a DDP wrapper); call the wrapper inside the block.
    hidden_layers / attention_layers: 1-based decoder layer numbers.
    """
    out = Captured()
    handles = []

    def keep_hidden(i):
        def hook(_module, _args, output):
            out.hidden[i] = _first(output)
        return hook

    def keep_part(i, part, fused_split=None):
        def hook(_module, _args, output):
            if fused_split is None:
                out._parts[(i, part)] = output
            else:
                q, k, v = output.split(fused_split, dim=-1)
                out._parts[(i, "q")], out._parts[(i, "k")], out._parts[(i, "v")] = q, k, v
        return hook

    try:
        for i in sorted(set(hidden_layers)):
            handles.append(_layer(model, i).register_forward_hook(keep_hidden(i)))
        for i in sorted(set(attention_layers)):
            kind, modules = qkv_projections(model, i)
            if kind == "separate":
                for part, module in modules.items():
                    handles.append(module.register_forward_hook(keep_part(i, part)))
            else:
                split = _layer(model, i)
                attn = next(getattr(split, n) for n in ATTENTION_NAMES if hasattr(getattr(split, n, None), "c_attn"))
                handles.append(modules["qkv"].register_forward_hook(keep_part(i, "qkv", attn.split_size)))
        yield out
    finally:
        for handle in handles:
            handle.remove()
    for i in sorted(set(attention_layers)):
        try:
            out.qkv[i] = (out._parts[(i, "q")], out._parts[(i, "k")], out._parts[(i, "v")])
        except KeyError:
            raise RuntimeError(f"layer {i}'s attention projections of {model_name(model)} did not run in the "
                               "forward call") from None
    missing = [i for i in hidden_layers if i not in out.hidden]
    if missing:
        raise RuntimeError(f"decoder layers {missing} of {model_name(model)} did not run in the forward call")
    out._parts.clear()
