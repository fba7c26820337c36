"""The teacher interface: one question per micro-batch, one answer (a :class:`TeacherSignal`).

The training loop asks ``teacher.signal(batch)`` for the micro-batch it is about to train on
and hands the answer to the objective; it never asks where the signal came from. A source
that answers slowly (an inference server) gets the upcoming micro-batches ahead of time
through :meth:`Teacher.prefetch`, so it can work while the student trains.

Sources: :class:`~potstill.teachers.local.LocalTeacher` (a model in this process) and
:class:`~potstill.teachers.cached.CachedTeacher` (shards on disk) and
:class:`NoTeacher` (hard labels only). A new source subclasses :class:`Teacher` and is
chosen in :func:`potstill.teachers.build_teacher`; the loop and the objective stay as
they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from torch import nn

from ..data.batching import MicroBatch
from .signal import TeacherSignal


class Teacher(ABC):
    """A source of teacher signal for the micro-batches of a run."""

    #: how many optimizer steps ahead the loop hands to :meth:`prefetch` (0: none)
    lookahead: int = 0

    @abstractmethod
    def signal(self, batch: MicroBatch) -> TeacherSignal:
        """The teacher's signal for ``batch`` (already on the training device)."""

    def prefetch(self, batches: Sequence[MicroBatch]) -> None:
        """The micro-batches the loop will ask for next, in order. Sources that can start early
        (a server) do; the default ignores them."""

    def chunked_problem(self) -> str | None:
        """Why this source's signal cannot feed the chunked loss path, or None when it can."""
        return None

    def use_loss_path(self, path: str) -> None:
        """The loss path the run settled on ('chunked' or 'plain'): which dense form to give."""

    @property
    def model(self) -> nn.Module | None:
        """A full model for evaluation metrics (teacher perplexity, KL, agreement), where this
        process holds one; None otherwise."""
        return None

    def summary(self) -> dict | None:
        """What the run's summary.json should say about this source, or None."""
        return None

    def close(self) -> None:
        """Release what the source holds (connections, files)."""


class NoTeacher(Teacher):
    """No teacher signal: hard-label cross-entropy (and nothing else) trains the student."""

    def signal(self, batch: MicroBatch) -> TeacherSignal:
        return TeacherSignal(kind="none")
