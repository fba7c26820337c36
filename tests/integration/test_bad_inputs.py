"""Damaged inputs and bad arguments through the real `potstill` command: one line, no traceback, nothing lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import tiny


def distill_config(tmp_path: Path, teacher: Path, data: Path) -> Path:
    cfg = {"teacher": {"name_or_path": str(teacher)},
           "student": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "intermediate_size": 64}},
           "data": {"source": str(data), "max_length": 32, "validation_fraction": 0.1},
           "train": {"max_steps": 2, "batch_size": 2, "precision": "fp32"},
           "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_truncated_teacher_weights_are_one_line_and_nothing_is_written(tmp_path, teacher_dir, text_jsonl):
    teacher = Path(shutil.copytree(teacher_dir, tmp_path / "teacher"))
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    proc = tiny.run_cli("distill", distill_config(tmp_path, teacher, text_jsonl), "--no-progress", check=False)
    tiny.assert_one_line_error(proc, f"{weights} is damaged", "cut short", "re-download the teacher model", code=2)
    assert not (tmp_path / "run" / "student").exists()


def test_malformed_data_is_reported_before_the_teacher_loads(tmp_path, teacher_dir):
    # This teacher passes every cheap check but fails to load (its weights do not match config.json):
    # the data line can only be reported if the data are read before the teacher loads.
    teacher = Path(shutil.copytree(teacher_dir, tmp_path / "teacher"))
    config = json.loads((teacher / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128)
    (teacher / "config.json").write_text(json.dumps(config))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": s}) + "\n" for s in tiny.synthetic_sentences(17)) + '{"text": "cut\n')
    proc = tiny.run_cli("distill", distill_config(tmp_path, teacher, bad), "--no-progress", check=False)
    tiny.assert_one_line_error(proc, f"{bad}:18:", "malformed JSON", code=2)


def test_student_config_typo_and_overflowing_value_are_one_line(tmp_path, teacher_dir, text_jsonl):
    config = distill_config(tmp_path, teacher_dir, text_jsonl)
    proc = tiny.run_cli("distill", config, "student.config.hiden_size=16", check=False)
    tiny.assert_one_line_error(proc, "student.config.hiden_size", "did you mean 'student.config.hidden_size'?", code=2)
    proc = tiny.run_cli("distill", config, "train.lr=1e400", check=False)
    tiny.assert_one_line_error(proc, "train.lr", "finite number", code=2)


def test_non_utf8_config_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("data: {source: caf\u00e9.jsonl}\n".encode("latin-1"))
    tiny.assert_one_line_error(tiny.run_cli("distill", path, check=False), f"{path}:1:", "not UTF-8", code=2)


def test_evaluate_arguments_are_checked_first(tmp_path, student_dir, text_jsonl):
    proc = tiny.run_cli("evaluate", student_dir, "--data", text_jsonl, "--batch-size", "0", check=False)
    tiny.assert_one_line_error(proc, "--batch-size", "got 0", code=2)
    proc = tiny.run_cli("evaluate", student_dir, "--data", text_jsonl, "--json", tmp_path / "no" / "m.json",
                        check=False)
    tiny.assert_one_line_error(proc, "--json", "does not exist", code=2)
    mine = tmp_path / "mine.json"
    mine.write_text('{"notes": "my own file"}')
    proc = tiny.run_cli("evaluate", student_dir, "--data", text_jsonl, "--json", mine, check=False)
    tiny.assert_one_line_error(proc, "--json", "is not an earlier potstill evaluate result", code=2)
    assert mine.read_text() == '{"notes": "my own file"}'
    ours = tmp_path / "eval.json"
    for _ in range(2):  # an earlier result of evaluate is replaced
        tiny.run_cli("evaluate", student_dir, "--data", text_jsonl, "--max-batches", "1", "--json", ours)
    assert json.loads(ours.read_text())["ppl"] > 1


def test_library_warnings_do_not_carry_the_potstill_prefix():
    code = ("import logging; from potstill.commands.cli import setup_logging; setup_logging(False); "
            "logging.getLogger('torch.distributed').warning('a library speaks'); "
            "logging.getLogger('potstill').info('potstill speaks'); setup_logging(False); "
            "logging.getLogger('potstill').warning('once')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = proc.stderr.splitlines()
    assert "torch.distributed: WARNING: a library speaks" in lines
    assert "potstill: potstill speaks" in lines
    assert lines.count("potstill: once") == 1  # set up twice, printed once
    assert not any(line.startswith("potstill:") and "library" in line for line in lines)


def test_missing_teacher_cache_is_one_line(tmp_path, teacher_dir, text_jsonl):
    config = distill_config(tmp_path, teacher_dir, text_jsonl)
    proc = tiny.run_cli("distill", config, f"teacher.cache={tmp_path / 'no-cache'}", "student.config.model_type=llama",
                        f"student.tokenizer={teacher_dir}", check=False)
    tiny.assert_one_line_error(proc, f"{tmp_path / 'no-cache'} is not a teacher cache", "potstill cache-teacher", code=2)
