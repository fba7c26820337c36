"""Choosing and applying numeric precision.

``auto`` picks bf16 where the hardware multiplies bf16 fast (CUDA with bf16 support; a
CPU with AMX or AVX512-BF16, where bf16 matmuls run about 4x faster than float32) and
float32 elsewhere. Student master weights and optimizer state stay float32 in every mode;
bf16/fp16 only apply inside autocast, and losses upcast to float32.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


def cpu_has_fast_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str) -> str:
    """'auto' | 'bf16' | 'fp16' | 'fp32' -> one of 'bf16', 'fp16', 'fp32'."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def accelerate_mixed_precision(precision: str) -> str:
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]


def compute_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the autocast context for ``precision`` on ``device``."""
    dtype = compute_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
