"""Quantized teachers: int8 / int4 weights, so that a larger teacher fits.

``teacher.quantization: int8 | int4`` with ``teacher.quantization_backend``:

* ``torchao`` (``auto``): weight-only quantization after loading, with ``torchao.quantization.quantize_``:
  int8 is ``Int8WeightOnlyConfig`` (per-row scales; CPU and CUDA); int4 on CUDA is
  ``Int4WeightOnlyConfig`` (groups of 128, tinygemm tile-packed layout, bf16).
* int4 on CPU (``auto`` or ``torchao``): torchao 0.18 has no int4 weight-only kernel for x86 CPUs
  without the ``mslk`` package, so the teacher's linear layers become :class:`potstill.models.int4.Int4Linear`
  (pure PyTorch: packed 4-bit codes, float32 scale and zero point per group of 128, dequantized
  one layer at a time in the forward), in the dtype the teacher runs in.
* ``bitsandbytes``: ``load_in_8bit`` / ``load_in_4bit`` (nf4) at load time; CUDA only.

The output head is kept in its dtype, as bitsandbytes does by default: it stays a plain
linear layer, so the chunked loss path still applies, and logits keep full precision.
Only linear layers are quantized; embeddings and norms stay.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

log = logging.getLogger("potstill")

INT4_GROUP = 128


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds, looking inside tensor subclasses (torchao's qdata + scales)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if type(t).__name__ in ("Params4bit", "Int8Params"):  # bitsandbytes: the data is the packed storage
        return t.data.numel() * t.data.element_size()
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total


def target_device() -> torch.device:
    """Where the teacher will run: quantize there (int4 layouts are device specific)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_quantized_teacher(cfg, *, dtype: torch.dtype | None) -> nn.Module:
    """The teacher model of ``cfg`` (a TeacherConfig) loaded with quantized linear weights."""
    from .loading import load_causal_lm

    mode, backend = cfg.quantization, cfg.quantization_backend
    device = target_device()
    if backend == "bitsandbytes":
        return _load_bitsandbytes(cfg, mode, dtype, device)
    cpu_int4 = mode == "int4" and device.type == "cpu"
    if mode == "int4" and not cpu_int4 and dtype != torch.bfloat16:
        dtype = torch.bfloat16  # torchao's int4 weight-only kernels take bf16 only
        log.info("teacher.quantization=int4: the teacher runs in bfloat16")
    model = load_causal_lm(cfg.name_or_path, revision=cfg.revision, dtype=dtype,
                           trust_remote_code=cfg.trust_remote_code, role="teacher")
    if dtype is not None:
        model = model.to(dtype)
    if cpu_int4:
        return quantize_int4_cpu(model).to(device)
    # Layer by layer onto the device (torchao moves each module before quantizing it): the
    # device never holds the whole full-precision teacher.
    return quantize_torchao(model, mode, device=device).to(device)


def _torchao_config(mode: str, device: torch.device):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError:
        raise ModelError(f"teacher.quantization={mode} needs torchao: pip install torchao") from None
    if mode == "int8":
        return Int8WeightOnlyConfig()
    if device.type != "cuda":
        raise ModelError(f"teacher.quantization=int4 with torchao needs CUDA, not {device.type} (torchao 0.18's int4 "
                         "weight-only kernels); on CPU the teacher loader uses potstill's own int4 layers")
    return Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")


def keep_fn(model: nn.Module, mode: str):
    """``keep(module, qualified_name) -> bool``: the linear layers to quantize (never the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def keep(module: nn.Module, _fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or module is head:
            return False
        # int4 groups: layers whose input width is not a multiple of the group stay as they are.
        return mode != "int4" or module.in_features % INT4_GROUP == 0

    return keep


def count_kept(model: nn.Module, mode: str, keep) -> int:
    """How many layers ``keep`` selects; a ModelError when none."""
    n = sum(1 for name, m in model.named_modules() if keep(m, name))
    if n == 0:
        raise ModelError(f"teacher.quantization={mode}: no linear layer of {type(model).__name__} can be quantized"
                         + (f" (int4 needs input widths that are multiples of {INT4_GROUP})" if mode == "int4" else ""))
    return n


def quantize_int4_cpu(model: nn.Module) -> nn.Module:
    """int4 on CPU: potstill's pure-PyTorch :class:`~potstill.models.int4.Int4Linear` layers, in place; returns the model."""
    from .int4 import quantize_int4_

    keep = keep_fn(model, "int4")
    count_kept(model, "int4", keep)
    n = quantize_int4_(model, keep, INT4_GROUP)
    log.info("teacher: %d linear layers quantized to int4 (potstill's pure-PyTorch Int4Linear: torchao's int4 "
             "kernels need CUDA; groups of %d, dequantized per layer in the forward)", n, INT4_GROUP)
    return model


def quantize_torchao(model: nn.Module, mode: str, device: torch.device | None = None) -> nn.Module:
    """Quantize the model's linear layers in place (not the output head) with torchao; returns it.
    With ``device``, each quantized layer is moved there first (the rest stays where it is)."""
    device = device or next(model.parameters()).device
    config = _torchao_config(mode, device)
    from torchao.quantization import quantize_

    keep = keep_fn(model, mode)
    n = count_kept(model, mode, keep)
    try:
        quantize_(model, config, filter_fn=keep, device=device if device.type != "cpu" else None)
    except (ImportError, NotImplementedError, AssertionError, RuntimeError) as err:
        raise ModelError(f"teacher.quantization={mode} failed on {device.type} with torchao: "
                         f"{str(err).strip().splitlines()[0][:200]}") from None
    log.info("teacher: %d linear layers quantized to %s (torchao, weight-only)", n, mode)
    return model


def _load_bitsandbytes(cfg, mode: str, dtype: torch.dtype | None, device: torch.device) -> nn.Module:
    if device.type != "cuda":
        raise ModelError("teacher.quantization_backend=bitsandbytes needs a CUDA GPU; on CPU use the torchao backend "
                         "(teacher.quantization_backend=auto)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("teacher.quantization_backend=bitsandbytes: the package is not installed "
                         "(pip install bitsandbytes), or use teacher.quantization_backend=torchao") from None
    if not isinstance(cfg.name_or_path, str):
        raise ModelError("teacher.quantization_backend=bitsandbytes quantizes while loading: give "
                         "teacher.name_or_path as a path or hub id, or use the torchao backend for an object")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = dtype or torch.bfloat16
    qconfig: dict[str, Any] = {"load_in_8bit": True} if mode == "int8" else {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute}
    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, dtype=compute, trust_remote_code=cfg.trust_remote_code,
            quantization_config=BitsAndBytesConfig(**qconfig), device_map={"": device.index or 0})
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot load the teacher with bitsandbytes {mode}: "
                         f"{str(err).strip().splitlines()[0][:200]}") from None
