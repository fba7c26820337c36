"""The teacher signal from a server (vLLM): top-k log-probs of the run's own token ids.

``teacher.server: {url: http://gpu-node:8000, top_k: 20}`` in a run loads no teacher model.
:class:`ServedTeacher` checks the server against the run before the first step (it answers,
serves the model, allows ``top_k`` prompt log-probs and the run's sequence length, tokenizes
like the run, and the loss is one a top-k signal feeds exactly), then asks for each
micro-batch's sequences, one request per sequence, at most ``max_concurrency`` in flight.

Overlap: the loop hands the micro-batches of the next ``lookahead`` steps to :meth:`prefetch`
before it trains on the current one; their requests run in a thread pool while the student
computes, so a step costs about max(student step, teacher latency) instead of their sum.
The answer for a micro-batch depends only on its token ids, so when the server is
deterministic (vLLM is, for the same model, dtype and hardware) a resumed run reads the same
targets as an uninterrupted one whatever was in flight when it stopped.

What is exact: the top-k log-probs as the server computes them (its dtype and kernels), the
rest mass as ``1 - sum(top-k)``. Not possible exactly, so refused: a loss temperature other
than 1 (servers return untempered prompt log-probs, and a top-k cannot be re-tempered without
the other logits), divergences with no sparse form, feature terms (no activations).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..config import ServerConfig
from ..data.batching import MicroBatch
from ..errors import ConfigError, ServerError
from .base import Teacher
from .server_client import TeacherServer, empty_rows
from .signal import SparseTargets, TeacherSignal, check_sparse_loss, sparse_chunked_problem

log = logging.getLogger("potstill")

# Texts the tokenizer check sends through the server besides samples of the run's data:
# spaces, digits, accents, CJK, emoji, code and a chat-like line (where tokenizers differ first).
PROBES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  two  spaces,\ttab\nnew line\n\n 3.14159 2026-11-27 1234567890",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, 🤖🚀",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment",
)


def data_probes(tokenizer, train_ds, n: int = 4, max_tokens: int = 64) -> list[str]:
    """Up to ``n`` snippets of the run's own text (decoded from its first examples)."""
    texts = []
    for i in range(min(n, len(train_ds))):
        ids = list(train_ds[i]["input_ids"])[:max_tokens]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.strip():
            texts.append(text)
    return texts


def check_tokenizer(server: TeacherServer, tokenizer, train_ds=None) -> None:
    """:data:`PROBES` and (given ``train_ds``) snippets of the run's own data must tokenize to
    the same ids on the server as with ``tokenizer`` (special tokens off, then on for the
    first text: a BOS the server adds and the run does not shows there); else one line
    showing the first difference."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    texts = list(PROBES) + (data_probes(tokenizer, train_ds) if train_ds is not None else [])
    checks = [(t, False) for t in texts] + [(texts[0], True)]
    for text, special in checks:
        here = list(tokenizer(text, add_special_tokens=special)["input_ids"])
        there = server.tokenize(text, add_special_tokens=special)
        if here != there:
            at = next((i for i, (a, b) in enumerate(zip(here, there)) if a != b), min(len(here), len(there)))
            raise ServerError(
                f"{server.where} tokenizes differently from this run's tokenizer ({name}): {text[:40]!r} "
                f"({'with' if special else 'without'} special tokens) gives {there[at:at + 4]} there and "
                f"{here[at:at + 4]} here at token {at}: serve the teacher with this tokenizer (vLLM --tokenizer), "
                "or distill a student of the teacher's tokenizer")


def connect(cfg: ServerConfig, *, tokenizer, train_ds, loss_cfg, max_length: int) -> TeacherServer:
    """The run's server, checked before any model loads: the loss is one a top-k signal feeds
    exactly, and (when the run has a logit term) the server answers, serves the model, allows
    ``top_k`` prompt log-probs and ``max_length`` tokens, and tokenizes like ``tokenizer`` (on
    :data:`PROBES` and a few of ``train_ds``'s examples). Each failure is one line."""
    lc = loss_cfg.logits
    server = TeacherServer(cfg)
    if lc.weight <= 0:
        return server
    require_untempered(lc.temperature, f"applied to {server.where}")
    check_sparse_loss(lc, kind="topk", where=server.where)
    server.check(top_k=cfg.top_k, max_length=max_length)
    if cfg.check_tokenizer:
        check_tokenizer(server, tokenizer, train_ds)
    return server


def require_untempered(temperature: float, what: str) -> None:
    """Refuse ``loss.logits.temperature`` other than 1 for a served teacher (``what``: "applied to
    <where>", "captured from <where>"): servers return prompt log-probs before temperature, and a
    top-k cannot be re-tempered exactly without the other logits."""
    if temperature != 1.0:
        raise ConfigError(f"loss.logits.temperature={temperature} cannot be {what}: servers return prompt "
                          "log-probs before temperature (vLLM applies no sampling settings to prompt tokens) and a "
                          "top-k cannot be re-tempered exactly without the other logits: set "
                          "loss.logits.temperature=1, or load the teacher in this process (teacher.name_or_path, "
                          "no teacher.server)")


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere). The answers are parsed in worker threads, each
    with its own malloc arena that keeps what the JSON parse freed; giving those pages back after
    each micro-batch keeps the run's resident memory at what it holds, not what it once parsed."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


class ServedTeacher(Teacher):
    """Sparse top-k teacher targets from a server, asked ahead of time (see the module doc).

    ``server``: the run's server as :func:`connect` checked it; ``loss_cfg``: the run's loss
    section; ``student_vocab``: the rows of the student's head (ids at or past it are refused).
    """

    def __init__(self, server: TeacherServer, *, loss_cfg, student_vocab: int):
        cfg = server.cfg
        self.cfg = cfg
        self.server = server
        self.needs_logits = loss_cfg.logits.weight > 0
        self.divergence = loss_cfg.logits.divergence
        self.vocab = student_vocab
        self.lookahead = cfg.lookahead if self.needs_logits else 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[tuple, list[Future | None]] = {}
        if not self.needs_logits:
            return
        self._pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="potstill-teacher")
        log.info("teacher: served %s at %s (top-%d, %d requests at once, %d step(s) ahead), no teacher model loaded",
                 server.model, server.base, cfg.top_k, cfg.max_concurrency, self.lookahead)

    # ---------------------------------------------------------------- requests

    @staticmethod
    def _key(batch: MicroBatch) -> tuple:
        # origins: a sampled completion of an example is another sequence than the data's one
        return (batch.step, tuple(batch.example_indices), tuple(batch.origins or ()))

    def _sequences(self, batch: MicroBatch) -> list[list[int]]:
        """Each row's real tokens (right padding removed): what the server is sent."""
        lengths = batch.attention_mask.sum(1).tolist()
        ids = batch.input_ids.cpu()
        return [ids[i, :n].tolist() for i, n in enumerate(lengths)]

    def _submit(self, batch: MicroBatch) -> list[Future | None]:
        key = self._key(batch)
        if key not in self._pending:
            assert self._pool is not None
            k = self.cfg.top_k
            self._pending[key] = [self._pool.submit(self.server.topk_rows, seq, k) if len(seq) > 1 else None
                                  for seq in self._sequences(batch)]
        return self._pending[key]

    def prefetch(self, batches) -> None:
        if self.needs_logits:
            for batch in batches:
                self._submit(batch)

    def signal(self, batch: MicroBatch) -> TeacherSignal:
        if not self.needs_logits:
            return TeacherSignal(kind="none")
        futures = self._submit(batch)
        del self._pending[self._key(batch)]
        k = self.cfg.top_k
        mask = batch.loss_mask.cpu()
        lengths = batch.attention_mask.sum(1).tolist()
        parts = []
        for i, future in enumerate(futures):
            rows = future.result() if future is not None else empty_rows(k)
            n = max(int(lengths[i]) - 1, 0)  # positions 0 .. n-1 have a next token
            if bool(mask[i, n:].any()):
                raise ServerError(f"{self.server.where}: example {batch.example_indices[i]} has loss positions in its "
                                  "padding; the data are not right-padded as the served teacher expects")
            keep = mask[i, :n].numpy()
            parts.append({key: value[keep] for key, value in rows.items()})
        rows = {key: torch.from_numpy(np.concatenate([p[key] for p in parts])) for key in parts[0]}
        if len(rows["ids"]) and int(rows["ids"].max()) >= self.vocab:
            raise ServerError(f"{self.server.where}: token id {int(rows['ids'].max())} is outside the student's "
                              f"{self.vocab} logits: the server's model has another vocabulary")
        targets = SparseTargets(kind="topk", ids=rows["ids"], vocab=self.vocab, logp=rows["logp"], rest=rows["rest"])
        del futures, parts
        if MALLOC_TRIM is not None:
            MALLOC_TRIM(0)
        return TeacherSignal(kind="sparse", sparse=targets.to(batch.labels.device))

    def chunked_problem(self) -> str | None:
        return sparse_chunked_problem(self.needs_logits, self.divergence, "served teacher")

    def close(self) -> None:
        """Cancel what was asked ahead and not started; stop retries (the process must not wait out a
        dead server's backoff after the run ended)."""
        self.server.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._pending.clear()
