"""Stop cleanly when asked: SIGTERM (SLURM, Kubernetes, spot instances) or Ctrl-C.

A signal during long work (training, cache-teacher, generate) only sets a flag; the work
finishes the unit it is in (a step, a shard, a batch of prompts), makes it durable (a
checkpoint, a shard, fsynced rows) and stops with :class:`~potstill.errors.StoppedError`
(exit code 128 + signal), one line that says how to continue. In training all processes
agree first (one tiny all-reduce: a launcher or a scheduler may signal some ranks and not
others). A second Ctrl-C stops at once (what was made durable before it is intact).

    with StopRequest() as stop:
        for step in ...:
            train_step(...)
            if stop.agreed(accelerator):
                save_checkpoint(...)
                raise stop.stopped(f"after step {step}; ... continue with train.resume=auto")
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

from .errors import StoppedError

log = logging.getLogger("potstill")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Catches SIGTERM and SIGINT while active (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signum is None:
            log.warning("%s received: finishing the work in hand, saving it and stopping%s",
                        signal.Signals(signum).name,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.signum = signum

    def agreed(self, accelerator=None) -> int | None:
        """The signal to stop for, if any process got one (the same answer on every process of
        ``accelerator``; None: this process alone)."""
        mine = self.signum or 0
        if accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([mine], dtype=torch.long, device=accelerator.device)
            mine = int(accelerator.reduce(flag, reduction="max").item())
            if mine and self.signum is None:
                self.signum = mine  # another rank was signalled: stop with it
        return mine or None

    def stopped(self, what: str) -> StoppedError:
        """The error to stop with: "stopped by SIGTERM " + ``what`` (when, what was kept, how to go on)."""
        signum = self.signum or signal.SIGTERM
        return StoppedError(f"stopped by {signal.Signals(signum).name} {what}", signum)
