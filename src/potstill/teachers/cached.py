"""The teacher signal from a cache: sparse targets per batch, and the objective on them.

``teacher.cache: PATH`` in a run loads no teacher. :class:`CachedTeacher` opens the cache,
checks it against the run (tokenizer, tokenized train dataset, temperature, divergence) and,
for the example indices of a micro-batch (what :class:`~potstill.batching.StepBatcher`
yields), returns the rows of the valid tokens in the order ``logits[:, :-1][mask]`` visits
them. :meth:`CachedTeacher.objective` then replaces the online logit term by its sparse
version (:mod:`potstill.losses.sparse`), keeps the CE term, and returns sums like
:class:`~potstill.objective.Objective`: the trainer still normalizes once, per step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .cache import CacheError, CacheReader
from .errors import ConfigError
from .losses import cross_entropy
from .losses.sparse import SPARSE_DIVERGENCES, sampled_forward_kl, topk_divergence
from .objective import IGNORE_INDEX, Objective, ObjectiveOutput, count_valid, shift

log = logging.getLogger("potstill")


class CachedTeacher:
    """Sparse teacher targets from a cache folder, verified against the run that reads them."""

    def __init__(self, path: str | Path, *, tokenizer, train_ds, loss_cfg):
        from .capture import tokenizer_sha256

        self.reader = CacheReader(path)
        m = self.reader.manifest
        where = f"teacher.cache {self.reader.folder}"
        if m["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
            raise CacheError(f"{where} was captured with another tokenizer than this run's "
                             f"({type(tokenizer).__name__}, {len(tokenizer)} tokens): capture it again with the "
                             "student's tokenizer, or use the student the cache was made for")
        fp, n = m["dataset"]["fingerprint"], m["dataset"]["n_examples"]
        if fp != train_ds.fingerprint or n != len(train_ds):
            raise CacheError(f"{where} was captured on another tokenized dataset ({n} examples, fingerprint "
                             f"{fp[:12]}) than this run's ({len(train_ds)} examples, {train_ds.fingerprint[:12]}): "
                             "the data section (source, max_length, packing, ...) or train.seed differs; "
                             "capture the cache with this config")
        lc = loss_cfg.logits
        if abs(float(m["temperature"]) - lc.temperature) > 1e-12:
            raise ConfigError(f"{where} holds teacher log-probs at temperature {m['temperature']}, the run asks "
                              f"for loss.logits.temperature={lc.temperature}: set it to {m['temperature']} or "
                              "capture again")
        if lc.weight > 0:
            if m["kind"] == "sampled" and lc.divergence != "fkl":
                raise ConfigError(f"loss.logits.divergence={lc.divergence} is not defined for sampled tokens "
                                  f"({where} is a sampled cache): use fkl")
            if lc.missing_mass == "renormalize" and lc.divergence != "fkl":
                raise ConfigError(f"loss.logits.divergence={lc.divergence} is not defined for a renormalized top-k "
                                  "teacher (it is 0 outside the k ids): use fkl, or loss.logits.missing_mass=rest")
            if lc.divergence not in SPARSE_DIVERGENCES:
                raise ConfigError(f"loss.logits.divergence={lc.divergence} has no sparse version for a teacher "
                                  f"cache: use {', '.join(SPARSE_DIVERGENCES)}")
        self.kind = m["kind"]
        self.vocab = int(m["teacher"]["vocab_size"])
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
        return {key: torch.from_numpy(np.concatenate([p[key] for p in parts])) for key in parts[0]}

    def chunked_ok(self, loss_cfg) -> bool:
        """Whether the hidden-state (chunked) path has this loss: forward KL, or CE alone."""
        return loss_cfg.logits.weight == 0 or loss_cfg.logits.divergence == "fkl"

    def fused_objective(self, objective: Objective, student_hidden: torch.Tensor, student_head,
                        labels: torch.Tensor, example_indices: list[int]) -> ObjectiveOutput:
        """The same as :meth:`objective` from hidden states (B, T, H) and the student's head, never
        holding B x T x V logits (:func:`potstill.losses.sparse_chunked.sparse_chunked_loss`)."""
        from .losses.sparse_chunked import sparse_chunked_loss

        if student_head.softcap is not None:
            raise ValueError("the cached-teacher chunked path has no logit soft-capping: use loss.path=plain")
        cfg = objective.cfg
        mask = labels[:, 1:] != IGNORE_INDEX
        hidden = student_hidden[:, :-1][mask]
        rows = self.targets(example_indices, mask) if cfg.logits.weight > 0 else {}
        v = min(student_head.weight.shape[0], self.vocab)
        if rows and len(rows["ids"]) and int(rows["ids"].max()) >= v:
            raise CacheError(f"teacher.cache {self.reader.folder}: token id {int(rows['ids'].max())} is outside the "
                             f"student's {student_head.weight.shape[0]} logits: the cache belongs to another vocabulary")
        out = sparse_chunked_loss(hidden, student_head.weight, student_head.bias, labels[:, 1:][mask], rows,
                                  kind=self.kind, missing_mass=cfg.logits.missing_mass,
                                  temperature=cfg.logits.temperature, kd_weight=objective.kd_scale if
                                  cfg.logits.weight > 0 else 0.0, ce_weight=cfg.ce.weight, vocab=v)
        return ObjectiveOutput(weighted_sum=out.weighted_sum, n_valid=out.n_valid, term_sums=dict(out.term_sums))

    def objective(self, objective: Objective, student_logits: torch.Tensor, labels: torch.Tensor,
                  example_indices: list[int]) -> ObjectiveOutput:
        """The run's objective with the sparse logit term: student_logits (B, T, V), labels (B, T)."""
        cfg = objective.cfg
        terms: dict[str, torch.Tensor] = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        s, targets, mask = shift(student_logits, labels)
        if cfg.logits.weight > 0:
            t = {k: v.to(student_logits.device) for k, v in self.targets(example_indices, mask).items()}
            v = min(s.shape[-1], self.vocab)
            if len(t["ids"]) and int(t["ids"].max()) >= v:
                raise CacheError(f"teacher.cache {self.reader.folder}: token id {int(t['ids'].max())} is outside the "
                                 f"student's {s.shape[-1]} logits: the cache belongs to another vocabulary")
            rows = s[mask][:, :v]
            lc = cfg.logits
            if self.kind == "topk":
                kd, _ = topk_divergence(lc.divergence, rows, t["ids"], t["logp"], t["rest"],
                                        missing_mass=lc.missing_mass, temperature=lc.temperature, beta=lc.beta)
            else:
                kd, _ = sampled_forward_kl(rows, t["ids"], t["entropy"], temperature=lc.temperature)
            terms["kd"] = kd.detach()
            total = total + objective.kd_scale * kd
        if cfg.ce.weight > 0:
            ce, _ = cross_entropy(s, targets, ignore_index=IGNORE_INDEX)
            terms["ce"] = ce.detach()
            total = total + cfg.ce.weight * ce
        return ObjectiveOutput(weighted_sum=total, n_valid=count_valid(labels), term_sums=terms)
