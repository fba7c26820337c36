"""Where the tokens of each step come from: the data, in the order :class:`StepBatcher` fixes.

The data order is a pure function of the step, so resuming needs only the step number.
Micro-batches are collated once; a step asked for ahead of time (a teacher that prefetches)
is kept until the loop takes it. On-policy tokens (the student's own samples) are a
different source with the same methods (:mod:`potstill.training.onpolicy`).
"""

from __future__ import annotations

import torch

from ..data.batching import MicroBatch, StepBatcher


class TokenSource:
    """This process's micro-batches of each optimizer step, on the training device."""

    def __init__(self, dataset, batcher: StepBatcher, pad_token_id: int | None, device: torch.device):
        self.dataset, self.batcher, self.pad_token_id, self.device = dataset, batcher, pad_token_id, device
        self._ready: dict[int, list[MicroBatch]] = {}

    def peek(self, step: int) -> list[MicroBatch]:
        """The micro-batches of ``step`` without consuming them (collated once, kept for take)."""
        if step not in self._ready:
            self._ready[step] = [MicroBatch.collate(self.dataset, idx, self.pad_token_id, step=step).to(self.device)
                                 for idx in self.batcher.micro_batches(step)]
        return self._ready[step]

    def take(self, step: int) -> list[MicroBatch]:
        """The micro-batches of ``step``; forgets any earlier step still kept."""
        batches = self.peek(step)
        self._ready = {s: b for s, b in self._ready.items() if s > step}
        return batches

    def after_step(self) -> None:
        """Called after each optimizer step (an on-policy source refreshes its sampler's weights)."""

    def upcoming(self, step: int, lookahead: int, max_steps: int) -> list[MicroBatch]:
        """The micro-batches of the ``lookahead`` steps after ``step`` (for a teacher's prefetch)."""
        return [b for s in range(step + 1, min(step + 1 + lookahead, max_steps)) for b in self.peek(s)]
