"""The HTTP client of a teacher served by vLLM (its OpenAI-compatible API), and the parsing
of its prompt log-probs into potstill's sparse rows.

    server = TeacherServer(cfg.teacher.server)          # ServerConfig
    server.check(top_k=20, max_length=512)              # reachable, model, --max-logprobs, --max-model-len
    rows = server.topk_rows([0, 17, 94, ...], k=20)     # (T-1) rows: the teacher at positions 0..T-2

What the server is asked (vLLM 0.32, measured here; see docs/served-teacher.md):

* ``POST /v1/completions`` with ``prompt`` = the run's token ids (a list of ints: nothing is
  re-tokenized), ``prompt_logprobs`` = k and ``max_tokens`` = 1 (vLLM refuses 0). The answer's
  ``choices[0].prompt_logprobs`` has one entry per prompt token: ``None`` for the first, then
  a dict ``{token id: {logprob, rank, ...}}`` holding the top k of that position, plus the
  prompt's own token when it is outside them. Entry ``t + 1`` is the teacher's distribution
  at position ``t`` (the one that predicts token ``t + 1``).
* Prompt log-probs are the model's raw log-softmax: vLLM applies no sampling processors
  (temperature, penalties) to prompt tokens, whatever ``--logprobs-mode`` says.
* A request with ``prompt_logprobs`` never reads the prefix cache (vLLM sets
  ``skip_reading_prefix_cache``), so every position is computed and returned; the parser
  still refuses an answer with missing positions rather than train on a partial target.
* ``POST /tokenize`` (vLLM's own) turns text into the server's token ids: the tokenizer check.
* ``GET /v1/models`` lists the served names with their ``max_model_len``.

Faults: a refused connection, a timeout, HTTP 429 / 5xx or an answer that does not parse are
retried ``retries`` times with a doubling backoff; then one :class:`ServerError` line. A 4xx
other than 429 is the server refusing this request: no retry, its message in the line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import urllib.error
import urllib.request
from typing import Any, Callable

import numpy as np

from ..config import ServerConfig
from ..errors import ServerError

log = logging.getLogger("potstill")

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 30.0


class Refused(Exception):
    """The server answered with an HTTP error it will give again (4xx): not worth a retry."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Unanswered(Exception):
    """No usable answer this time (connection, timeout, 5xx, unparsable): worth a retry."""


def error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``), else its text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:300] or "no message"
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        err = err.get("message") or err.get("detail") or err
    return " ".join(str(err).split())[:300]


class TeacherServer:
    """One served model, reached over HTTP; thread-safe (each call opens its own connection)."""

    def __init__(self, cfg: ServerConfig, *, sleep: Callable[[float], Any] | None = None):
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        if self.base.endswith("/v1"):  # users paste the OpenAI base URL; the tokenizer lives beside /v1
            self.base = self.base[: -len("/v1")]
        self.where = f"teacher.server {cfg.url}"
        self.model = cfg.model
        self.max_model_len: int | None = None
        self._closed = threading.Event()
        self._sleep = sleep or self._closed.wait  # a backoff wait ends early when the client is closed
        self._headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ServerError(f"{self.where}: teacher.server.api_key_env names {cfg.api_key_env}, which is not "
                                  "set in the environment: export it, or drop api_key_env for a server without a key")
            self._headers["Authorization"] = f"Bearer {key}"

    # ------------------------------------------------------------------ transport

    def _once(self, method: str, path: str, body: dict | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=self._headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            message = error_message(err.read() or b"")
            if err.code in RETRY_STATUS:
                raise Unanswered(f"HTTP {err.code}: {message}") from None
            raise Refused(err.code, message) from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise Unanswered(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise Unanswered(f"an answer that is not JSON ({len(raw)} bytes)") from None

    def call(self, method: str, path: str, body: dict | None = None,
             parse: Callable[[Any], Any] = lambda answer: answer) -> Any:
        """``parse(json answer)`` of one request, retried with backoff; :class:`Refused` for a 4xx.

        ``parse`` raises :class:`Unanswered` for an answer it cannot use (missing positions):
        that is retried like a dropped connection."""
        attempts, delay, waited = self.cfg.retries + 1, self.cfg.backoff_s, 0.0
        for attempt in range(attempts):
            if self._closed.is_set():
                raise ServerError(f"{self.where}: the client was closed (the run is ending)")
            try:
                return parse(self._once(method, path, body))
            except Unanswered as err:
                last = str(err)
            if attempt + 1 < attempts:
                log.warning("%s: %s %s: %s; retry %d of %d in %.0f s", self.where, method, path, last, attempt + 1,
                            self.cfg.retries, delay)
                self._sleep(delay)
                waited += delay
                delay = min(MAX_BACKOFF_S, max(delay * 2, 0.1))
        raise ServerError(f"{self.where}: no answer to {method} {path} after {attempts} tries over {waited:.0f} s "
                          f"(last: {last}): check the server is up and reachable (teacher.server.retries, "
                          "timeout_s and backoff_s set the patience)")

    def close(self) -> None:
        """Stop retrying: requests not yet sent and backoff waits end at once (one in flight ends by
        itself, at the latest after ``timeout_s``)."""
        self._closed.set()

    def refused(self, err: Refused, what: str) -> ServerError:
        return ServerError(f"{self.where} refused {what} (HTTP {err.status}): {err.message}")

    # ------------------------------------------------------------------ checks

    def resolve_model(self) -> str:
        """The served model name (``teacher.server.model``, or the only one served); records its
        ``max_model_len``."""
        try:
            answer = self.call("GET", "/v1/models")
        except Refused as err:
            raise self.refused(err, "GET /v1/models") from None
        served = [m for m in answer.get("data", []) if isinstance(m, dict) and "id" in m] \
            if isinstance(answer, dict) else []
        names = [m["id"] for m in served]
        if self.model is None:
            if len(names) != 1:
                raise ServerError(f"{self.where} serves {len(names)} models ({', '.join(names) or 'none'}): name one "
                                  "with teacher.server.model")
            self.model = names[0]
        elif self.model not in names:
            raise ServerError(f"{self.where} does not serve teacher.server.model={self.model}: it serves "
                              f"{', '.join(names) or 'nothing'}")
        length = next(m.get("max_model_len") for m in served if m["id"] == self.model)
        self.max_model_len = int(length) if isinstance(length, int) else None
        return self.model

    def check(self, *, top_k: int, max_length: int | None, setting: str = "teacher.server.top_k") -> None:
        """Before any work: the server answers, serves the model, allows ``top_k`` prompt
        log-probs (``--max-logprobs``; ``setting`` is the config key that asked for them) and
        sequences of ``max_length`` tokens (``--max-model-len``)."""
        self.resolve_model()
        if max_length is not None:
            self.check_length(max_length, f"the run's sequences (data.max_length={max_length})", "data.max_length")
        try:
            self.prompt_logprobs([0, 0], top_k)
        except Refused as err:
            if "prompt logprobs" in err.message.lower() or "max_logprobs" in err.message.lower():
                raise ServerError(f"{self.where} allows fewer prompt log-probs than {setting}={top_k} "
                                  f"({err.message}): restart vLLM with --max-logprobs {top_k} (or more), or lower "
                                  f"{setting}") from None
            raise self.refused(err, f"a request for {top_k} prompt log-probs") from None

    def check_length(self, length: int, needed_by: str, lower: str) -> None:
        """``length`` tokens fit the served context (``--max-model-len``, known once
        :meth:`resolve_model` ran); else one line naming what needs them and what to lower."""
        if self.max_model_len is not None and length > self.max_model_len:
            raise ServerError(f"{self.where} serves {self.model} with --max-model-len {self.max_model_len}, shorter "
                              f"than {needed_by}: restart vLLM with --max-model-len {length}, or lower {lower}")

    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """The server's token ids of ``text`` (vLLM's ``POST /tokenize``)."""
        body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        try:
            answer = self.call("POST", "/tokenize", body)
        except Refused as err:
            if err.status == 404:
                raise ServerError(f"{self.where} has no /tokenize endpoint to check its tokenizer against this run's "
                                  "(vLLM has one): set teacher.server.check_tokenizer=false only if you are sure "
                                  "it serves the same tokenizer") from None
            raise self.refused(err, "POST /tokenize") from None
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise ServerError(f"{self.where}: /tokenize answered without a token list")
        return [int(t) for t in tokens]

    # ------------------------------------------------------------------ teacher signal

    def prompt_logprobs(self, ids: list[int], k: int) -> list:
        """The raw ``prompt_logprobs`` list of one sequence of token ids (len(ids) entries, the first None)."""
        body = {"model": self.model, "prompt": [int(i) for i in ids], "max_tokens": 1, "temperature": 1.0,
                "prompt_logprobs": int(k)}

        def parse(answer):
            try:
                entries = answer["choices"][0]["prompt_logprobs"]
            except (KeyError, IndexError, TypeError):
                raise Unanswered("an answer without choices[0].prompt_logprobs") from None
            if not isinstance(entries, list) or len(entries) != len(ids) or \
                    any(not isinstance(e, dict) for e in entries[1:]):
                got = len(entries) if isinstance(entries, list) else 0
                raise Unanswered(f"prompt log-probs for {got} of {len(ids)} positions (some missing)")
            return entries

        return self.call("POST", "/v1/completions", body, parse=parse)

    def topk_rows(self, ids: list[int], k: int) -> dict[str, np.ndarray]:
        """The teacher's top-``k`` at positions ``0 .. len(ids) - 2`` of one sequence:
        ``ids`` (T-1, k) int64 and ``logp`` (T-1, k) float32, sorted descending, and ``rest``
        (T-1,) float32, the log of the mass outside the k ids (``log(1 - sum p)``; -inf when
        the k ids hold all of it)."""
        if len(ids) < 2:
            return empty_rows(k)
        try:
            entries = self.prompt_logprobs(ids, k)
        except Refused as err:
            raise self.refused(err, f"prompt log-probs for a sequence of {len(ids)} tokens") from None
        try:
            return rows_from_prompt_logprobs(entries[1:], k)
        except ValueError as err:
            raise ServerError(f"{self.where}: {err}") from None


def empty_rows(k: int) -> dict[str, np.ndarray]:
    return {"ids": np.zeros((0, k), np.int64), "logp": np.zeros((0, k), np.float32), "rest": np.zeros(0, np.float32)}


def rows_from_prompt_logprobs(entries: list[dict], k: int) -> dict[str, np.ndarray]:
    """Sparse top-k rows from vLLM's per-position dicts ``{token id: {"logprob", "rank"}}`` (see
    :meth:`TeacherServer.topk_rows`). A position keeps its k most likely ids (by log-prob, then
    rank); the prompt's own token, added by vLLM when it is outside them, is dropped."""
    n = len(entries)
    ids = np.empty((n, k), np.int64)
    logp = np.empty((n, k), np.float64)
    for t, entry in enumerate(entries):
        ranked = sorted(((float(v["logprob"]), int(v.get("rank") or 0), int(tok)) for tok, v in entry.items()),
                        key=lambda x: (-x[0], x[1]))
        if len(ranked) < k:
            raise ValueError(f"position {t} has {len(ranked)} prompt log-probs, fewer than top_k={k}")
        ids[t] = [tok for _, _, tok in ranked[:k]]
        logp[t] = [lp for lp, _, _ in ranked[:k]]
    mass = np.exp(logp).sum(1) if n else np.zeros(0)
    with np.errstate(divide="ignore"):
        rest = np.where(mass < 1.0, np.log1p(-np.minimum(mass, 1.0)), -math.inf)
    return {"ids": ids, "logp": logp.astype(np.float32), "rest": rest.astype(np.float32)}
