"""Stop cleanly when asked: SIGTERM (SLURM, Kubernetes, spot instances) or Ctrl-C.

A signal during training only sets a flag; the loop finishes the step it is in, and after
the step all processes agree (one tiny all-reduce: a launcher or a scheduler may signal some
ranks and not others), write a checkpoint and stop with
:class:`~potstill.errors.StoppedError` (exit code 128 + signal). A second Ctrl-C stops at
once (the checkpoint before it is intact: checkpoints are atomic).

    with StopRequest() as stop:
        for step in ...:
            train_step(...)
            if stop.agreed(accelerator):
                save_checkpoint(...); raise stop.error(...)
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

from ..errors import StoppedError

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
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, from the last checkpoint
        if self.signum is None:
            log.warning("%s received: finishing this step, then writing a checkpoint and stopping%s",
                        signal.Signals(signum).name,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.signum = signum

    def agreed(self, accelerator) -> int | None:
        """The signal to stop for, if any process got one (the same answer on every process)."""
        mine = self.signum or 0
        if accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([mine], dtype=torch.long, device=accelerator.device)
            mine = int(accelerator.reduce(flag, reduction="max").item())
            if mine and self.signum is None:
                self.signum = mine  # another rank was signalled: stop with it
        return mine or None

    def error(self, step: int, max_steps: int, checkpoint) -> StoppedError:
        signum = self.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        return StoppedError(f"stopped by {name} after step {step} of {max_steps}; checkpoint {checkpoint} is "
                            "complete: continue with the same command and train.resume=auto", signum)
