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

With ``teacher.server`` (a vLLM server) no teacher loads: each example's token ids go to the
server (:meth:`~.server_client.TeacherServer.topk_rows`, ``k`` = ``cache.k``), all the examples
of a shard at once with at most ``teacher.server.max_concurrency`` requests in flight, and the
rows are written in example order, so the shards are the same bytes whatever order the answers
come in (vLLM's prompt log-probs are the same alone or batched). The server and its tokenizer
are checked before any work; what it cannot give exactly is refused (``cache.kind=sampled``: a
server returns the top-k only; a temperature other than 1: prompt log-probs come untempered).
The manifest names the served model (``teacher.source: server``, ``server.url``); a server
fault ends the capture with one :class:`~potstill.errors.ServerError` line after the client's
retries, and the complete shards stay for the next run.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import disk_errors
from ..config import DistillConfig, as_config
from ..data import build_datasets, build_teacher_view, collate, text_fingerprint
from ..data.alignment import context_token, with_context_token
from ..errors import ConfigError, ServerError
from ..models.precision import autocast_context, compute_dtype, resolve_precision
from ..models.preflight import preflight
from ..models.teacher_model import load_teacher, teacher_dtype
from ..models.vocab import output_rows
from ..ownership import check_writable, input_paths, is_within, mark_owned, owner_kind, read_json_object
from ..stopping import StopRequest
from . import cache_format as fmt
from .cache_format import CacheError
from .cached import tokenizer_sha256
from .served import check_tokenizer, require_untempered
from .signal import topk_rows
from .server_client import TeacherServer

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
    if kind == "topk":
        ids, values, rest = topk_rows(logits[:, :-1][mask].float(), k=k, temperature=temperature)
        return {"ids": ids, "logp": values, "rest": rest}, mask.sum(1)
    logp = torch.log_softmax(logits[:, :-1][mask].float() / temperature, dim=-1)   # (R, V)
    probs = logp.exp()
    ids = torch.multinomial(probs, k, replacement=True, generator=generator) if len(probs) else \
        torch.zeros((0, k), dtype=torch.long)
    ids, _ = ids.sort(dim=-1)
    entropy = -(probs * torch.where(probs > 0, logp, torch.zeros_like(logp))).sum(-1)
    return {"ids": ids, "entropy": entropy}, mask.sum(1)


def encode_rows(rows: dict[str, np.ndarray], *, kind: str, vocab_size: int, value_bits: int) -> dict[str, np.ndarray]:
    """Rows in the shard encoding (see :mod:`potstill.teachers.cache_format`)."""
    out = {"ids": fmt.pack_ids(rows["ids"], fmt.id_bits(vocab_size))}
    for key in ("token", "spans"):  # a cross-tokenizer cache (cache.offsets)
        if key in rows:
            out[key] = rows[key]
    if kind == "topk":
        out["logp"] = fmt.quantize_logp(rows["logp"], value_bits)
        out["rest"] = fmt.quantize_logp(rows["rest"], value_bits)
    else:
        out["entropy"] = rows["entropy"].astype(np.float16)
    return out


def cache_teacher(config, *, overrides=(), progress: bool = True) -> dict[str, Any]:
    """Capture (or finish capturing) the teacher cache described by ``config``; returns the manifest."""
    cfg: DistillConfig = as_config(config, overrides)
    cc = cfg.cache
    served = cfg.teacher.server is not None
    if cc.offsets and (served or cc.kind != "topk"):
        raise ConfigError("cache.offsets (a cross-tokenizer cache) is captured from a teacher loaded in this process "
                          "with cache.kind=topk: " + ("drop teacher.server and set teacher.name_or_path" if served
                                                      else "set cache.kind=topk"))
    if served:
        check_served_settings(cfg)
    elif cfg.teacher.name_or_path is None:
        raise ConfigError("cache-teacher needs teacher.name_or_path: the model whose logits to capture")
    folder = Path(cc.dir)
    check_cache_dir(folder, cfg)
    # Cheap before costly: tokenizers, model folders (and the server) before the data are tokenized
    # (which checks every row) and before a teacher loads, so a mistake is one line without waiting.
    checked = preflight(cfg, role="cache-teacher", check_data=False)
    source = (served_source if served else local_source)(cfg, checked, progress=progress)
    try:
        return _capture(cfg, source, progress=progress)
    finally:
        source.close()


@dataclass
class Source:
    """Where a capture's rows come from: a teacher in this process or a server.

    ``rows(s, lo, hi, bar)`` gives shard ``s`` (examples ``lo .. hi-1``): the rows of their valid
    positions, example after example, and per-example counts (hi - lo,); it advances ``bar`` by
    the positions it scored."""

    train_ds: Any
    tokenizer: Any
    vocab: int
    k: int
    teacher: dict[str, Any]  # the manifest's teacher entry
    rows: Callable[[int, int, int, Any], tuple[dict[str, np.ndarray], np.ndarray]]
    extra: dict[str, Any] = field(default_factory=dict)  # manifest keys outside the compared header
    close: Callable[[], None] = lambda: None


def local_source(cfg: DistillConfig, checked, *, progress: bool) -> Source:
    """The teacher loaded here (after the data are tokenized), a forward per batch."""
    cc = cfg.cache
    precision = resolve_precision(cfg.train.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_dtype = teacher_dtype(cfg.teacher.dtype, compute_dtype(precision))
    if cc.offsets:  # the teacher's own tokenization, one example per item, with character spans
        train_ds = build_teacher_view(cfg.data, checked.teacher_tokenizer, seed=cfg.train.seed, progress=progress)
    else:
        train_ds, _ = build_datasets(cfg.data, checked.tokenizer, seed=cfg.train.seed, progress=progress)
    teacher, tok = load_teacher(cfg.teacher, dtype=t_dtype, tokenizer=checked.teacher_tokenizer)
    teacher.to(device).eval()
    vocab = output_rows(teacher)
    k = min(cc.k, vocab) if cc.kind == "topk" else cc.k
    autocast = autocast_context(precision, device)
    batch_size = cc.batch_size or cfg.train.batch_size

    def rows(s: int, lo: int, hi: int, bar) -> tuple[dict[str, np.ndarray], np.ndarray]:
        gen = None
        if cc.kind == "sampled":  # a seed per shard: a resumed capture draws what an uninterrupted one did
            gen = torch.Generator(device=device).manual_seed(cc.seed * 1_000_003 + s)
        parts: list[dict[str, np.ndarray]] = []
        counts: list[np.ndarray] = []
        groups = (length_batches(train_ds, lo, hi, batch_size * cfg.data.max_length) if cc.offsets
                  else [list(range(a, min(a + batch_size, hi))) for a in range(lo, hi, batch_size)])
        for group in groups:
            items = [train_ds[i] for i in group]
            if cc.offsets:
                items = [with_context(item, tok) for item in items]
            batch = collate(items, tok.pad_token_id)
            batch = {key: v.to(device) for key, v in batch.items()}
            with torch.no_grad(), autocast():
                logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got, per_example = teacher_rows(logits, batch["labels"], kind=cc.kind, k=k,
                                            temperature=cfg.loss.logits.temperature, generator=gen)
            got = {key: v.cpu().numpy() for key, v in got.items()}
            if cc.offsets:  # what each row predicts, and where that token sits in the text
                got.update(span_rows(items, batch["labels"].cpu()))
            parts.append(got)
            counts.append(per_example.cpu().numpy())
            bar.update(int(batch["attention_mask"][:, 1:].sum()))
        if cc.offsets:  # the batches took the examples by length: put their rows back in example order
            return in_example_order(parts, counts, lo, hi, groups)
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, np.concatenate(counts)

    teacher_entry = {"name": model_name(cfg.teacher.name_or_path), "revision": cfg.teacher.revision,
                     "vocab_size": vocab, "dtype": str(t_dtype).removeprefix("torch."), "precision": precision}
    return Source(train_ds, tok, vocab, k, teacher_entry, rows)


def length_batches(view, lo: int, hi: int, budget: int) -> list[list[int]]:
    """Examples ``lo .. hi-1`` of a teacher view (whole examples, of any length) in batches of
    similar length holding at most ``budget`` padded tokens (one example alone when it is longer):
    padding and the teacher's logits stay bounded however long some examples are."""
    lengths = np.diff(np.asarray(view.offsets[lo:hi + 1]))
    batches: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        if batches and (len(batches[-1]) + 1) * int(lengths[batches[-1][0] - lo]) <= budget:
            batches[-1].append(lo + int(i))
        else:
            batches.append([lo + int(i)])
    return batches


def in_example_order(parts: list[dict[str, np.ndarray]], counts: list[np.ndarray], lo: int, hi: int,
                     batches: list[list[int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows of batches taken in any order (``batches``: their example indices) as one shard's rows
    in example order, with the per-example counts."""
    by_example: dict[int, dict[str, np.ndarray]] = {}
    for part, count, group in zip(parts, counts, batches):
        ends = np.cumsum(count)
        for i, a, b in zip(group, ends - count, ends):
            by_example[i] = {key: v[a:b] for key, v in part.items()}
    order = [by_example[i] for i in range(lo, hi)]
    return ({key: np.concatenate([o[key] for o in order]) for key in parts[0]},
            np.array([len(o["ids"]) for o in order], dtype=np.int64))


def with_context(item: dict, tokenizer) -> dict:
    """A teacher-view example with a context token in front where its first token spells text
    (:func:`potstill.data.alignment.with_context_token`)."""
    ids, spans = with_context_token(item["input_ids"].numpy(), np.asarray(item["spans"]), context_token(tokenizer))
    if len(ids) == len(item["input_ids"]):
        return item
    return {"input_ids": torch.as_tensor(ids), "labels": torch.cat([torch.tensor([-100]), item["labels"]]),
            "spans": spans}


def span_rows(items: list[dict], labels: torch.Tensor) -> dict[str, np.ndarray]:
    """For the valid rows of a batch of teacher-view items (row-major, as :func:`teacher_rows`;
    ``labels`` (B, T) the batch's): ``token`` (R,) int32 the token each row predicts, ``spans``
    (R, 4) int32 its character span."""
    tokens, spans = [], []
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        keep = (labels[b, 1:n] != -100).numpy()
        tokens.append(item["input_ids"].numpy()[1:][keep])
        spans.append(np.asarray(item["spans"])[1:][keep])
    return {"token": np.concatenate(tokens).astype(np.int32), "spans": np.concatenate(spans).astype(np.int32)}


# ----------------------------------------------------------------------------------------
# A served teacher (vLLM): top-k prompt log-probs of each example's token ids, many at once


def check_served_settings(cfg: DistillConfig) -> None:
    """What a server cannot give exactly, refused before any work: samples (they are drawn from
    the whole distribution; a server returns its top k) and a temperature (prompt log-probs come
    untempered, and a top-k cannot be re-tempered without the other logits)."""
    where = f"teacher.server {cfg.teacher.server.url}"
    if cfg.cache.kind == "sampled":
        raise ConfigError(f"cache.kind=sampled cannot be captured from {where}: samples are drawn from the "
                          "teacher's whole distribution and a server returns only its top-k log-probs: set "
                          "cache.kind=topk, or load the teacher in this process (teacher.name_or_path, no "
                          "teacher.server)")
    require_untempered(cfg.loss.logits.temperature, f"captured from {where}")


def served_vocab(cfg: DistillConfig, tokenizer) -> int:
    """The served model's vocabulary (rows of its head), which sizes the cache's packed ids: the
    ``vocab_size`` of a local config.json beside the tokenizer (the model's folder), else the
    tokenizer's length (a server never says; ids past it are refused while capturing)."""
    for ref in (cfg.teacher.name_or_path, cfg.teacher.tokenizer):
        path = Path(ref) / "config.json" if isinstance(ref, (str, Path)) else None
        data = read_json_object(path) if path is not None and path.is_file() else None
        if data:
            size = data.get("vocab_size", (data.get("text_config") or {}).get("vocab_size"))
            if isinstance(size, int) and not isinstance(size, bool) and size >= len(tokenizer):
                return size
    return len(tokenizer)


def served_source(cfg: DistillConfig, checked, *, progress: bool) -> Source:
    """Rows from ``teacher.server``: one request per example, every example of a shard asked at
    once with at most ``teacher.server.max_concurrency`` in flight, kept in example order (so
    the shard's bytes do not depend on which answer lands first). No teacher model loads."""
    sc = cfg.teacher.server
    tok = checked.tokenizer
    vocab = served_vocab(cfg, tok)
    k = min(cfg.cache.k, vocab)
    server = TeacherServer(sc)
    # before the data: no tokenizing for a dead server
    server.check(top_k=k, max_length=cfg.data.max_length, setting="cache.k")
    train_ds, _ = build_datasets(cfg.data, tok, seed=cfg.train.seed, progress=progress)
    if sc.check_tokenizer:
        check_tokenizer(server, tok, train_ds)
    pool = ThreadPoolExecutor(sc.max_concurrency, thread_name_prefix="potstill-capture")
    log.info("teacher: served %s at %s (top-%d, %d requests at once), no teacher model loaded", server.model,
             server.base, k, sc.max_concurrency)

    def example_rows(ids: list[int], keep: np.ndarray) -> dict[str, np.ndarray]:
        got = server.topk_rows(ids, k)  # (len(ids) - 1) rows: positions 0 .. T-2
        return {key: value[keep] for key, value in got.items()}

    def rows(s: int, lo: int, hi: int, bar) -> tuple[dict[str, np.ndarray], np.ndarray]:
        items = [train_ds[i] for i in range(lo, hi)]  # read here: the dataset is not shared with the threads
        futures = {pool.submit(example_rows, item["input_ids"].tolist(), (item["labels"][1:] != -100).numpy()):
                   max(len(item["input_ids"]) - 1, 0) for item in items}
        try:
            for future in as_completed(futures):
                future.result()  # the first fault ends the shard (ServerError), the rest are cancelled
                bar.update(futures[future])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        parts = [future.result() for future in futures]  # example order (dicts keep insertion order)
        got = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        if len(got["ids"]) and int(got["ids"].max()) >= vocab:
            raise ServerError(f"{server.where}: token id {int(got['ids'].max())} is outside the {vocab} ids of this "
                              "run's tokenizer / teacher config: the server's model has another vocabulary")
        return got, np.array([len(p["ids"]) for p in parts], np.int64)

    teacher_entry = {"name": server.model, "source": "server", "vocab_size": vocab}
    return Source(train_ds, tok, vocab, k, teacher_entry, rows, extra={"server": {"url": sc.url, "model": server.model}},
                  close=lambda: (server.close(), pool.shutdown(wait=False, cancel_futures=True)))


# ----------------------------------------------------------------------------------------
# The capture: shard after shard, each written whole, resumable


def _capture(cfg: DistillConfig, source: Source, *, progress: bool) -> dict[str, Any]:
    """Write the shards ``source`` gives into ``cache.dir``, continuing after its complete ones."""
    from tqdm.auto import tqdm

    cc = cfg.cache
    folder = Path(cc.dir)
    train_ds, vocab, k = source.train_ds, source.vocab, source.k
    n = len(train_ds)
    per_shard = cc.examples_per_shard
    header = {
        "format": fmt.FORMAT, "version": fmt.VERSION, "teacher": source.teacher,
        "tokenizer_sha256": tokenizer_sha256(source.tokenizer),
        "dataset": {"fingerprint": train_ds.fingerprint, "n_examples": n, "source": train_ds.manifest.get("source")},
        "kind": cc.kind, "k": k, "temperature": cfg.loss.logits.temperature,
        "encoding": {"id_bits": fmt.id_bits(vocab), "ids": "packed big-endian, rows padded to bytes",
                     **({"value_bits": cc.value_bits, "logp_min": fmt.LOGP_MIN[cc.value_bits],
                         "values": "uint linear in log-prob on [logp_min, 0]"} if cc.kind == "topk" else
                        {"entropy": "float16"})},
        "examples_per_shard": per_shard, "seed": cc.seed if cc.kind == "sampled" else None,
        "n_shards": -(-n // per_shard),
    }
    if cc.offsets:  # rows in the teacher's own tokenization, aligned by character spans at training time
        header["offsets"] = {"text_fingerprint": text_fingerprint(cfg.data, seed=cfg.train.seed), "examples": [
            int(train_ds.spans[int(o), 0]) for o in np.asarray(train_ds.offsets[:-1])]}
    manifest = _open_for_writing(folder, {**header, **source.extra}, overwrite=cc.overwrite)
    start = len(manifest["shards"])
    if start:
        log.info("teacher cache %s: continuing after %d of %d complete shards", folder, start, header["n_shards"])
        if "server" in source.extra and manifest.get("server") != source.extra["server"]:
            # Allowed (a restarted server moves), but the shards then come from two servers: say so.
            log.warning("teacher cache %s: begun from %s, continued from %s: both must serve the same weights "
                        "and dtype", folder, (manifest.get("server") or {}).get("url"), source.extra["server"]["url"])
    lengths = np.diff(np.asarray(train_ds.offsets))
    todo_tokens = int(np.maximum(lengths[start * per_shard:] - 1, 0).sum())
    bar = tqdm(total=todo_tokens, desc="cache-teacher", unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    with StopRequest() as stop:  # SIGTERM / Ctrl-C: finish the shard in hand, keep it, stop
        for s in range(start, header["n_shards"]):
            lo, hi = s * per_shard, min((s + 1) * per_shard, n)
            t_shard = time.perf_counter()
            rows_np, counts = source.rows(s, lo, hi, bar)
            arrays = encode_rows(rows_np, kind=cc.kind, vocab_size=vocab, value_bits=cc.value_bits)
            arrays["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
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
