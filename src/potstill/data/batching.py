"""Which examples each process sees at each optimizer step: a pure function of the step.

The example stream is the concatenation of one seeded permutation per epoch. Optimizer
step ``s`` consumes the stream slice ``[s * G, (s + 1) * G)`` with
``G = batch_size * grad_accum * world_size``; within it, micro-batch ``m`` of process ``p``
is the ``(m * world_size + p)``-th run of ``batch_size`` examples. Because the position is
derived from the step alone, resuming needs nothing but the step number and reproduces
the data order exactly.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


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
