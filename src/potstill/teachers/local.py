"""A teacher model in this process: a forward pass per micro-batch, no gradients.

On the chunked loss path it gives its final hidden states and its output head (the loss
makes the logits a chunk at a time, never ``B x T x V``); on the plain path its logits.
With feature terms it also captures the mapped layers' activations during that forward.
A forward is skipped where nothing needs it (hard labels only).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from ..data.batching import MicroBatch
from ..features.distiller import FeatureDistiller, capture_teacher
from ..models.heads import head_params
from ..models.hidden import forward_hidden, supports_chunked
from .base import Teacher
from .signal import TeacherSignal


class LocalTeacher(Teacher):
    """A frozen model (quantized or not) on the training device.

    ``needs_logits``: whether the objective has a logit term; ``features``: the run's feature
    terms (their teacher layers are captured), or None; ``autocast``: a zero-argument factory
    of the compute-precision context the forward runs in.
    """

    def __init__(self, model: nn.Module, *, needs_logits: bool, features: FeatureDistiller | None = None,
                 autocast: Callable[[], Any] = contextlib.nullcontext):
        self._model = model
        self.needs_logits = needs_logits
        self.features = features
        self.autocast = autocast
        self.head = None
        self.path = "plain"

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def needs_forward(self) -> bool:
        return self.needs_logits or self.features is not None

    def chunked_problem(self) -> str | None:
        if not self.needs_logits:
            return None  # its head is not used
        head, why = supports_chunked(self._model)
        return None if head is not None else why

    def use_loss_path(self, path: str) -> None:
        self.path = path
        self.head = supports_chunked(self._model)[0] if path == "chunked" and self.needs_logits else None

    @torch.no_grad()
    def signal(self, batch: MicroBatch) -> TeacherSignal:
        if not self.needs_forward:
            return TeacherSignal(kind="none")
        ids, attn = batch.input_ids, batch.attention_mask
        with self.autocast(), capture_teacher(self.features, self._model) as activations:
            if self.path == "chunked":
                hidden = forward_hidden(self._model, self._model, ids, attn)
                # The head as registered now: gathered, when FSDP shards the teacher (training/sharding.py).
                return TeacherSignal(kind="dense", hidden=hidden, head=head_params(self._model) if self.head is not None else None,
                                     activations=activations)
            logits = self._model(input_ids=ids, attention_mask=attn).logits
        return TeacherSignal(kind="dense", logits=logits, activations=activations)
