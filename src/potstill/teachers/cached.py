"""The teacher signal from a cache on disk: sparse targets per micro-batch, no teacher model.

``teacher.cache: PATH`` in a run loads no teacher. :class:`CachedTeacher` opens the cache
(written by ``potstill cache-teacher``, format in :mod:`potstill.teachers.cache_format`),
checks it against the run (tokenizer, tokenized train dataset, temperature, divergence) and,
for the example indices of a micro-batch, returns the rows of its valid tokens in the order
``logits[:, :-1][mask]`` visits them, as a sparse :class:`~potstill.teachers.signal.TeacherSignal`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from ..data.batching import MicroBatch
from ..data.tokenized import tokenizer_state
from ..errors import ConfigError
from .base import Teacher
from .cache_format import CacheError, CacheReader
from .signal import SparseTargets, TeacherSignal, check_sparse_loss, sparse_chunked_problem

log = logging.getLogger("potstill")


def tokenizer_sha256(tokenizer) -> str:
    """The hash of a tokenizer's serialized state that a cache manifest records."""
    return hashlib.sha256(tokenizer_state(tokenizer).encode("utf-8", "surrogatepass")).hexdigest()


def check_temperature(manifest: dict, temperature: float, where: str) -> None:
    """A cache holds log-probs at one temperature: the run's ``loss.logits.temperature`` must be it."""
    if abs(float(manifest["temperature"]) - temperature) > 1e-12:
        raise ConfigError(f"{where} holds teacher log-probs at temperature {manifest['temperature']}, the run asks "
                          f"for loss.logits.temperature={temperature}: set it to {manifest['temperature']} or "
                          "capture again")


class CachedTeacher(Teacher):
    """Sparse teacher targets from a cache folder, verified against the run that reads them.

    ``student_vocab``: the rows of the student's output head; ids at or past
    ``min(teacher vocab, student_vocab)`` mean the cache belongs to another vocabulary.
    """

    def __init__(self, path: str | Path, *, tokenizer, train_ds, loss_cfg, student_vocab: int):
        self.reader = CacheReader(path)
        m = self.reader.manifest
        where = f"teacher.cache {self.reader.folder}"
        if m["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
            raise CacheError(f"{where} was captured with another tokenizer than this run's "
                             f"({type(tokenizer).__name__}, {len(tokenizer)} tokens) and without character offsets: "
                             "capture it again with cache.offsets=true (then it trains students with any tokenizer), "
                             "or with the student's tokenizer")
        fp, n = m["dataset"]["fingerprint"], m["dataset"]["n_examples"]
        if fp != train_ds.fingerprint or n != len(train_ds):
            raise CacheError(f"{where} was captured on another tokenized dataset ({n} examples, fingerprint "
                             f"{fp[:12]}) than this run's ({len(train_ds)} examples, {train_ds.fingerprint[:12]}): "
                             "the data section (source, max_length, packing, ...) or train.seed differs; "
                             "capture the cache with this config")
        lc = loss_cfg.logits
        check_temperature(m, lc.temperature, where)
        check_sparse_loss(lc, kind=m["kind"], where=where)
        self.kind = m["kind"]
        self.vocab = min(int(m["teacher"]["vocab_size"]), student_vocab)  # logit columns both index
        self.needs_logits = lc.weight > 0
        self.divergence = lc.divergence
        log.info("teacher: cache %s (%s, k=%d, %s, %.1f bytes per token), no teacher model loaded",
                 self.reader.folder, m["teacher"]["name"], m["k"], self.kind, m.get("bytes_per_token", float("nan")))

    def targets(self, example_indices: list[int], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows for a micro-batch: ``mask`` (B, T-1) bool of its valid positions -> tensors of R = mask.sum() rows."""
        per_example = mask.sum(1).tolist()
        parts = []
        for i, want in zip(example_indices, per_example):
            rows = self.reader.rows(int(i))
            if len(rows["ids"]) != want:
                raise CacheError(f"teacher.cache {self.reader.folder}: shard {self.reader.shard_file(int(i))} has "
                                 f"{len(rows['ids'])} rows for example {i}, the batch has {want} valid tokens")
            parts.append(rows)
        rows = {key: torch.from_numpy(np.concatenate([p[key] for p in parts])) for key in parts[0]}
        if len(rows["ids"]) and int(rows["ids"].max()) >= self.vocab:
            raise CacheError(f"teacher.cache {self.reader.folder}: token id {int(rows['ids'].max())} is outside "
                             f"the student's {self.vocab} logits: the cache belongs to another vocabulary")
        return rows

    def signal(self, batch: MicroBatch) -> TeacherSignal:
        if not self.needs_logits:
            return TeacherSignal(kind="none")
        rows = self.targets(batch.example_indices, batch.loss_mask)
        targets = SparseTargets(kind=self.kind, ids=rows["ids"], vocab=self.vocab, logp=rows.get("logp"),
                                rest=rows.get("rest"), entropy=rows.get("entropy"))
        return TeacherSignal(kind="sparse", sparse=targets.to(batch.labels.device))

    def chunked_problem(self) -> str | None:
        return sparse_chunked_problem(self.needs_logits, self.divergence, "teacher cache")
