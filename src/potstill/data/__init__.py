"""The data pipeline: load -> format -> tokenize + pack, cached on disk by content.

    train, val = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    loader = DataLoader(train, batch_size=8, collate_fn=partial(collate, pad_token_id=tok.pad_token_id))

* :mod:`.sources`: files, globs, folders, hub names, in-memory objects -> raw rows;
* :mod:`.formats`: text / messages / sharegpt / prompt_completion -> token ids + loss mask;
* :mod:`.tokenized`: packing, the fingerprinted on-disk cache, :class:`TokenizedDataset`, :func:`collate`;
* :mod:`.alignment`: across tokenizers, the teacher's window of a student item and the aligned
  predictions, from the tokens' canonical character spans (``build_datasets(spans=True)``,
  :func:`build_teacher_view`).

Validation rows come from ``data.validation_source``, else ``data.validation_split`` of the
same hub dataset (or DatasetDict), else a seeded ``data.validation_fraction`` of the raw
rows, split before tokenization so that no row is in both. ``data.max_examples`` keeps the
first N rows of each source (before that split).

The cache folder's name is a sha256 over the raw rows' content (file bytes, in-memory rows,
or a hub dataset's fingerprint), the tokenizer's serialized state, every ``DataConfig`` field
except the sources themselves and ``cache_dir``, the split role (and seed, for a fractional
split) and :data:`~.tokenized.FORMAT_VERSION`. Cache root: ``data.cache_dir``, else
``$POTSTILL_CACHE``, else ``~/.cache/potstill/data``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from . import formats
from .sources import RawSource, load_rows, open_source
from .tokenized import (FORMAT_VERSION, IGNORE_INDEX, TokenizedDataset, collate, count_loss_tokens, load_cache,
                        make_dataset, tokenizer_state)

__all__ = ["build_datasets", "build_teacher_view", "text_fingerprint", "plan_datasets", "require_eos", "load_rows", "TokenizedDataset", "collate",
           "count_loss_tokens", "IGNORE_INDEX",
           "cache_root"]

log = logging.getLogger("potstill")
_NOT_TOKEN_FIELDS = ("source", "validation_source", "cache_dir")


def cache_root(cfg) -> Path:
    """Where tokenized data is cached: data.cache_dir, $POTSTILL_CACHE, ~/.cache/potstill/data."""
    root = cfg.cache_dir or os.environ.get("POTSTILL_CACHE") or "~/.cache/potstill/data"
    return Path(root).expanduser()


def build_datasets(cfg, tokenizer, *, seed: int = 0, progress: bool = True, label: str | None = None,
                   spans: bool = False) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Train and validation datasets (validation None when there is none to make).

    ``label``: what the first dataset is called in logs and progress bars when it is not
    training data (e.g. "test", "evaluation"); the cache is the same either way.
    ``spans``: record each token's canonical character span (cross-tokenizer runs)."""
    require_eos(tokenizer)
    builder = _Builder(cfg, tokenizer, progress, spans=spans)
    shown = {"train": label} if label else {}
    built = {p.role: builder.build(p.role, p.source, p.plan, p.select, shown=shown.get(p.role))
             for p in plan_datasets(cfg, seed)}
    return built["train"], built.get("validation")


def require_eos(tokenizer) -> None:
    """Examples are separated by EOS: a tokenizer without one cannot build the data."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}) has no eos_token, which separates examples: "
                        "set tokenizer.eos_token (e.g. to its end-of-text token) before building the data")


@dataclass
class PlannedDataset:
    """One dataset to build: its role, raw source, split plan (part of the cache key), and the
    row indices it takes from the source (None: all of them)."""

    role: str
    source: RawSource
    plan: str
    select: Callable[[], np.ndarray] | None = None


def plan_datasets(cfg, seed: int = 0) -> list[PlannedDataset]:
    """The train (and validation) datasets ``cfg`` describes, sources opened (fingerprinted) but
    not parsed; validation from its own source, a split of a hub dataset, or a seeded fraction."""
    source = open_source(cfg.source, cfg=cfg, split=cfg.split)
    if cfg.validation_source is not None:
        val_source = open_source(cfg.validation_source, cfg=cfg, split=cfg.validation_split or cfg.split,
                                 what="data.validation_source")
        return [PlannedDataset("train", source, "all"), PlannedDataset("validation", val_source, "all")]
    if cfg.validation_split is not None:
        if source.kind not in ("hub", "dataset_dict", "builtin"):
            raise DataError(f"data.validation_split='{cfg.validation_split}' needs a hub dataset or DatasetDict "
                            f"source, but data.source is {source.describe}: set data.validation_source or "
                            "data.validation_fraction instead")
        if cfg.validation_split == cfg.split:
            raise DataError(f"data.validation_split equals data.split ('{cfg.split}'): the model would be "
                            "evaluated on its training rows; name another split")
        val_source = open_source(cfg.source, cfg=cfg, split=cfg.validation_split, what="data.validation_split")
        return [PlannedDataset("train", source, "all"), PlannedDataset("validation", val_source, "all")]
    if cfg.validation_fraction <= 0:
        return [PlannedDataset("train", source, "all")]

    split: dict[str, np.ndarray] = {}

    def indices(role: str) -> np.ndarray:
        if not split:
            split.update(split_indices(len(source.rows()), cfg.validation_fraction, seed, source.describe))
        return split[role]

    plan = f"fraction={cfg.validation_fraction!r}|seed={seed}"
    return [PlannedDataset("train", source, plan, lambda: indices("train")),
            PlannedDataset("validation", source, plan, lambda: indices("validation"))]


def split_indices(n: int, fraction: float, seed: int, describe: str) -> dict[str, np.ndarray]:
    """A seeded, disjoint split of ``range(n)``: the same (n, fraction, seed) always gives the same."""
    n_val = max(1, int(round(n * fraction)))
    if n - n_val < 1:
        raise DataError(f"{describe} has {n} row(s), too few to hold out data.validation_fraction="
                        f"{fraction}: add rows, set data.validation_fraction=0, or give data.validation_source")
    order = np.random.default_rng(seed).permutation(n)
    return {"validation": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}


def build_teacher_view(cfg, teacher_tokenizer, *, seed: int = 0, progress: bool = True) -> TokenizedDataset:
    """The train split as the *teacher* tokenizes it, for cross-tokenizer runs: one item per
    example, never truncated or packed, with canonical character spans (item ``k`` holds the
    example whose ordinal is ``spans[:, 0]``), from which each student item's teacher context is
    cut (:mod:`potstill.data.alignment`). Cached like any tokenized data."""
    require_eos(teacher_tokenizer)
    whole = cfg.model_copy(update={"packing": False, "max_length": VIEW_MAX_LENGTH})
    builder = _Builder(whole, teacher_tokenizer, progress, spans=True)
    train = next(p for p in plan_datasets(cfg, seed) if p.role == "train")
    return builder.build("train", train.source, train.plan, train.select, shown="teacher view")


VIEW_MAX_LENGTH = 1 << 30  # the teacher view keeps whole examples

# What decides the examples' canonical texts (not how they are cut into items or cached).
_NOT_TEXT_FIELDS = _NOT_TOKEN_FIELDS + ("max_length", "packing")


def text_fingerprint(cfg, *, seed: int = 0) -> str:
    """A sha256 of what decides the train split's canonical texts, whatever the tokenizer: the raw
    rows, the split and the formatting settings. A cross-tokenizer cache records it, and a run
    that reads the cache must have the same."""
    train = next(p for p in plan_datasets(cfg, seed) if p.role == "train")
    fields = {k: getattr(cfg, k) for k in type(cfg).model_fields if k not in _NOT_TEXT_FIELDS}
    h = hashlib.sha256(f"potstill-text|{train.plan}|{train.source.fingerprint}|".encode())
    h.update(json.dumps(fields, sort_keys=True, default=repr).encode())
    return h.hexdigest()


class _Builder:
    def __init__(self, cfg, tokenizer, progress: bool, *, spans: bool = False):
        self.cfg, self.tok, self.progress, self.spans = cfg, tokenizer, progress, spans
        fields = {k: getattr(cfg, k) for k in type(cfg).model_fields if k not in _NOT_TOKEN_FIELDS}
        if spans:  # only then: every other dataset keeps its fingerprint
            fields["spans"] = True
        self.settings = json.dumps(fields, sort_keys=True, default=repr)
        self.tok_state = tokenizer_state(tokenizer)
        self.root = cache_root(cfg)

    def fingerprint(self, role: str, source: RawSource, plan: str) -> str:
        h = hashlib.sha256(f"potstill-data|v{FORMAT_VERSION}|{role}|{plan}|{source.fingerprint}|".encode())
        h.update(self.settings.encode())
        h.update(self.tok_state.encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    def build(self, role: str, source: RawSource, plan: str,
              select: Callable[[], np.ndarray] | None = None, shown: str | None = None) -> TokenizedDataset:
        fp = self.fingerprint(role, source, plan)
        shown = shown or role
        t0 = time.perf_counter()
        ds = load_cache(self.root, fp, vocab_size=len(self.tok))
        if ds is not None:
            _summary(shown, ds, f"cache hit {ds.cache_path}", time.perf_counter() - t0)
            return ds
        rows = source.rows()
        if len(rows) == 0:
            raise DataError(f"{source.describe} has no rows: check the file or the split")
        row_ids = select() if select is not None else np.arange(len(rows))
        if select is not None:
            rows = rows.select(row_ids)
        enc = formats.tokenize_rows(rows, self.cfg, self.tok, where=source.where, describe=source.describe,
                                    row_ids=row_ids, progress=self.progress, desc=f"tokenizing {shown}",
                                    spans=self.spans)
        if int(enc.loss.sum(dtype=np.int64)) == 0:
            raise DataError(f"the {shown} data from {source.describe} is empty after formatting: {_why_empty(enc)}")
        ds = make_dataset(enc, fingerprint=fp, max_length=self.cfg.max_length, packing=self.cfg.packing,
                          role=shown, describe=source.describe, cache_root=self.root)
        where = f"cache miss, wrote {ds.cache_path}" if ds.cache_path else "cache miss, not cached"
        _summary(shown, ds, where, time.perf_counter() - t0)
        return ds


def _why_empty(enc: formats.Encoded) -> str:
    s, rows = enc.stats, enc.stats["rows"]
    what = "conversations" if enc.format in ("messages", "sharegpt") else "rows"
    if s["no_assistant"] == rows:
        return (f"all {rows} {what} lacked an assistant turn (data.assistant_only_loss=true): add assistant "
                "replies or set data.assistant_only_loss=false")
    if s["empty"] == rows:
        return f"all {rows} {what} were empty: check data.format and the *_field settings"
    return (f"no token carries loss ({rows} {what}: {s['no_assistant']} without an assistant turn, {s['empty']} "
            "empty): check the data or set data.assistant_only_loss=false")


def _summary(role: str, ds: TokenizedDataset, cache: str, seconds: float) -> None:
    s = ds.stats
    unit = f"blocks of {ds.max_length}" if ds.packing else (
        "whole examples" if ds.max_length >= VIEW_MAX_LENGTH else f"examples (max {ds.max_length})")
    notes = []
    if s.get("no_assistant"):
        notes.append(f"{s['no_assistant']} conversations without an assistant turn skipped")
    if s.get("empty"):
        notes.append(f"{s['empty']} empty rows skipped")
    if s.get("truncated"):
        notes.append(f"{s['truncated']} examples truncated")
    if s.get("no_loss_after_truncation"):
        notes.append(f"{s['no_loss_after_truncation']} dropped (no loss left after truncation)")
    if s.get("dropped_tokens") and ds.packing:
        notes.append(f"{s['dropped_tokens']} tail tokens dropped")
    log.info("data %s [%s]: %d rows -> %d examples -> %d tokens (%d with loss) -> %d %s%s; %s (%.1fs)",
             role, ds.manifest.get("format"), s.get("rows", 0), s.get("examples", 0), ds.n_tokens, ds.n_loss_tokens,
             len(ds), unit, "; " + ", ".join(notes) if notes else "", cache, seconds)

