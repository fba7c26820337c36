"""Where the teacher signal comes from: one interface, many sources.

    base.py          Teacher: ``signal(micro_batch) -> TeacherSignal`` (and ``prefetch``), NoTeacher
    signal.py        TeacherSignal (dense | sparse | none, + activations), SparseTargets
    local.py         LocalTeacher: a model in this process (quantized or not)
    cached.py        CachedTeacher: top-k / sampled shards on disk, verified against the run
    aligned.py       a teacher with another tokenizer (online or from a cache with offsets):
                     its top-k at the student positions aligned with its own tokens
    served.py        ServedTeacher: top-k log-probs from a vLLM server, asked ahead of time
    server_client.py the server's HTTP API (prompt log-probs, tokenize, models), retries, parsing
    cache_format.py  the cache on disk: encoding, shards, manifest, checksums
    capture.py       ``potstill cache-teacher``: run a teacher once over the data, write the cache

:func:`build_teacher` picks the source from the config; a new source (a served teacher) is a
new module here and one branch below, and nothing else changes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from torch import nn

from ..config import DistillConfig
from ..features.distiller import FeatureDistiller
from ..models.vocab import output_rows
from .base import NoTeacher, Teacher
from .signal import SparseTargets, TeacherSignal

__all__ = ["Teacher", "NoTeacher", "TeacherSignal", "SparseTargets", "build_teacher", "connect_server"]


def connect_server(cfg: DistillConfig, *, tokenizer, train_ds):
    """The run's teacher server checked against the run (:func:`.served.connect`), or None without
    ``teacher.server``. Called before the models load, so a wrong server costs no loading time."""
    if cfg.teacher.server is None:
        return None
    from .served import connect

    return connect(cfg.teacher.server, tokenizer=tokenizer, train_ds=train_ds, loss_cfg=cfg.loss,
                   max_length=cfg.data.max_length)


def build_teacher(cfg: DistillConfig, *, model: nn.Module | None, student: nn.Module, tokenizer, train_ds,
                  features: FeatureDistiller | None = None, server=None,
                  autocast: Callable[[], Any] = contextlib.nullcontext) -> Teacher:
    """The teacher source of a run: its cache (``teacher.cache``), a server (``teacher.server``;
    ``server`` is the one :func:`connect_server` checked), the model loaded in this process, or
    none (hard labels only)."""
    if cfg.teacher.cache is not None:
        from .cached import CachedTeacher

        return CachedTeacher(cfg.teacher.cache, tokenizer=tokenizer, train_ds=train_ds, loss_cfg=cfg.loss,
                             student_vocab=output_rows(student))
    if cfg.teacher.server is not None:
        from .served import ServedTeacher

        server = server or connect_server(cfg, tokenizer=tokenizer, train_ds=train_ds)
        return ServedTeacher(server, loss_cfg=cfg.loss, student_vocab=output_rows(student))
    if model is not None:
        from .local import LocalTeacher

        return LocalTeacher(model, needs_logits=cfg.loss.logits.weight > 0, features=features, autocast=autocast)
    return NoTeacher()
