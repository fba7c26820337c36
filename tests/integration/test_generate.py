"""potstill generate (teacher answers prompts) and stages: (SeqKD on them, then the original data)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

import tiny


_cli = tiny.run_cli


def _gen_config(tmp_path, teacher_dir, student_dir, chat_jsonl, **generate) -> Path:
    cfg = {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"name_or_path": str(student_dir)},
        "data": {"source": str(chat_jsonl), "max_length": 64, "max_examples": 24},
        "generate": {"output": str(tmp_path / "gen.jsonl"), "num_generations": 2, "max_new_tokens": 6,
                     "max_prompt_length": 64, "batch_size": 4, "temperature": 1.0, "top_k": 50, **generate},
        "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32", "log_every": 1},
        "output": {"dir": str(tmp_path / "run")},
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
    # Stopped midway: the partial file holds 1 whole batch and a torn line; the rerun completes it.
    complete = (tmp_path / "gen.jsonl").read_text().splitlines()
    (tmp_path / "gen.jsonl").unlink()
    (tmp_path / "gen.jsonl.summary.json").unlink()
    partial = tmp_path / "gen.jsonl.partial.jsonl"
    partial.write_text("\n".join(complete[:9]) + "\n" + complete[9][:20])
    again = _cli("generate", str(config), "--no-progress")
    assert "continuing after 4 of" in again.stderr
    assert (tmp_path / "gen.jsonl").read_text().splitlines() == complete
    assert not partial.exists()
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
