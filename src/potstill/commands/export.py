"""``potstill export RUN --bitnet``: write the packed 1.58-bit model of a BitNet run.

The packed format itself (2-bit codes, one scale per matrix, ``bitnet.json``) is defined and
read back in :mod:`potstill.models.bitnet`; this module only writes it.

The output folder is potstill's own: it is written under a temporary name beside ``--out``,
marked as an export (:mod:`potstill.ownership`), and only then renamed into place. An existing
``--out`` is replaced only when it is an earlier export holding nothing but an export's files;
``--out`` may not be, contain, or lie inside the student folder it reads (nor be or contain the
run directory), so an export never deletes or writes into its own input. All of this is checked
before the model is loaded; a full disk or read-only folder later is one line, and the
temporary folder is removed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text, disk_errors, publish_dir
from ..errors import ModelError, RunDirError
from ..ownership import MARK_FILE, check_writable, is_within, mark_owned, owner_kind, read_json_object
from ..models.bitnet import (FORMAT, FORMAT_VERSION, MANIFEST, BitEmbedding, bit_modules, is_packed_folder,
                             pack_ternary, ternarize)
from ..models.loading import load_causal_lm, load_tokenizer


def _student_folder(source: Path) -> tuple[Path, Path]:
    """(student model folder, default output folder) of a run directory or a model folder."""
    if (source / "student" / "config.json").is_file():
        return source / "student", source / "bitnet"
    if (source / "config.json").is_file():
        named = source if source.name else source.resolve()  # "." has no name to put "-bitnet" after
        return source, named.with_name(named.name + "-bitnet")
    raise ModelError(f"potstill export: {source} is neither a run directory (with student/) nor a model folder")


def export_packed(source: str | Path, out: str | Path | None = None, *, dtype: str = "float32") -> dict[str, Any]:
    """Write the packed ternary model of a BitNet run (or its student folder); returns the manifest.

    Linear weights go to 2 bits each plus one scale per matrix. The other tensors (embeddings,
    norms, head) are stored in ``dtype``: float32 (as trained: the loaded model's outputs equal the
    training-time forward exactly) or bfloat16 (half their size; outputs then differ slightly).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ModelError(f"potstill export: --dtype must be float32 or bfloat16, not {dtype}")
    source = Path(source)
    student_dir, default_out = _student_folder(source)
    if is_packed_folder(student_dir):
        raise ModelError(f"potstill export: {student_dir} is already a packed BitNet folder")
    out = Path(out) if out is not None else default_out
    _check_out(out, source, student_dir)
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
    tokenizer = load_tokenizer(str(student_dir), role="student")
    _write(out, manifest, tensors=tensors, config=model.config, tokenizer=tokenizer)
    manifest["out"] = str(out)
    return manifest


# ----------------------------------------------------------------------------------------
# The output folder


def _check_out(out: Path, source: Path, student_dir: Path) -> None:
    """Refuse, before any work, an output folder the export must not write: a file, the export's
    own input (or a folder around it), a place inside the input, or a folder that is not an export."""
    where = f"potstill export: --out {out}"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{where} is a file, not a folder: choose another --out")
    if source != student_dir and is_within(source, out):
        raise RunDirError(f"{where} is or contains the run directory {source} that it exports: writing there "
                          "would replace the run; choose another --out")
    if is_within(student_dir, out):
        raise RunDirError(f"{where} is or contains the student folder {student_dir} that it exports: writing "
                          "there would replace the input; choose another --out")
    if is_within(out, student_dir):
        raise RunDirError(f"{where} lies inside the student folder {student_dir} that it exports: choose an --out "
                          "outside it")
    if source != student_dir and is_within(out, source) and out.resolve().parent != source.resolve():
        raise RunDirError(f"{where} lies inside the run directory {source}, below its own files: put the export "
                          f"beside them ({source / 'bitnet'}) or outside the run")
    # The temporary folder goes beside an existing out: its parent must be writable then.
    check_writable(out.parent if out.is_dir() else out, "--out")
    if out.is_dir():
        _check_replaceable(out)


def _check_replaceable(out: Path, written: set[str] | None = None) -> None:
    """An existing ``out`` may be replaced only when it is empty, or an earlier export (marked, or
    with the packed manifest of an export made before the mark existed) that holds nothing but
    the files this export writes (``written``, once known): nothing of the user's is lost."""
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    kind = owner_kind(out)
    if kind != "export" and not (kind is None and _is_unmarked_export(out)):
        why = f"holds a potstill {kind}" if kind else "was not written by potstill export"
        raise RunDirError(f"potstill export: --out {out} already exists and {why}: potstill replaces only its own "
                          "exports; choose another --out or move the folder away yourself")
    foreign = sorted(entries - (written or entries) - {MARK_FILE})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunDirError(f"potstill export: --out {out} is an earlier export but also holds {shown}, which "
                          "potstill export did not write: move them away or choose another --out")


def _is_unmarked_export(folder: Path) -> bool:
    """A packed folder written by a potstill from before exports carried the ownership mark."""
    return (read_json_object(folder / MANIFEST) or {}).get("format") == FORMAT


def _write(out: Path, manifest: dict[str, Any], *, tensors: dict[str, torch.Tensor], config, tokenizer) -> None:
    """Write the packed folder under a temporary name beside ``out``, mark it, then rename it into place.

    A full disk, a read-only folder or an interrupt leaves no temporary folder behind, and ``out``
    as it was."""
    from safetensors.torch import save_file  # its I/O errors ("os error 28") are read by disk_errors

    tmp: Path | None = None
    try:
        with disk_errors(f"potstill export: writing {out}", advice="free space or choose another --out",
                         where=out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
            mark_owned(tmp, "export")
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "potstill": FORMAT})
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            manifest["file_bytes"] = (tmp / "model.safetensors").stat().st_size
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
            if out.is_dir():  # checked before the work too; the folder may have changed since
                _check_replaceable(out, written={p.name for p in tmp.iterdir()})
            publish_dir(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
