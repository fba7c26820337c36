"""potstill generate (teacher answers prompts) and stages: (SeqKD on them, then the original data)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny
from potstill.commands.generate import generate
from potstill.errors import ModelError, RunDirError


_cli = tiny.run_cli


def _gen_config(tmp_path, teacher_dir, student_dir, chat_jsonl, **generate) -> Path:
    cfg = {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"name_or_path": str(student_dir)},
        "data": {"source": str(chat_jsonl), "max_length": 64, "max_examples": 24},
        "generate": {"output": str(tmp_path / "gen.jsonl"), "num_generations": 2, "max_new_tokens": 6,
                     "max_prompt_length": 64, "batch_size": 4, "temperature": 1.0, "top_k": 50, **generate},
        "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32", "log_every": 1},
        "output": {"dir": str(tmp_path / "run"), "report": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_generate_writes_rows_skips_long_prompts_and_resumes_identically(tmp_path, teacher_dir, student_dir,
                                                                         chat_jsonl, tokenizer):
    config = _gen_config(tmp_path, teacher_dir, student_dir, chat_jsonl)
    out = _cli("generate", str(config), "--no-progress")
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "gen.jsonl.summary.json").read_text())
    # The rows whose rendered prompt (up to the last user turn) is over 64 tokens are skipped.
    source = [json.loads(line) for line in chat_jsonl.read_text().splitlines()][:24]
    lengths = []
    for r in source:
        msgs = r["messages"]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        lengths.append(len(tokenizer.apply_chat_template(msgs[: last_user + 1], add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)))
    too_long = sum(n > 64 for n in lengths)
    assert 0 < too_long < 24
    assert summary["skipped_too_long"] == too_long and summary["prompts"] == 24 - too_long
    assert f"skipped {too_long} prompts over 64 tokens" in out.stdout
    assert len(rows) == 2 * (24 - too_long)
    assert {r["sample"] for r in rows} == {0, 1}
    first = rows[0]
    assert set(first) == {"prompt", "completion", "teacher", "generation", "prompt_index", "sample"}
    assert first["teacher"] == str(teacher_dir) and first["generation"]["max_new_tokens"] == 6
    assert isinstance(first["prompt"], list) and first["prompt"][-1]["role"] == "user"
    assert any(r["completion"] for r in rows)
    # Stopped midway: the partial file holds 1 whole batch and a torn line (beside it the settings it was
    # made with, as generate writes them); the rerun completes it.
    complete = (tmp_path / "gen.jsonl").read_text().splitlines()
    (tmp_path / "gen.jsonl").unlink()
    (tmp_path / "gen.jsonl.summary.json").unlink()
    partial = tmp_path / "gen.jsonl.partial.jsonl"
    partial.write_text("\n".join(complete[:9]) + "\n" + complete[9][:20])
    (tmp_path / "gen.jsonl.partial.json").write_text(json.dumps(summary["settings"]))
    again = _cli("generate", str(config), "--no-progress")
    assert "continuing after 4 of" in again.stderr
    assert (tmp_path / "gen.jsonl").read_text().splitlines() == complete
    assert not partial.exists() and not (tmp_path / "gen.jsonl.partial.json").exists()
    assert not (tmp_path / "gen.jsonl.lock").exists()
    # parquet output, read back by the data pipeline directly
    _cli("generate", str(config), f"generate.output={tmp_path / 'gen.parquet'}", "--no-progress")
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "gen.parquet")) == len(rows)


def test_generate_then_two_stage_run_with_another_student_tokenizer(tmp_path, tmp_path_factory, teacher_dir,
                                                                    chat_jsonl, text_jsonl):
    """Teacher answers -> student with ANOTHER tokenizer: SeqKD on the text, then CE on the original data."""
    other = tmp_path_factory.mktemp("other-student")
    tok = tiny.build_tokenizer(other, vocab_size=320)
    tiny.build_llama(other, len(tok), hidden_size=32, layers=1, heads=4, intermediate=64, seed=9)
    config = _gen_config(tmp_path, teacher_dir, other, chat_jsonl, max_prompt_length=512)
    _cli("generate", str(config), "--no-progress")
    cfg = yaml.safe_load(config.read_text())
    cfg["loss"] = {"logits": {"weight": 0.0}, "ce": {"weight": 1.0}}
    cfg["stages"] = [{"data.source": str(tmp_path / "gen.jsonl"), "data.max_examples": None},
                     {"data": {"source": str(text_jsonl), "max_length": 32}, "train.lr": 3e-5}]
    config.write_text(yaml.safe_dump(cfg))
    first = _cli("distill", str(config), "--no-progress")
    assert "stage 1 of 2" in first.stderr and "stage 2 of 2" in first.stderr
    s1 = yaml.safe_load((tmp_path / "run" / "stage-1" / "config.yaml").read_text())
    s2 = yaml.safe_load((tmp_path / "run" / "stage-2" / "config.yaml").read_text())
    assert s1["data"]["source"] == str(tmp_path / "gen.jsonl") and s1["student"]["name_or_path"] == str(other)
    assert s2["data"]["source"] == str(text_jsonl) and s2["data"]["max_length"] == 32
    assert s2["student"]["name_or_path"] == str(tmp_path / "run" / "stage-1" / "student")
    assert s2["train"]["lr"] == 3e-5
    for stage in ("stage-1", "stage-2"):
        assert (tmp_path / "run" / stage / "student" / "config.json").is_file()
    # Resume across stages: stage 2 removed (as if killed before it started) -> stage 1 skipped, stage 2 runs.
    import shutil

    shutil.rmtree(tmp_path / "run" / "stage-2")
    again = _cli("distill", str(config), "--no-progress")
    assert "stage 1 of 2: finished earlier" in again.stderr and "stage 2 of 2 ->" in again.stderr
    assert (tmp_path / "run" / "stage-2" / "summary.json").is_file()
    third = _cli("distill", str(config), "--no-progress")
    assert "stage 2 of 2: finished earlier" in third.stderr


def test_bad_stages_and_generate_settings_are_one_line_errors(tmp_path, teacher_dir, student_dir, chat_jsonl):
    config = _gen_config(tmp_path, teacher_dir, student_dir, chat_jsonl, output=str(tmp_path / "gen.csv"))
    proc = _cli("generate", str(config), "--no-progress", check=False)
    assert proc.returncode == 2 and "use a .jsonl or .parquet file" in proc.stderr.splitlines()[-1]
    proc = _cli("distill", str(config), "stages=[{train.lrr: 1}]", "--no-progress", check=False)
    assert proc.returncode == 2 and "stages[1]: unknown config key 'train.lrr'" in proc.stderr


# ----------------------------------------------------------------------------------------
# Never lose or mix output (issue #12)


def _small(teacher, source, output, **generate_settings) -> dict:
    """A config dict for a few quick generations: 8 prompts, batches of 2, 4 new tokens."""
    return {"teacher": {"name_or_path": str(teacher)},
            "data": {"source": str(source), "max_examples": 8},
            "generate": {"output": str(output), "batch_size": 2, "max_new_tokens": 4, "max_prompt_length": 512,
                         "top_k": 50, **generate_settings}}


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _refusal(config) -> str:
    with pytest.raises(RunDirError) as err:
        generate(config, progress=False)
    return str(err.value)


def test_generate_refuses_what_it_did_not_write_before_the_teacher_loads(tmp_path, chat_jsonl):
    """The data itself (file, symlink, folder, glob, validation file), a user's file, a partial file without
    its settings, a parent that is a file: one line each, nothing touched, and no teacher is loaded (the
    teacher path does not even exist: the first thing that loads it fails differently, shown last)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data, val = shutil.copy(chat_jsonl, data_dir / "chat.jsonl"), shutil.copy(chat_jsonl, data_dir / "val.jsonl")
    data, val = Path(data), Path(val)
    (tmp_path / "link.jsonl").symlink_to(data)
    (tmp_path / "mine.jsonl").write_text('{"my": "rows"}\n')
    (tmp_path / "gen.jsonl.partial.jsonl").write_text('{"someone": "else"}\n')
    (tmp_path / "afile").write_text("a file, not a folder")
    before = _files(tmp_path)
    teacher = tmp_path / "no-such-teacher"

    def config(output, source=data, **data_settings):
        cfg = _small(teacher, source, output)
        cfg["data"].update(data_settings)
        return cfg

    joins = "would overwrite or join the data that"
    assert f"generate.output {data} {joins} data.source '{data}'" in _refusal(config(data))
    assert f"{joins} data.source '{data}'" in _refusal(config(tmp_path / "link.jsonl"))
    assert f"{joins} data.validation_source '{val}'" in _refusal(config(val, validation_source=str(val)))
    assert f"{joins} data.source '{data_dir}'" in _refusal(config(data_dir / "new.jsonl", source=data_dir))
    glob = str(data_dir / "*.jsonl")
    assert f"{joins} data.source '{glob}'" in _refusal(config(data_dir / "new.jsonl", source=glob))
    side = _refusal(config(data_dir / "new.parquet", source=glob))
    assert f"(its side file new.parquet.partial.jsonl) {joins} data.source '{glob}'" in side
    mine = _refusal(config(tmp_path / "mine.jsonl"))
    assert f"generate.output {tmp_path / 'mine.jsonl'} exists and was not written by potstill generate" in mine
    assert "move" in mine and "choose another generate.output" in mine
    foreign = _refusal(config(tmp_path / "gen.jsonl"))
    assert f"{tmp_path / 'gen.jsonl.partial.jsonl'} exists without gen.jsonl.partial.json beside it" in foreign
    blocked = _refusal(config(tmp_path / "afile" / "gen.jsonl"))
    assert "cannot create its lock file: the path exists and is not a folder" in blocked
    for message in (mine, foreign, blocked, side):
        assert "\n" not in message
    # Nothing was written, moved or left behind (no lock files either).
    assert _files(tmp_path) == before
    # Past the output checks, the teacher's checks and loading come next: here they fail, and leave nothing.
    with pytest.raises(ModelError) as err:
        generate(config(tmp_path / "fresh.jsonl"), progress=False)
    assert f"teacher model '{teacher}'" in str(err.value)
    assert _files(tmp_path) == before


def test_second_generate_on_one_output_is_refused_naming_the_holder(tmp_path, teacher_dir, chat_jsonl):
    out = tmp_path / "gen.jsonl"
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump(_small(teacher_dir, chat_jsonl, out)))
    holder_code = ("import fcntl, os, socket, sys, time\n"
                   "fh = open(sys.argv[1], 'a+')\n"
                   "fcntl.flock(fh.fileno(), fcntl.LOCK_EX)\n"
                   "fh.write(f'pid {os.getpid()} on {socket.gethostname()}'); fh.flush()\n"
                   "print('locked', flush=True)\n"
                   "time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(tmp_path / "gen.jsonl.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = tiny.run_cli("generate", config, "--no-progress", check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"potstill: error: generate.output {out} is being written by pid {holder.pid} on {socket.gethostname()} "
            f"(lock {tmp_path / 'gen.jsonl.lock'}): wait for that generate to finish, or choose another "
            "generate.output")
        assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl.lock", "gen.yaml"]
    finally:
        holder.kill()  # dies holding the lock: the OS releases it
        holder.wait()
    summary = generate(config, progress=False)
    assert summary["rows"] == 8 and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl", "gen.jsonl.summary.json", "gen.yaml"]


def _cli_with_file_size_limit(limit: int, *args) -> subprocess.CompletedProcess:
    """``potstill ARGS`` where no file may grow past ``limit`` bytes: writes fail as on a full disk (EFBIG)."""
    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "potstill", *map(str, args)], check=False, capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=limit_files,
                          timeout=300)


def test_full_disk_midway_then_resume_only_with_the_same_settings(tmp_path, teacher_dir, chat_jsonl):
    data = Path(shutil.copy(chat_jsonl, tmp_path / "chat.jsonl"))
    whole = tmp_path / "whole.jsonl"
    generate(_small(teacher_dir, data, whole), progress=False)  # uninterrupted, for comparison
    whole_bytes = whole.read_bytes()
    out = tmp_path / "gen.jsonl"
    partial, settings_file = tmp_path / "gen.jsonl.partial.jsonl", tmp_path / "gen.jsonl.partial.json"
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump(_small(teacher_dir, data, out)))
    # The disk fills halfway through: one line, no final file, the partial rows and their settings kept.
    proc = _cli_with_file_size_limit(len(whole_bytes) // 2, "generate", config, "--no-progress")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"potstill: error: generate: appending to {partial}: the file is too large")
    assert f"run potstill generate again with the same settings: it continues from {partial}" in last
    assert not out.exists() and partial.is_file() and settings_file.is_file()
    assert 0 < partial.stat().st_size < len(whole_bytes)
    assert not list(tmp_path.glob(".gen.jsonl.tmp-*")) and not (tmp_path / "gen.jsonl.lock").exists()
    stopped = partial.read_bytes()
    # Resuming with another setting would mix two kinds of rows: refused, naming it.
    message = _refusal(_small(teacher_dir, data, out, temperature=0.5, seed=3))
    assert message.startswith(f"{partial} was made with other settings: generate.temperature (1.0 then, 0.5 now), "
                              "generate.seed (0 then, 3 now): restore them to continue it, or choose another "
                              "generate.output")
    assert partial.read_bytes() == stopped
    # The last step fails (the summary cannot be written): still no final file; the rows are all in the partial.
    (tmp_path / "gen.jsonl.summary.json").mkdir()
    message = _refusal(_small(teacher_dir, data, out))
    assert message.startswith(f"generate: writing {tmp_path / 'gen.jsonl.summary.json'}: the path is a folder")
    assert not out.exists() and not list(tmp_path.glob(".gen.jsonl*tmp-*"))
    assert partial.read_bytes() == whole_bytes
    (tmp_path / "gen.jsonl.summary.json").rmdir()
    # The same settings continue: the file equals the uninterrupted one.
    summary = generate(_small(teacher_dir, data, out), progress=False)
    assert out.read_bytes() == whole_bytes and summary["rows"] == 8
    assert not partial.exists() and not settings_file.exists()
    # Finished: the same settings return its summary; other settings (or other data) are refused.
    assert generate(config, progress=False) == summary
    message = _refusal(_small(teacher_dir, data, out, top_p=0.9))
    assert message == (f"generate.output {out} is finished, with other settings: generate.top_p (1.0 then, 0.9 now): "
                       "restore them to use it, or choose another generate.output")
    with data.open("a") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "one more"}]}) + "\n")
    assert "data.source content (the data changed)" in _refusal(_small(teacher_dir, data, out))
    assert out.read_bytes() == whole_bytes
