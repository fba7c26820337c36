"""``potstill export RUN --bitnet``: write the packed 1.58-bit model of a BitNet run.

The packed format itself (2-bit codes, one scale per matrix, ``bitnet.json``) is defined and
read back in :mod:`potstill.models.bitnet`; this module only writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text, publish_dir
from ..errors import ModelError
from ..models.bitnet import (FORMAT, FORMAT_VERSION, MANIFEST, BitEmbedding, bit_modules, is_packed_folder,
                             pack_ternary, ternarize)
from ..models.loading import load_causal_lm, load_tokenizer


def _student_folder(source: Path) -> tuple[Path, Path]:
    """(student model folder, default output folder) of a run directory or a model folder."""
    if (source / "student" / "config.json").is_file():
        return source / "student", source / "bitnet"
    if (source / "config.json").is_file():
        return source, source.with_name(source.name + "-bitnet")
    raise ModelError(f"potstill export: {source} is neither a run directory (with student/) nor a model folder")


def export_packed(source: str | Path, out: str | Path | None = None, *, dtype: str = "float32") -> dict[str, Any]:
    """Write the packed ternary model of a BitNet run (or its student folder); returns the manifest.

    Linear weights go to 2 bits each plus one scale per matrix. The other tensors (embeddings,
    norms, head) are stored in ``dtype``: float32 (as trained: the loaded model's outputs equal the
    training-time forward exactly) or bfloat16 (half their size; outputs then differ slightly).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ModelError(f"potstill export: --dtype must be float32 or bfloat16, not {dtype}")
    from safetensors.torch import save_file

    source = Path(source)
    student_dir, default_out = _student_folder(source)
    if is_packed_folder(student_dir):
        raise ModelError(f"potstill export: {student_dir} is already a packed BitNet folder")
    out = Path(out) if out is not None else default_out
    model = load_causal_lm(str(student_dir), revision=None, dtype=torch.float32, trust_remote_code=False,
                           role="student")
    mods = bit_modules(model)
    if not mods:
        raise ModelError(f"potstill export --bitnet: {student_dir} is not a BitNet student (no ternary layers); "
                         "train it with student.bitnet=true")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    packed_bytes = bf16_bytes = 0
    skip = set()
    for name, m in mods.items():
        t, scale = ternarize(m.weight)
        packed = pack_ternary(t)
        tensors[f"{name}.weight_packed"] = packed.contiguous()
        tensors[f"{name}.weight_scale"] = scale.detach().clone().contiguous()
        modules[name] = {"kind": "embedding" if isinstance(m, BitEmbedding) else "linear",
                         "shape": list(m.weight.shape), "scale_dtype": str(scale.dtype).removeprefix("torch.")}
        packed_bytes += packed.numel() + scale.numel() * scale.element_size()
        bf16_bytes += m.weight.numel() * 2
        skip.add(f"{name}.weight")
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        ptr = value.data_ptr()
        if ptr in seen:  # tied weights are stored once; the loader's model ties them again
            continue
        seen[ptr] = key
        tensors[key] = value.detach().to(getattr(torch, dtype)).contiguous()
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "bits_per_weight": 2,
        "layout": "row-major (out, in); code = value + 1; 4 codes per byte, first in the low bits; pad code 1",
        "modules": modules,
        "packed_weight_bytes": packed_bytes, "bf16_weight_bytes": bf16_bytes,
        "ratio_to_bf16": packed_bytes / max(bf16_bytes, 1), "other_tensors_dtype": dtype,
        "source": str(student_dir),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "potstill": FORMAT})
    model.config.save_pretrained(tmp)
    load_tokenizer(str(student_dir), role="student").save_pretrained(tmp)
    manifest["file_bytes"] = (tmp / "model.safetensors").stat().st_size
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
    publish_dir(tmp, out)
    manifest["out"] = str(out)
    return manifest
