"""Which examples each process sees at each optimizer step (a pure function of the step), and
the :class:`MicroBatch` that carries them through a step.

The example stream is the concatenation of one seeded permutation per epoch. Optimizer
step ``s`` consumes the stream slice ``[s * G, (s + 1) * G)`` with
``G = batch_size * grad_accum * world_size``; within it, micro-batch ``m`` of process ``p``
is the ``(m * world_size + p)``-th run of ``batch_size`` examples. Because the position is
derived from the step alone, resuming needs nothing but the step number and reproduces
the data order exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .tokenized import IGNORE_INDEX, collate


@dataclass
class MicroBatch:
    """One micro-batch of token ids, what every stage of a step (teacher, student, objective) sees.

    ``input_ids`` (B, T) and ``labels`` (B, T, -100 where no loss), ``attention_mask`` (B, T)
    1 on real tokens; ``example_indices`` are the B rows of the tokenized train dataset they
    came from (a teacher cache is keyed by them), ``step`` the optimizer step it belongs to.
    ``origins``: where each row's completion came from ('data', 'student', 'teacher'), None when
    every row is the data's own (see :mod:`potstill.training.onpolicy`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    example_indices: list[int]
    step: int = 0
    origins: list[str] | None = None

    @classmethod
    def collate(cls, dataset, indices: list[int], pad_token_id: int | None, *, step: int = 0) -> "MicroBatch":
        """Right-padded rows ``indices`` of a tokenized dataset (see :func:`~.tokenized.collate`)."""
        b = collate([dataset[i] for i in indices], pad_token_id)
        return cls(b["input_ids"], b["attention_mask"], b["labels"], list(indices), step)

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                          self.example_indices, self.step, self.origins)

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, T-1) bool: the positions whose next-token label counts (``logits[:, :-1]`` predicts
        ``labels[:, 1:]``); a teacher's sparse rows and the objective visit them in this order."""
        return self.labels[:, 1:] != IGNORE_INDEX

    @property
    def n_valid(self) -> torch.Tensor:
        """Positions that count in the loss after the shift: int64 scalar."""
        return self.loss_mask.sum()

    @property
    def n_tokens(self) -> torch.Tensor:
        """Real (non-padding) tokens: int64 scalar."""
        return self.attention_mask.sum()


class StepBatcher:
    def __init__(self, n_examples: int, *, batch_size: int, grad_accum: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0):
        if n_examples <= 0:
            raise ValueError("StepBatcher needs at least one example")
        self.n = n_examples
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.n / self.examples_per_step))

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def _indices(self, start: int, count: int) -> list[int]:
        out = []
        for i in range(start, start + count):
            epoch, pos = divmod(i, self.n)
            out.append(int(self._permutation(epoch)[pos]))
        return out

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's ``grad_accum`` lists of ``batch_size`` example indices for ``step``."""
        base = step * self.examples_per_step
        return [
            self._indices(base + (m * self.world_size + self.rank) * self.batch_size, self.batch_size)
            for m in range(self.grad_accum)
        ]

    def epoch_of(self, step: int) -> float:
        return step * self.examples_per_step / self.n
