"""BitNet b1.58 students: ternary weights, 8-bit activations, packed 2-bit export.

As in "The Era of 1-bit LLMs" (Ma et al., arXiv 2402.17764) and its training-tips note:

* weights: ``scale = mean(|W|)`` over the whole matrix (absmean), ``T = clamp(round(W / scale), -1, 1)``,
  and the forward uses ``T * scale`` (values exactly ``{-scale, 0, +scale}``);
* activations: per token (last dim) absmax to 8 bits, ``s = 127 / max|x|``,
  ``x_q = clamp(round(x * s), -128, 127) / s``;
* gradients pass straight through (STE) to the full-precision master weights and inputs.

No extra RMSNorm is inserted inside BitLinear: Llama-style blocks already normalize before
every attention/MLP input, and keeping the module's function otherwise unchanged is what lets
a pretrained student be converted in place.

The STE is the detach trick written as ``q + (w - w.detach())``: the value is *exactly* the
quantized ``q`` (adding an exact zero), which is what lets the packed model reproduce the
training-time forward bit for bit; ``w + (q - w).detach()`` would round ``q`` once more.

Packed format (``potstill export RUN --bitnet``), one folder:

* ``model.safetensors``: for each ternary module ``<name>.weight_packed`` (uint8, 4 values per
  byte, row-major over the ``(out, in)`` matrix, value ``v`` stored as ``v + 1`` in 2 bits,
  first value in the lowest bits, padded with code 1) and ``<name>.weight_scale`` (0-dim, the
  absmean scale exactly as computed in training, float32); every other tensor (embeddings, norms,
  head unless ternary) as trained;
* ``bitnet.json``: the marker and manifest (format, module shapes, sizes);
* ``config.json`` and the tokenizer files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, one_line

log = logging.getLogger("potstill")

EPS = 1e-5
CONFIG_MARKER = "potstill_bitnet"     # attribute of the model config: {"head": bool, "embeddings": bool}
MANIFEST = "bitnet.json"              # marks a packed folder
FORMAT = "potstill-bitnet-2bit"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------
# Quantizers


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, scale)`` of a weight matrix: ``T`` in {-1, 0, 1} (weight's dtype), ``scale`` 0-dim absmean."""
    w = weight.detach()
    scale = w.abs().mean().clamp(min=EPS)
    return (w / scale).round().clamp(-1, 1), scale


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """``T * scale`` in the forward, identity gradient to ``weight`` in the backward."""
    t, scale = ternarize(weight)
    q = t * scale
    return q + (weight - weight.detach()) if weight.requires_grad else q


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """(..., in) -> same shape and dtype: per-token absmax 8-bit fake quantization, STE gradient.

    The arithmetic is float32 whatever ``x``'s dtype (bf16 under autocast), then cast back.
    """
    xf = x.detach().float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    q = ((xf * s).round().clamp(-128, 127) / s).to(x.dtype)
    return q + (x - x.detach()) if x.requires_grad else q


def ternary_weight(module: nn.Module) -> torch.Tensor:
    """The ternary weight a Bit layer computes with: ``T * scale`` from a packed model's int8
    ``weight`` and ``weight_scale`` buffers, else quantized from the float master weight."""
    scale = module._buffers.get("weight_scale")
    if scale is not None:
        return module.weight.to(scale.dtype) * scale
    return quantize_weight(module.weight)


class BitLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is ternary-weight x 8-bit-activation (fake-quantized).

    Training: ``weight`` is the float master, quantized on the fly. Packed (after
    :func:`load_packed`): ``weight`` is an int8 buffer of ternary values and ``weight_scale``
    a 0-dim buffer; the forward computes exactly the same ``T * scale``.
    Being an ``nn.Linear`` subclass, module names (``q_proj``...) and forward hooks stay.
    """

    def quantized_weight(self) -> torch.Tensor:
        return ternary_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_activations(x), self.quantized_weight(), self.bias)


class BitEmbedding(nn.Embedding):
    """An ``nn.Embedding`` with ternary weights (absmean scale); outputs are not quantized."""

    def quantized_weight(self) -> torch.Tensor:
        return ternary_weight(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


BIT_MODULES = (BitLinear, BitEmbedding)


# ----------------------------------------------------------------------------------------
# Conversion


def convert_to_bitnet(model: nn.Module, include_head: bool = False, include_embeddings: bool = False) -> int:
    """Turn the model's linear layers into :class:`BitLinear`, in place; returns how many.

    Parameters, names, devices and hooks stay (the class is swapped). The output head and
    input embeddings stay full precision unless asked. The config records the choice
    (``config.potstill_bitnet``) so that ``save_pretrained`` + loading re-applies it.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    count = 0
    for name, module in model.named_modules():
        if module is head and not include_head:
            if type(module) is BitLinear and "weight_scale" not in module._buffers:
                module.__class__ = nn.Linear  # asked for a full-precision head: undo an earlier choice
            continue
        if module is emb:
            if type(module) is BitEmbedding and not include_embeddings and "weight_scale" not in module._buffers:
                module.__class__ = nn.Embedding
            if include_embeddings:
                if type(module) is not nn.Embedding:
                    raise ModelError(f"student.bitnet_embeddings: {name} is a {type(module).__name__}, not a plain "
                                     "nn.Embedding; ternary embeddings are only supported for plain ones")
                module.__class__ = BitEmbedding
                count += 1
            continue
        if type(module) is nn.Linear:
            module.__class__ = BitLinear
            count += 1
    if count == 0 and not any(isinstance(m, BIT_MODULES) for m in model.modules()):
        raise ModelError(f"student.bitnet: {type(model).__name__} has no nn.Linear layers to make ternary")
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_MARKER, {"head": bool(include_head), "embeddings": bool(include_embeddings)})
    return count


def bit_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BIT_MODULES)}


def is_packed_model(model: nn.Module) -> bool:
    return any("weight_scale" in m._buffers for m in bit_modules(model).values())


def reapply_marker(model: nn.Module) -> nn.Module:
    """Re-create BitLinear layers in a model loaded from a folder that a BitNet run saved."""
    spec = getattr(getattr(model, "config", None), CONFIG_MARKER, None)
    if isinstance(spec, dict):
        convert_to_bitnet(model, include_head=bool(spec.get("head")), include_embeddings=bool(spec.get("embeddings")))
    return model


def apply_student_config(model: nn.Module, cfg) -> nn.Module:
    """The student hook: ``student.bitnet`` converts; a student saved by a BitNet run stays ternary."""
    if is_packed_model(model):
        raise ModelError("the student is a packed BitNet export (no full-precision weights to train): start from "
                         "the run's student/ folder instead")
    if cfg.bitnet:
        n = convert_to_bitnet(model, include_head=cfg.bitnet_head, include_embeddings=cfg.bitnet_embeddings)
        log.info("student.bitnet: %d layers ternary (head %s, embeddings %s)", n,
                 "ternary" if cfg.bitnet_head else "full precision",
                 "ternary" if cfg.bitnet_embeddings else "full precision")
    else:
        reapply_marker(model)  # e.g. from_teacher of a BitNet teacher: its config carries the marker
        if bit_modules(model):
            log.info("the student was saved by a BitNet run: its layers stay ternary")
    return model


# ----------------------------------------------------------------------------------------
# 2-bit packing


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Any-shape tensor of {-1, 0, 1} -> uint8 (ceil(numel / 4),), 4 values per byte, low bits first."""
    codes = (t.detach().reshape(-1).to(torch.int16) + 1).to(torch.uint8)
    if codes.numel() and (codes.max() > 2):
        raise ValueError("pack_ternary: values must be -1, 0 or 1")
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, torch.ones(pad, dtype=torch.uint8, device=codes.device)])
    c = codes.view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: uint8 (ceil(n / 4),) -> int8 tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= int(d)
    p = packed.reshape(-1, 1)
    codes = torch.cat([(p >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)[:n]
    return (codes.to(torch.int8) - 1).reshape(tuple(shape))


# ----------------------------------------------------------------------------------------
# Export and load


def is_packed_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _packed_shapes(folder: Path, manifest: dict) -> dict[str, tuple[int, ...]]:
    """``bitnet.json``'s module -> weight shape, or one line saying how it is damaged."""
    modules = manifest.get("modules")
    shapes = {}
    if isinstance(modules, dict):
        for name, spec in modules.items():
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
                break
            shapes[name] = tuple(shape)
        else:
            return shapes
    raise ModelError(f"{folder / MANIFEST} is damaged (its modules and their shapes are missing or malformed): "
                     "export the model again")


def load_packed(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model from a packed folder. Its forward equals the training-time quantized forward
    exactly (same ternary values, same scales, same arithmetic); weights stay int8 in memory."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {folder / MANIFEST}: {one_line(err)}") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{folder / MANIFEST} is damaged (not a JSON object): export the model again")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ModelError(f"{folder}: unknown packed format {manifest.get('format')} v{manifest.get('version')} "
                         f"(this potstill reads {FORMAT} v{FORMAT_VERSION})")
    config = AutoConfig.from_pretrained(folder)
    spec = getattr(config, CONFIG_MARKER, None) or {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    convert_to_bitnet(model, include_head=bool(spec.get("head")), include_embeddings=bool(spec.get("embeddings")))
    mods = bit_modules(model)
    shapes = _packed_shapes(folder, manifest)
    if set(mods) != set(shapes):
        raise ModelError(f"{folder}: the packed modules do not match the model built from its config.json")
    try:
        state = load_file(str(folder / "model.safetensors"))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: a damaged or missing file
        raise ModelError(f"{folder / 'model.safetensors'} cannot be read ({one_line(err)}): export "
                         "the model again") from None
    for name, m in mods.items():
        shape = shapes[name]
        try:
            packed, scale = state.pop(f"{name}.weight_packed"), state.pop(f"{name}.weight_scale")
        except KeyError:
            raise ModelError(f"{folder}: model.safetensors lacks the packed weight of {name}") from None
        fits = packed.dtype == torch.uint8 and packed.numel() == -(-math.prod(shape) // 4)
        if shape != tuple(m.weight.shape) or not fits:
            raise ModelError(f"{folder}: the packed weight of {name} does not fit its shape {list(shape)} in "
                             f"{MANIFEST} and config.json: export the model again")
        del m.weight  # the float master is gone: the ternary values take its place
        m.register_buffer("weight", unpack_ternary(packed, shape))
        m.register_buffer("weight_scale", scale)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    # Allowed to be missing: the ternary buffers set above, and tied copies of a loaded tensor.
    real_missing = [k for k in missing if k.rsplit(".", 1)[0] not in mods
                    and not (k in params and id(params[k]) in loaded)]
    if real_missing or unexpected:
        raise ModelError(f"{folder}: model.safetensors does not match its config.json "
                         f"(missing {real_missing[:3]}, unexpected {list(unexpected)[:3]})")
    if dtype is not None:
        model = model.to(dtype)  # floating tensors only: the int8 ternary buffers stay
    model.eval()
    return model
