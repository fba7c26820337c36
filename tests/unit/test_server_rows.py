"""Parsing a server's prompt log-probs into sparse top-k rows (a pure function), and the client's
answers when nothing listens: the parts of the served teacher that need no server."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch

from potstill.config import DistillConfig, ServerConfig
from potstill.errors import ServerError
from potstill.teachers.server_client import TeacherServer, error_message, rows_from_prompt_logprobs


def entry(pairs: dict[int, float], *, ranks: dict[int, int] | None = None) -> dict:
    """One position as vLLM sends it: {"id": {"logprob", "rank", "decoded_token"}}."""
    order = sorted(pairs, key=lambda t: -pairs[t])
    ranks = ranks or {t: r + 1 for r, t in enumerate(order)}
    return {str(t): {"logprob": lp, "rank": ranks[t], "decoded_token": f"<{t}>"} for t, lp in pairs.items()}


def test_rows_keep_the_top_k_sorted_and_the_rest_mass():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    lp = p.log().tolist()
    # The prompt's own token (id 4, rank 5) comes first, as vLLM puts it, and is outside the top 3.
    first = {4: lp[4], 0: lp[0], 1: lp[1], 2: lp[2]}
    second = entry({3: lp[0], 1: lp[1], 0: lp[2]})  # prompt token inside the top k: no extra entry
    rows = rows_from_prompt_logprobs([entry(first, ranks={4: 5, 0: 1, 1: 2, 2: 3}), second], 3)
    assert rows["ids"].tolist() == [[0, 1, 2], [3, 1, 0]]
    assert rows["ids"].dtype == np.int64 and rows["logp"].dtype == np.float32 and rows["rest"].dtype == np.float32
    np.testing.assert_allclose(rows["logp"][0], lp[:3], rtol=1e-6)
    np.testing.assert_allclose(rows["rest"], [math.log(0.15), math.log(0.15)], rtol=1e-5)


def test_rest_is_minus_inf_when_the_k_ids_hold_all_the_mass():
    p = [0.75, 0.25]
    rows = rows_from_prompt_logprobs([entry({0: math.log(p[0]), 1: math.log(p[1])})], 2)
    assert rows["rest"][0] == -math.inf


def test_ties_break_by_rank_and_too_few_entries_are_refused():
    tie = -math.log(4)
    rows = rows_from_prompt_logprobs([entry({7: tie, 2: tie, 5: tie}, ranks={7: 4, 2: 1, 5: 2})], 2)
    assert rows["ids"].tolist() == [[2, 5]]
    with pytest.raises(ValueError, match="position 0 has 1 prompt log-probs, fewer than top_k=2"):
        rows_from_prompt_logprobs([entry({1: -0.1})], 2)


def test_no_positions_gives_empty_rows_of_width_k():
    rows = rows_from_prompt_logprobs([], 4)
    assert rows["ids"].shape == (0, 4) and rows["logp"].shape == (0, 4) and rows["rest"].shape == (0,)


def test_error_message_reads_openai_style_bodies():
    body = b'{"error": {"message": "Requested prompt logprobs of 65, which is greater than max allowed: 64"}}'
    assert error_message(body) == "Requested prompt logprobs of 65, which is greater than max allowed: 64"
    assert error_message(b"<html>bad gateway</html>") == "<html>bad gateway</html>"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_a_server_that_is_down_is_retried_with_backoff_then_one_line():
    waits = []
    server = TeacherServer(ServerConfig(url=f"http://127.0.0.1:{closed_port()}/v1", retries=3, backoff_s=0.5),
                           sleep=waits.append)
    with pytest.raises(ServerError) as err:
        server.resolve_model()
    assert waits == [0.5, 1.0, 2.0]
    line = str(err.value)
    assert "\n" not in line and "no answer to GET /v1/models after 4 tries" in line and "ConnectionRefused" in line


def test_a_missing_api_key_variable_is_one_line(monkeypatch):
    monkeypatch.delenv("POTSTILL_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ServerError, match="api_key_env names POTSTILL_TEST_NO_SUCH_KEY, which is not set"):
        TeacherServer(ServerConfig(url="http://127.0.0.1:1", api_key_env="POTSTILL_TEST_NO_SUCH_KEY"))


@pytest.mark.parametrize("extra, message", [
    ({"teacher": {"server": {"url": "http://x"}, "cache": "c"}}, "teacher.server or teacher.cache, not both"),
    ({"teacher": {"server": {"url": "http://x"}}, "loss": {"hidden": {"weight": 1.0}}}, "teacher.server gives the teacher's log-probs only"),
    ({"teacher": {"server": {"url": "http://x"}}, "student": {"from_teacher": {"every": 2}}},
     "student.from_teacher needs the teacher's weights"),
    ({"teacher": {"server": {"url": "http://x"}, "quantization": "int8"}}, "quantize it in the server"),
])
def test_config_refuses_what_a_served_teacher_cannot_do(extra, message):
    from pydantic import ValidationError

    base = {"data": {"source": "x.jsonl"}, "student": {"config": {"model_type": "llama"}}}
    with pytest.raises(ValidationError, match=message):
        DistillConfig.model_validate({**base, **extra})


def test_a_closed_client_stops_retrying_at_once():
    """A run that ended closes its client: a request still queued must not wait out a dead server's backoff."""
    import threading
    import time

    server = TeacherServer(ServerConfig(url=f"http://127.0.0.1:{closed_port()}", retries=50, backoff_s=5.0))
    errors = []

    def ask():
        try:
            server.resolve_model()
        except ServerError as err:
            errors.append(str(err))

    started = time.monotonic()
    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(0.3)  # it is in its first 5 s backoff wait now
    server.close()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 5
    assert errors and "the client was closed" in errors[0]


def test_the_default_student_is_refused_for_distill_only(tmp_path):
    """cache-teacher and generate configs need no student section; distill's default student (cut from
    the teacher) cannot be made from a served teacher, which preflight says in one line."""
    from potstill.errors import ModelError
    from potstill.models.preflight import check_settings

    cfg = DistillConfig.model_validate({"data": {"source": "x.jsonl"}, "teacher": {"server": {"url": "http://x"}}})
    assert cfg.student.from_teacher is not None
    with pytest.raises(ModelError, match="default student.*keeps in its server: give student.name_or_path"):
        check_settings(cfg, "distill")
    check_settings(cfg, "cache-teacher")  # no student needed
