"""``potstill generate`` with ``teacher.server``: the real vLLM server answers the prompts.

No teacher loads here; ``teacher.tokenizer`` (the demo teacher's folder) renders and counts
the prompts. Chat prompts go to /v1/chat/completions, plain text prompts (generate.chat_template
false) to /v1/completions as token ids.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import tiny
from tcp_proxy import Proxy
from potstill.commands.generate import generate, render
from potstill.errors import ConfigError, RunDirError, ServerError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
LONG_USER_TURN = " ".join(tiny.synthetic_sentences(12, seed=9))  # far over 64 tokens once rendered


def _config(vllm, demo_teacher, source: Path, output: Path, *, url: str | None = None, model: str | None = None,
            server: dict | None = None, **generate_settings) -> dict:
    return {
        "teacher": {"tokenizer": str(demo_teacher),
                    "server": {"url": url or vllm.url, "model": model or vllm.name, **(server or {})}},
        # The default student (cut from the teacher's layers) needs the teacher's weights, which stay in the
        # server; generate trains no student, but the config must name one that does not need them.
        "student": {"config": dict(tiny.TINY_STUDENT)},
        "data": {"source": str(source)},
        "generate": {"output": str(output), "num_generations": 2, "max_new_tokens": 12, "max_prompt_length": 64,
                     "batch_size": 2, **generate_settings},
    }


def _chat_data(path: Path) -> Path:
    """6 chat rows (message lists, some with a system turn and earlier turns); row 3's last user turn
    is too long for max_prompt_length=64."""
    rows = tiny.chat_rows(6, seed=4)
    rows[3] = {"messages": [{"role": "user", "content": LONG_USER_TURN}]}
    return tiny.write_jsonl(path, rows)


def _text_data(path: Path, n: int) -> Path:
    return tiny.write_jsonl(path, [{"prompt": s} for s in tiny.synthetic_sentences(n, seed=5)])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_served_generate_writes_n_answers_per_prompt_and_a_student_trains_on_them(tmp_path, vllm, demo_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_teacher)
    chat = _chat_data(tmp_path / "chat.jsonl")
    out = tmp_path / "gen.jsonl"
    summary = generate(_config(vllm, demo_teacher, chat, out), progress=False)
    rows = _rows(out)
    # Every prompt but the long one, 2 answers each, in prompt order; the long one skipped and counted.
    assert summary["skipped_too_long"] == 1 and summary["prompts"] == 5 and summary["rows"] == 10
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(i, j) for i in (0, 1, 2, 4, 5) for j in (0, 1)]
    source = _rows(chat)
    for r in rows:
        msgs = source[r["prompt_index"]]["messages"]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        assert r["prompt"] == msgs[: last_user + 1]  # the conversation up to its last user turn
        assert r["teacher"] == vllm.name and r["generation"]["chat_template"] is True
    assert sum(bool(r["completion"]) for r in rows) >= 8
    # n samples per prompt are distinct draws (vLLM seeds answer j with the prompt's seed + j).
    assert any(a["completion"] != b["completion"] for a, b in zip(rows[::2], rows[1::2]))
    # The settings name the server, not a local teacher or this machine's device.
    settings = summary["settings"]
    assert settings["teacher.server.url"] == vllm.url and settings["teacher.server.model"] == vllm.name
    assert "device" not in settings and settings["teacher.name_or_path"] is None

    # Plain text prompts (no chat template): /v1/completions with the ids rendered here.
    text = _text_data(tmp_path / "prompts.jsonl", 4)
    plain = tmp_path / "plain.jsonl"
    generate(_config(vllm, demo_teacher, text, plain, chat_template=False), progress=False)
    plain_rows = _rows(plain)
    assert [r["prompt"] for r in plain_rows] == [r["prompt"] for r in _rows(text) for _ in (0, 1)]
    assert all(r["generation"]["chat_template"] is False for r in plain_rows)
    # The same request as token ids and as the text the server tokenizes itself: the same answers, so the ids
    # potstill sent are the prompt (with the BOS the tokenizer adds) and nothing else.
    from potstill.teachers.served_generation import prompt_seed

    first = plain_rows[0]["prompt"]
    assert render(first, tok, None, False) == tok(first)["input_ids"]
    import urllib.request

    body = {"model": vllm.name, "prompt": first, "n": 2, "max_tokens": 12, "temperature": 1.0, "top_p": 1.0,
            "top_k": 0, "seed": prompt_seed(0, 0)}
    req = urllib.request.Request(vllm.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        direct = [c["text"] for c in sorted(json.loads(resp.read())["choices"], key=lambda c: c["index"])]
    assert direct == [r["completion"] for r in plain_rows[:2]]

    # The output is prompt_completion data: a distillation (local demo teacher, tiny student) trains on it.
    cfg = tiny.run_config(tmp_path / "run", demo_teacher, out, max_steps=2, batch_size=2)
    tiny.run_cli("distill", _write_yaml(tmp_path / "distill.yaml", cfg), "--no-progress")
    from potstill.training.metrics import read_metrics

    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert (tmp_path / "run" / "student" / "config.json").is_file()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("potstill: error:")]


def test_sigterm_after_a_batch_then_resume_equals_an_uninterrupted_generate(tmp_path, vllm, demo_teacher):
    """A real subprocess stopped by SIGTERM once its first batch is written, resumed by a second one:
    the file equals one written without a stop (each prompt's seed is its own, whatever ran before)."""
    data = _text_data(tmp_path / "prompts.jsonl", 32)
    settings = {"chat_template": False, "max_new_tokens": 16, "server": {"max_concurrency": 1}}
    out = tmp_path / "stopped" / "gen.jsonl"
    out.parent.mkdir()
    config = _write_yaml(tmp_path / "stopped.yaml", _config(vllm, demo_teacher, data, out, **settings))
    partial = out.with_name("gen.jsonl.partial.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "potstill", "generate", str(config), "--no-progress"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            partial.is_file() and partial.read_text().count("\n") >= 4):  # one batch: 2 prompts x 2 answers
        time.sleep(0.02)
    assert proc.poll() is None, "generate ended before the signal: " + proc.stderr.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 143, stderr[-3000:]
    [line] = _error_lines(stderr)
    kept = partial.read_text().count("\n") // 2
    assert 2 <= kept < 32 and kept % 2 == 0
    assert f"stopped by SIGTERM after {kept} of 32 prompts" in line and "run the same command again" in line, line
    assert not out.exists()

    resumed = subprocess.run([sys.executable, "-m", "potstill", "generate", str(config), "--no-progress"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing after {kept} of 32 prompts" in resumed.stderr
    straight = tmp_path / "straight" / "gen.jsonl"
    straight.parent.mkdir()
    generate(_config(vllm, demo_teacher, data, straight, **settings), progress=False)
    assert len(_rows(out)) == 64
    assert out.read_text() == straight.read_text()  # row for row, byte for byte


def test_same_seed_same_answers_and_a_resume_against_another_server_or_model_is_refused(tmp_path, vllm,
                                                                                          demo_teacher):
    chat = _chat_data(tmp_path / "chat.jsonl")
    first, again, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    summary = generate(_config(vllm, demo_teacher, chat, first, seed=3), progress=False)
    generate(_config(vllm, demo_teacher, chat, again, seed=3), progress=False)
    generate(_config(vllm, demo_teacher, chat, other, seed=4), progress=False)
    completions = [[r["completion"] for r in _rows(p)] for p in (first, again, other)]
    assert completions[0] == completions[1]
    assert completions[0] != completions[2]  # the seed decides the samples

    # Stopped after one batch (the partial rows and their settings, as generate leaves them) ...
    whole = first.read_text()
    first.unlink()
    (tmp_path / "a.jsonl.summary.json").unlink()
    partial, settings_file = tmp_path / "a.jsonl.partial.jsonl", tmp_path / "a.jsonl.partial.json"
    partial.write_text("".join(line + "\n" for line in whole.splitlines()[:4]))
    settings_file.write_text(json.dumps(summary["settings"]))
    kept = partial.read_bytes()
    # ... is not continued by another model or another server: refused before any request (nothing listens
    # on port 9, and the model named is not served).
    with pytest.raises(RunDirError) as err:
        generate(_config(vllm, demo_teacher, chat, first, seed=3, model="another-model"), progress=False)
    assert str(err.value).startswith(f"{partial} was made with other settings: teacher.server.model "
                                     f'("{vllm.name}" then, "another-model" now): restore them to continue it')
    with pytest.raises(RunDirError) as err:
        generate(_config(vllm, demo_teacher, chat, first, seed=3, url="http://127.0.0.1:9"), progress=False)
    assert f'teacher.server.url ("{vllm.url}" then, "http://127.0.0.1:9" now)' in str(err.value)
    assert partial.read_bytes() == kept and settings_file.is_file() and not first.exists()
    # The same server and model continue it to the uninterrupted file.
    finished = generate(_config(vllm, demo_teacher, chat, first, seed=3), progress=False)
    assert finished["rows"] == 10 and first.read_text() == whole
    # Without teacher.server.model the server names its model: the same settings, the finished output as is.
    assert generate(_config(vllm, demo_teacher, chat, first, seed=3, server={"model": None}),
                    progress=False) == finished


def test_prompt_and_answer_longer_than_the_server_context_is_one_line_naming_max_model_len(tmp_path, vllm,
                                                                                        demo_teacher):
    chat = _chat_data(tmp_path / "chat.jsonl")
    out = tmp_path / "out" / "gen.jsonl"
    config = _write_yaml(tmp_path / "gen.yaml", _config(vllm, demo_teacher, chat, out, max_prompt_length=500,
                                                        max_new_tokens=16))
    proc = tiny.run_cli("generate", config, "--no-progress", check=False)
    line = tiny.assert_one_line_error(
        proc, f"serves {vllm.name} with --max-model-len {vllm.max_model_len}",
        "generate.max_prompt_length 500 + generate.max_new_tokens 16 = 516",
        "restart vLLM with --max-model-len 516", code=4)
    assert line.startswith(f"potstill: error: teacher.server {vllm.url} ")
    assert sorted(p.name for p in out.parent.iterdir()) == []  # checked before any row or settings file


def test_greedy_gives_one_answer_per_prompt(tmp_path, vllm, demo_teacher):
    """temperature=0 with several answers per prompt is refused before anything is asked or written (vLLM
    and model.generate would refuse it later); with one answer, greedy answers repeat exactly."""
    data = _text_data(tmp_path / "prompts.jsonl", 4)
    with pytest.raises(ConfigError) as err:
        generate(_config(vllm, demo_teacher, data, tmp_path / "n2.jsonl", url="http://127.0.0.1:9", temperature=0.0),
                 progress=False)
    assert str(err.value) == ("generate.temperature=0 is greedy decoding, which gives one answer per prompt, not "
                              "generate.num_generations=2: set generate.num_generations=1, or a temperature above 0 "
                              "to sample")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]
    outs = [tmp_path / "g1.jsonl", tmp_path / "g2.jsonl"]
    for out, seed in zip(outs, (0, 1)):  # the seed plays no part in greedy answers
        generate(_config(vllm, demo_teacher, data, out, temperature=0.0, num_generations=1, seed=seed,
                         chat_template=False), progress=False)
    first, second = ([r["completion"] for r in _rows(out)] for out in outs)
    assert len(first) == 4 and first == second


def test_a_server_rendering_another_chat_template_is_one_line(tmp_path, vllm, demo_teacher):
    """teacher.tokenizer with a chat template the server does not use: the prompt the server would answer
    is not the one this run rendered and counted, so the first answer is refused in one line."""
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_teacher / name, tok_dir / name)
    template = (demo_teacher / "chat_template.jinja").read_text()
    (tok_dir / "chat_template.jinja").write_text(template.replace("<|im_start|>assistant", "<|im_start|>bot"))
    out = tmp_path / "gen.jsonl"
    cfg = _config(vllm, demo_teacher, _chat_data(tmp_path / "chat.jsonl"), out)
    cfg["teacher"]["tokenizer"] = str(tok_dir)
    with pytest.raises(ServerError) as err:
        generate(cfg, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert f"teacher.server {vllm.url} renders the prompt of data row 0 with its chat template to other tokens" \
           in message and "vLLM --tokenizer, --chat-template" in message
    assert not out.exists() and (tmp_path / "gen.jsonl.partial.jsonl").read_text() == ""
    # The same template as data.chat_template: the prompts rendered with it go as token ids to /v1/completions
    # (vLLM refuses a template sent with a chat request unless started with --trust-request-chat-template).
    cfg["data"]["chat_template"] = template.replace("<|im_start|>assistant", "<|im_start|>bot")
    cfg["generate"]["output"] = str(tmp_path / "own-template.jsonl")
    assert generate(cfg, progress=False)["rows"] == 10


def test_server_gone_midway_is_one_line_keeps_whole_batches_and_the_rerun_continues(tmp_path, vllm, demo_teacher):
    data = _text_data(tmp_path / "prompts.jsonl", 16)
    proxy = Proxy("127.0.0.1", int(vllm.url.rsplit(":", 1)[1]))
    settings = {"chat_template": False,
                "server": {"max_concurrency": 1, "retries": 1, "backoff_s": 0.1, "timeout_s": 30}}
    straight = tmp_path / "straight.jsonl"
    generate(_config(vllm, demo_teacher, data, straight, url=proxy.url, **settings), progress=False)
    out = tmp_path / "gen.jsonl"
    partial = tmp_path / "gen.jsonl.partial.jsonl"

    def cut_after_first_batch():
        deadline = time.time() + 60
        while time.time() < deadline and not (partial.is_file() and partial.read_text().count("\n") >= 4):
            time.sleep(0.005)
        proxy.cut()

    cutter = threading.Thread(target=cut_after_first_batch)
    cutter.start()
    try:
        with pytest.raises(ServerError) as err:
            generate(_config(vllm, demo_teacher, data, out, url=proxy.url, **settings), progress=False)
    finally:
        cutter.join()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"teacher.server {proxy.url}: no answer to POST /v1/completions after 2 tries")
    assert "check the server is up and reachable" in message
    lines = partial.read_text().splitlines()
    assert 4 <= len(lines) < 32 and len(lines) % 4 == 0  # whole batches only
    assert lines == straight.read_text().splitlines()[: len(lines)]
    assert not out.exists()
    proxy.restore()  # the server is back: the same command continues to the uninterrupted file
    generate(_config(vllm, demo_teacher, data, out, url=proxy.url, **settings), progress=False)
    assert out.read_text() == straight.read_text()
    proxy.cut()
