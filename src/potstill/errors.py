"""The one exception type that users see.

Every mistake a user can make (bad config, missing file, malformed data, vocab mismatch,
locked run directory, diverged loss) is raised as :class:`PotstillError` with a message
that says what is wrong, where, and what to do. The CLI prints it as one line and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of a library's error (hub errors put the reason first, then pages of detail)."""
    text = str(err).strip().splitlines()
    return text[0][:limit] if text else type(err).__name__


def one_line(err: BaseException, limit: int = 300) -> str:
    """All of an error's message on one line (some libraries put the reason on the second line)."""
    text = " ".join(str(err).split())
    return text[:limit] if text else type(err).__name__


class PotstillError(Exception):
    """A user-facing error: one clear line, no traceback unless ``--debug``."""

    exit_code = 2


class ConfigError(PotstillError):
    """The configuration is invalid (unknown key, wrong type, out of range)."""


class DataError(PotstillError):
    """The dataset cannot be loaded or formatted (missing field, malformed line, empty)."""


class ModelError(PotstillError):
    """A model or tokenizer cannot be loaded, or teacher and student are incompatible."""


class RunDirError(PotstillError):
    """The output directory is locked by another run, or holds a run we must not clobber."""


class ServerError(PotstillError):
    """A served teacher cannot answer: unreachable, refusing the request, or answering wrong;
    the last good checkpoint is kept."""

    exit_code = 4


class DivergedError(PotstillError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


class StoppedError(PotstillError):
    """The run was asked to stop (SIGTERM, Ctrl-C) and stopped cleanly after a checkpoint.

    The exit code follows the shell's convention for the signal (128 + its number: 143 for
    SIGTERM, 130 for SIGINT), so schedulers see the run was stopped, not that it failed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
