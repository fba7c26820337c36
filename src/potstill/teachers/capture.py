"""``potstill cache-teacher``: run the teacher once over the tokenized train data, store its signal.

    cache_teacher("run.yaml", overrides=["cache.dir=runs/cache", "cache.k=12"])

The data are built exactly as ``potstill distill`` builds them (same config section, the
teacher's tokenizer), so the cache is keyed by example index of the same tokenized train
dataset (same fingerprint) and any batch order reads it. Shards are written one after
another; a capture that is stopped continues from the last complete shard, and since every
shard depends only on its own examples (and, for sampling, on a seed derived from its
index) the files come out byte-identical to an uninterrupted capture.

The folder is potstill's own: it is marked as a cache when created, a capture refuses a
``cache.dir`` that holds anything else (or overlaps the teacher, the tokenizer or the data,
checked before any work), and ``cache.overwrite`` deletes only the files an earlier capture
wrote there, after the teacher and the data were loaded. A full disk or a read-only folder
ends the capture with one line; what was complete stays, and the next run continues from it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import disk_errors
from ..config import DistillConfig, as_config
from ..data import build_datasets, collate
from ..errors import ConfigError
from ..models.precision import autocast_context, compute_dtype, resolve_precision
from ..models.preflight import preflight
from ..models.teacher_model import load_teacher, teacher_dtype
from ..models.vocab import output_rows
from ..ownership import check_writable, input_paths, is_within, mark_owned, owner_kind
from ..stopping import StopRequest
from . import cache_format as fmt
from .cache_format import CacheError
from .cached import tokenizer_sha256

log = logging.getLogger("potstill")


def model_name(ref: Any) -> str:
    return str(ref) if isinstance(ref, (str, Path)) else f"<object {type(ref).__qualname__}>"


@torch.no_grad()
def teacher_rows(logits: torch.Tensor, labels: torch.Tensor, *, kind: str, k: int, temperature: float,
                 generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The cache rows of one batch: logits (B, T, V), labels (B, T) -> (rows, per-example counts (B,)).

    topk: ``ids`` (R, k) and ``logp`` (R, k) sorted descending, ``rest`` (R,) = log of the
    mass outside them; sampled: ``ids`` (R, k) drawn with replacement, ``entropy`` (R,).
    Rows are the valid positions, row-major (``logits[:, :-1][labels[:, 1:] != -100]``).
    """
    mask = labels[:, 1:] != -100
    logp = torch.log_softmax(logits[:, :-1][mask].float() / temperature, dim=-1)   # (R, V)
    if kind == "topk":
        k = min(k, logp.shape[-1])
        values, ids = logp.topk(k, dim=-1)
        # The outside mass summed directly, not 1 - (top-k mass): no rounding noise, exactly 0 when k = V.
        rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
        rows = {"ids": ids, "logp": values, "rest": rest}
    else:
        probs = logp.exp()
        ids = torch.multinomial(probs, k, replacement=True, generator=generator) if len(probs) else \
            torch.zeros((0, k), dtype=torch.long)
        ids, _ = ids.sort(dim=-1)
        entropy = -(probs * torch.where(probs > 0, logp, torch.zeros_like(logp))).sum(-1)
        rows = {"ids": ids, "entropy": entropy}
    return rows, mask.sum(1)


def encode_rows(rows: dict[str, np.ndarray], *, kind: str, vocab_size: int, value_bits: int) -> dict[str, np.ndarray]:
    """Rows in the shard encoding (see :mod:`potstill.teachers.cache_format`)."""
    out = {"ids": fmt.pack_ids(rows["ids"], fmt.id_bits(vocab_size))}
    if kind == "topk":
        out["logp"] = fmt.quantize_logp(rows["logp"], value_bits)
        out["rest"] = fmt.quantize_logp(rows["rest"], value_bits)
    else:
        out["entropy"] = rows["entropy"].astype(np.float16)
    return out


def cache_teacher(config, *, overrides=(), progress: bool = True) -> dict[str, Any]:
    """Capture (or finish capturing) the teacher cache described by ``config``; returns the manifest."""
    from tqdm.auto import tqdm

    cfg: DistillConfig = as_config(config, overrides)
    cc = cfg.cache
    if cfg.teacher.name_or_path is None:
        raise ConfigError("cache-teacher needs teacher.name_or_path: the model whose logits to capture")
    folder = Path(cc.dir)
    check_cache_dir(folder, cfg)
    precision = resolve_precision(cfg.train.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_dtype = teacher_dtype(cfg.teacher.dtype, compute_dtype(precision))
    # Cheap before costly: tokenizers, model folders and the data (tokenized here, which checks every
    # row) before the teacher loads, so a mistake is one line without waiting for a large model.
    checked = preflight(cfg, role="cache-teacher", check_data=False)
    train_ds, _ = build_datasets(cfg.data, checked.tokenizer, seed=cfg.train.seed, progress=progress)
    teacher, tok = load_teacher(cfg.teacher, dtype=t_dtype, tokenizer=checked.teacher_tokenizer)
    teacher.to(device)
    vocab = output_rows(teacher)
    k = min(cc.k, vocab) if cc.kind == "topk" else cc.k
    n = len(train_ds)
    per_shard = cc.examples_per_shard
    header = {
        "format": fmt.FORMAT, "version": fmt.VERSION,
        "teacher": {"name": model_name(cfg.teacher.name_or_path), "revision": cfg.teacher.revision,
                    "vocab_size": vocab, "dtype": str(t_dtype).removeprefix("torch."), "precision": precision},
        "tokenizer_sha256": tokenizer_sha256(tok),
        "dataset": {"fingerprint": train_ds.fingerprint, "n_examples": n, "source": train_ds.manifest.get("source")},
        "kind": cc.kind, "k": k, "temperature": cfg.loss.logits.temperature,
        "encoding": {"id_bits": fmt.id_bits(vocab), "ids": "packed big-endian, rows padded to bytes",
                     **({"value_bits": cc.value_bits, "logp_min": fmt.LOGP_MIN[cc.value_bits],
                         "values": "uint linear in log-prob on [logp_min, 0]"} if cc.kind == "topk" else
                        {"entropy": "float16"})},
        "examples_per_shard": per_shard, "seed": cc.seed if cc.kind == "sampled" else None,
        "n_shards": -(-n // per_shard),
    }
    manifest = _open_for_writing(folder, header, overwrite=cc.overwrite)
    start = len(manifest["shards"])
    if start:
        log.info("teacher cache %s: continuing after %d of %d complete shards", folder, start, header["n_shards"])
    autocast = autocast_context(precision, device)
    batch_size = cc.batch_size or cfg.train.batch_size
    lengths = np.diff(np.asarray(train_ds.offsets))
    todo_tokens = int(np.maximum(lengths[start * per_shard:] - 1, 0).sum())
    bar = tqdm(total=todo_tokens, desc="cache-teacher", unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    teacher.eval()
    with StopRequest() as stop:  # SIGTERM / Ctrl-C: finish the shard in hand, keep it, stop
        for s in range(start, header["n_shards"]):
            lo, hi = s * per_shard, min((s + 1) * per_shard, n)
            t_shard = time.perf_counter()
            gen = None
            if cc.kind == "sampled":
                gen = torch.Generator(device=device).manual_seed(cc.seed * 1_000_003 + s)
            parts: list[dict[str, np.ndarray]] = []
            counts: list[np.ndarray] = []
            for a in range(lo, hi, batch_size):
                batch = collate([train_ds[i] for i in range(a, min(a + batch_size, hi))], tok.pad_token_id)
                batch = {key: v.to(device) for key, v in batch.items()}
                with torch.no_grad(), autocast():
                    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                rows, per_example = teacher_rows(logits, batch["labels"], kind=cc.kind, k=k,
                                                 temperature=header["temperature"], generator=gen)
                parts.append({key: v.cpu().numpy() for key, v in rows.items()})
                counts.append(per_example.cpu().numpy())
                bar.update(int(batch["attention_mask"][:, 1:].sum()))
            rows_np = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
            arrays = encode_rows(rows_np, kind=cc.kind, vocab_size=vocab, value_bits=cc.value_bits)
            arrays["offsets"] = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
            with _writing(folder, done=s):
                entry = fmt.write_shard(folder, s, arrays)
                entry.update(examples=[lo, hi], rows=int(arrays["offsets"][-1]),
                             seconds=round(time.perf_counter() - t_shard, 3))
                manifest["shards"].append(entry)
                fmt.write_manifest(folder, manifest)
            if stop.agreed() and s + 1 < header["n_shards"]:
                raise stop.stopped(f"after shard {s + 1} of {header['n_shards']}; the complete shards are kept in "
                                   f"{folder}: run the same command again to continue")
    bar.close()
    rows_total = sum(e["rows"] for e in manifest["shards"])
    bytes_total = sum(e["bytes"] for e in manifest["shards"])
    seconds = sum(e.get("seconds", 0.0) for e in manifest["shards"])
    manifest.update(complete=True, n_rows=rows_total, bytes=bytes_total, capture_seconds=round(seconds, 1),
                    capture_tokens_per_s=rows_total / max(seconds, 1e-9),
                    bytes_per_token=bytes_total / max(rows_total, 1),
                    payload_bytes_per_token=fmt.bytes_per_row(cc.kind, k, vocab, cc.value_bits))
    with _writing(folder, done=len(manifest["shards"])):
        fmt.write_manifest(folder, manifest)
    log.info("teacher cache %s: %d shards, %d tokens, %.1f bytes per token (%.1f MB) in %.1fs", folder,
             len(manifest["shards"]), rows_total, manifest["bytes_per_token"], bytes_total / 1e6,
             time.perf_counter() - t0)
    return manifest


# ----------------------------------------------------------------------------------------
# The cache folder: potstill's own, apart from the inputs, written so that a failure loses nothing


# What a capture reads: its cache.dir must lie apart from all of it.
CAPTURE_INPUTS = ("teacher.name_or_path", "teacher.tokenizer", "data.source", "data.validation_source")


def check_cache_dir(folder: Path, cfg: DistillConfig) -> None:
    """Refuse, before any work, a ``cache.dir`` that a capture must not write into: a file, a place
    it cannot write, a folder that overlaps the capture's inputs, or one that holds something
    other than a teacher cache (whatever ``cache.overwrite`` says)."""
    check_writable(folder, "cache.dir", CacheError)  # a file, or a place this process cannot write
    for setting, path in input_paths(cfg, CAPTURE_INPUTS):
        if is_within(folder, path):
            raise CacheError(f"cache.dir {folder} lies inside {setting} {path}: keep the cache apart from the "
                             "capture's inputs; choose another cache.dir")
        if is_within(path, folder):
            raise CacheError(f"cache.dir {folder} holds {setting} {path}: keep the cache apart from the capture's "
                             "inputs; choose another cache.dir")
    if not folder.is_dir() or not any(folder.iterdir()) or _holds_a_cache(folder):
        return
    kind = owner_kind(folder)
    what = f"a potstill {kind}" if kind else "no teacher cache"
    raise CacheError(f"cache.dir {folder} is not empty and holds {what}: a capture writes only into a new or empty "
                     "folder or its own cache (cache.overwrite replaces nothing else); choose another cache.dir")


def _holds_a_cache(folder: Path) -> bool:
    """potstill's mark says cache, or (a cache written before the mark existed) its manifest says so."""
    return owner_kind(folder) == "cache" or (owner_kind(folder) is None and fmt.is_cache_manifest(folder))


def _writing(folder: Path, *, done: int):
    """A full disk (or a folder made read-only) while the capture writes: one line saying how to go on.

    The writers remove their own temporary files (:func:`fmt.write_shard`, ``atomic_write_text``)."""
    return disk_errors(f"writing teacher cache {folder}",
                       advice=f"free space (or fix the folder's permissions), then run potstill cache-teacher "
                              f"again: it continues after the {done} complete shard{'' if done == 1 else 's'}")


def _open_for_writing(folder: Path, header: dict[str, Any], *, overwrite: bool) -> dict[str, Any]:
    """The manifest to continue (same header, every listed shard intact) or a fresh one.

    A cache of other settings, or a damaged one, is refused in one line, or with ``overwrite``
    cleared (only the files a capture wrote) and captured anew."""
    if (folder / fmt.MANIFEST).exists():
        try:
            manifest = _continuable(folder, header)
        except CacheError:
            if not overwrite:
                raise
            _clear(folder)
        else:
            with _writing(folder, done=len(manifest["shards"])):
                mark_owned(folder, "cache")  # a cache from before the mark existed gets it now
            return manifest
    elif folder.is_dir() and fmt.written_files(folder):
        _clear(folder)  # shards of a capture whose manifest is gone (cut short while clearing): none is listed
    with disk_errors(f"creating teacher cache {folder}", advice="choose another cache.dir, or free space or fix "
                     "its permissions"):
        folder.mkdir(parents=True, exist_ok=True)
        mark_owned(folder, "cache")
        manifest = {**header, "shards": [], "complete": False}
        fmt.write_manifest(folder, manifest)
    return manifest


def _continuable(folder: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The manifest in ``folder`` if this capture may continue it; else the one line saying why not."""
    manifest = fmt.read_manifest(folder)
    fmt.check_manifest(folder, manifest)
    differs = fmt.header_differences(manifest, header)
    if differs:
        raise CacheError(f"cache.dir {folder} holds a teacher cache with other settings (differs in: "
                         f"{', '.join(differs)}): choose another cache.dir or set cache.overwrite=true")
    fmt.verify_shards(folder, manifest)  # a listed shard must still be intact before we build on it
    return manifest


def _clear(folder: Path) -> None:
    """Delete what an earlier capture wrote in ``folder`` (manifest first), and nothing else."""
    if not _holds_a_cache(folder):  # checked before any work too; the folder may have changed since
        raise CacheError(f"cache.dir {folder} no longer holds a teacher cache: cache.overwrite replaces only "
                         "potstill's own caches; choose another cache.dir")
    files = fmt.written_files(folder)
    log.info("teacher cache %s: deleting the %d files of the earlier capture", folder, len(files))
    with disk_errors(f"clearing teacher cache {folder}", advice="fix the folder's permissions or choose another "
                     "cache.dir"):
        for path in files:
            path.unlink(missing_ok=True)
