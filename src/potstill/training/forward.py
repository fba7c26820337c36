"""The student's forward pass for one micro-batch, in the form its loss path needs.

Chunked path: the final hidden states (B, T, H) and the output head, never ``B x T x V``
logits (:func:`potstill.models.hidden.forward_hidden`); plain path: the logits. The call
goes through the wrapped model (DDP), so gradient synchronization still sees it. Feature
terms' student layers are captured during the same forward.
"""

from __future__ import annotations

from torch import nn

from ..data.batching import MicroBatch
from ..features.distiller import FeatureDistiller, capture_student
from ..models.heads import HeadParams, head_params
from ..models.hidden import forward_hidden
from .objective import StudentOutput


class StudentForward:
    """``model``: the (possibly wrapped) student to call; ``raw``: the unwrapped model (hooks,
    head); ``head``: its head params on the chunked path (re-read after each forward), None on
    the plain path."""

    def __init__(self, model: nn.Module, raw: nn.Module, head: HeadParams | None,
                 features: FeatureDistiller | None = None):
        self.model, self.raw, self.head, self.features = model, raw, head, features

    def __call__(self, batch: MicroBatch) -> StudentOutput:
        ids, attn = batch.input_ids, batch.attention_mask
        with capture_student(self.features, self.raw) as activations:
            if self.head is not None:
                hidden = forward_hidden(self.model, self.raw, ids, attn)
                # Read now, not kept from before: under FSDP the gathered head is registered only
                # between the forward and the end of backward (training/sharding.py).
                return StudentOutput(hidden=hidden, head=head_params(self.raw), activations=activations)
            logits = self.model(input_ids=ids, attention_mask=attn).logits
        return StudentOutput(logits=logits, activations=activations)
