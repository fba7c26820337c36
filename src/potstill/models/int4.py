"""A pure-PyTorch int4 weight-only linear layer: the CPU path of ``teacher.quantization: int4``.

torchao 0.18's int4 weight-only kernels do not run on an x86 CPU without the ``mslk`` package
(its tile-packed layout needs CUDA), so on CPU :func:`potstill.models.quantize.load_quantized_teacher`
uses this instead. It stores each kept ``nn.Linear`` weight (out, in) as

* ``qweight``: uint8 (out, in / 2), two 4-bit codes per byte (low nibble = even column);
* ``scale`` and ``zero``: float32 (out, in / group), asymmetric per-group affine parameters,
  groups of ``group_size`` (128, ``quantize.INT4_GROUP``) consecutive input columns:
  ``w ~= code * scale + zero`` with ``code`` in 0..15, ``zero`` = the group minimum,
  ``scale`` = (max - min) / 15.

float32 rather than bf16 scales: the dequantized weight is then within half a quantization step
of the original (plus one rounding to the compute dtype), whereas bf16 scales would add up to
15 * 2^-9 ~= 3% of a step per weight; they cost 8 bytes per 128 weights (1/16 byte per weight,
next to the 1/2 byte of the codes), so a quantized layer is ~0.28x its bf16 size instead of ~0.27x.

There is no int4 matmul kernel here: ``forward`` dequantizes the layer's weight to the input's
dtype and calls ``F.linear``, so one layer's full-precision weight (and its unpacked codes) is
alive at a time, during that layer's forward only. Memory at rest is what shrinks; compute is
that of the unquantized layer plus the dequantization.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 15  # 4-bit codes 0..15


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 codes in 0..15 -> (..., ceil(n / 2)) uint8: code 2j in the low nibble of byte j,
    code 2j+1 in its high nibble (an odd n is padded with a zero code)."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(..., m) uint8 -> (..., n) uint8 codes, n <= 2m: the inverse of :func:`pack_int4`."""
    both = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # (..., m, 2)
    return both.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :n]


def quantize_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) weight, in % group_size == 0 -> (codes uint8 (out, in), scale fp32 (out, G), zero fp32 (out, G)),
    G = in / group_size. Asymmetric min/max per group, round to nearest: |w - (code*scale + zero)| <= scale / 2."""
    out_f, in_f = weight.shape
    g = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = (hi - lo) / LEVELS
    # A constant group has scale 0: every code is 0 and dequantizes to the constant exactly.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - lo[..., None]) / safe[..., None]).clamp_(0, LEVELS).to(torch.uint8)
    return codes.reshape(out_f, in_f), scale, lo


class Int4Linear(nn.Module):
    """A frozen ``nn.Linear`` with int4 weights (packed, per-group scale and zero point); see the module doc.

    Input (..., in_features) -> output (..., out_features), in the input's dtype. The bias is kept
    as it was (a parameter in its own dtype, cast to the input's dtype in the forward).
    """

    def __init__(self, in_features: int, out_features: int, *, group_size: int, bias: bool = False,
                 device: torch.device | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        """The int4 version of ``linear`` (on its device); ``linear`` itself is left untouched."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, group_size=group_size, bias=linear.bias is not None,
                device=w.device, bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        codes, scale, zero = quantize_groups(w, group_size)
        q.qweight.copy_(pack_int4(codes))
        q.scale.copy_(scale)
        q.zero.copy_(zero)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in ``dtype``: code * scale + zero, computed in float32, rounded once."""
        codes = unpack_int4(self.qweight, self.in_features)
        g = codes.reshape(self.out_features, -1, self.group_size).float()
        w = g * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The full weight of this one layer exists only for this call.
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


def quantize_int4_(model: nn.Module, keep: Callable[[nn.Module, str], bool], group_size: int,
                   device: torch.device | None = None) -> int:
    """Replace, in place, every ``nn.Linear`` of ``model`` for which ``keep(module, qualified_name)`` is true
    with an :class:`Int4Linear` (on ``device`` when given); returns how many were replaced.
    Layer by layer: each full-precision weight is dropped as soon as its layer is quantized."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and keep(m, name)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if device is not None:
            linear = linear.to(device)
        setattr(parent, child, Int4Linear.from_linear(linear, group_size))
    return len(targets)


def plain_tensor(value: torch.Tensor) -> torch.Tensor:
    """``value`` as a plain tensor: a quantized tensor subclass (torchao's int8 / int4 weights) dequantized."""
    if type(value) not in (torch.Tensor, nn.Parameter) and hasattr(value, "dequantize"):
        return value.dequantize()
    return value


def dequantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each :class:`Int4Linear`'s ``qweight`` / ``scale`` / ``zero`` replaced by its
    dequantized float32 ``weight``: the keys of the unquantized model (for a student copied or pruned from the
    teacher). torchao's quantized tensors stay as they are: :func:`plain_tensor` dequantizes those a caller uses."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            prefix = f"{name}." if name else ""
            for key in ("qweight", "scale", "zero"):
                state.pop(prefix + key, None)
            state[prefix + "weight"] = m.dequantize(torch.float32)
    return state
