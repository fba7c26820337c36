"""The `potstill` command as a user runs it: a real subprocess on tiny models saved to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny
from tiny import assert_one_line_error


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "potstill", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def base_config(tmp_path: Path, teacher_dir: Path, data: Path, **changes) -> dict:
    cfg = {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 64}},
        "data": {"source": str(data), "max_length": 64, "validation_fraction": 0.1},
        "loss": {"logits": {"divergence": "fkl", "temperature": 2.0}, "ce": {"weight": 0.1}},
        "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "precision": "fp32",
                  "checkpoint_every": 3, "keep_checkpoints": 1, "log_every": 1, "warmup_steps": 1},
        "eval": {"every": 3, "max_batches": 2},
        "output": {"dir": str(tmp_path / "run"), "report": False},
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


def test_version_and_help():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("potstill ")
    proc = run_cli("--help")
    assert proc.returncode == 0 and "distill" in proc.stdout and "evaluate" in proc.stdout


def test_distill_chat_data_end_to_end(tmp_path, teacher_dir, chat_jsonl):
    cfg_path = write_config(tmp_path / "run.yaml", **base_config(tmp_path, teacher_dir, chat_jsonl,
                                                                  output__report=True))
    proc = run_cli("distill", str(cfg_path), "--no-progress", env={"POTSTILL_TRAIN__LR": "2e-3"})
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert (run / "student" / "model.safetensors").is_file()
    # Every run leaves pictures and a card a person can read.
    for name in ("report.md", "report.json", "losses.png", "eval.png", "throughput.png"):
        assert (run / "report" / name).is_file(), name
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "student" / "README.md")
    assert "distillation" in card.data.tags and card.data.eval_results
    assert (run / "student" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "student" / "tokenizer.json").is_file()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 2e-3  # the environment variable reached the run
    info = json.loads((run / "run_info.json").read_text())
    assert info["potstill_version"] and "git_commit" in info
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "loss/kd", "loss/ce", "lr", "grad_norm", "tokens_per_s", "step_time_s", "teacher_s", "peak_mem_mb"):
        assert all(key in r for r in train), key
    evals = [r for r in records if "eval/ppl" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]  # 0: the student before training (eval.at_start)
    assert {"eval/ce", "eval/kd", "eval/agreement", "eval/kl"} <= set(evals[-1])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000006"]  # keep_checkpoints=1
    assert "ppl" in proc.stdout

    # The saved student loads with plain transformers, no potstill import.
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(run / 'student')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(run / 'student')!r})\n"
        "ids = t('The teacher', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=4, do_sample=False)\n"
        "assert out.shape[1] == ids.shape[1] + 4\n"
        "assert 'potstill' not in sys.modules\n"
        "print('ok')\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0 and "ok" in loaded.stdout, loaded.stderr

    # evaluate the finished run: its validation split and its teacher.
    proc = run_cli("evaluate", str(run), "--max-batches", "2", "--no-progress", "--json", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["ppl"] > 1 and 0 <= result["agreement"] <= 1 and result["kl"] >= 0
    assert result["ppl"] == pytest.approx(evals[-1]["eval/ppl"], rel=1e-4)

    # A second run into the same folder refuses, and leaves the first run untouched.
    before = (run / "student" / "model.safetensors").read_bytes()
    proc = run_cli("distill", str(cfg_path), "--no-progress")
    assert_one_line_error(proc, "already holds a run", "train.resume=auto", "output.overwrite=true")
    assert (run / "student" / "model.safetensors").read_bytes() == before


def test_text_data_padding_and_student_from_teacher(tmp_path, teacher_dir, text_jsonl):
    cfg = base_config(tmp_path, teacher_dir, text_jsonl, data__packing=False, loss__logits__divergence="jsd",
                      train__max_steps=2, train__checkpoint_every=None)
    cfg["student"] = {"from_teacher": {"layers": [0, 3]}, "gradient_checkpointing": True}
    cfg["train"]["precision"] = "bf16"
    proc = run_cli("distill", str(write_config(tmp_path / "run.yaml", **cfg)), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "precision bf16" in proc.stderr
    student_cfg = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert student_cfg["num_hidden_layers"] == 2 and student_cfg["hidden_size"] == 48


def test_locked_output_dir(tmp_path, teacher_dir, chat_jsonl):
    from potstill.training.checkpoint import RunLock

    cfg_path = write_config(tmp_path / "run.yaml", **base_config(tmp_path, teacher_dir, chat_jsonl))
    with RunLock(tmp_path / "run"):
        proc = run_cli("distill", str(cfg_path), "--no-progress")
    assert_one_line_error(proc, "is in use by pid", "choose another output.dir")


@pytest.mark.parametrize("overrides, fragments", [
    (["loss.logits.temprature=2"], ["unknown config key 'loss.logits.temprature'", "did you mean 'loss.logits.temperature'"]),
    (["loss.logits.temperature=-1"], ["loss.logits.temperature", "greater than 0"]),
    (["loss.logits.beta=1.5"], ["loss.logits.beta", "less than or equal to 1"]),
    (["train.max_steps=many"], ["train.max_steps", "valid integer"]),
    (["teacher.name_or_path=/no/such/model"], ["cannot load the teacher model '/no/such/model'"]),
])
def test_bad_config_is_one_clear_line(tmp_path, teacher_dir, chat_jsonl, overrides, fragments):
    cfg_path = write_config(tmp_path / "run.yaml", **base_config(tmp_path, teacher_dir, chat_jsonl))
    proc = run_cli("distill", str(cfg_path), *overrides)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run" / "student").exists()


def test_debug_shows_the_traceback(tmp_path, teacher_dir, chat_jsonl):
    cfg_path = write_config(tmp_path / "run.yaml", **base_config(tmp_path, teacher_dir, chat_jsonl))
    proc = run_cli("--debug", "distill", str(cfg_path), "loss.logits.beta=2")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = run_cli("distill", str(cfg_path), "loss.logits.beta=2", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_bad_data_is_one_clear_line(tmp_path, teacher_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    cfg_path = write_config(tmp_path / "run.yaml", **base_config(tmp_path, teacher_dir, bad))
    assert_one_line_error(run_cli("distill", str(cfg_path)), "bad.jsonl:2")

    nofield = tiny.write_jsonl(tmp_path / "nofield.jsonl", [{"body": "x"}] * 3)
    cfg_path = write_config(tmp_path / "run2.yaml", **base_config(tmp_path, teacher_dir, nofield,
                                                                   data__format="text"))
    assert_one_line_error(run_cli("distill", str(cfg_path)), "text")

    no_assistant = tiny.write_jsonl(tmp_path / "noasst.jsonl",
                                    [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    cfg_path = write_config(tmp_path / "run3.yaml", **base_config(tmp_path, teacher_dir, no_assistant))
    assert_one_line_error(run_cli("distill", str(cfg_path)), "assistant")


def test_vocab_mismatch_is_one_clear_line(tmp_path, teacher_dir, text_jsonl):
    other_dir = tmp_path / "other_student"
    other_tok = tiny.build_tokenizer(other_dir, vocab_size=300)
    tiny.build_llama(other_dir, len(other_tok), hidden_size=16, layers=1, heads=2, intermediate=32)
    cfg = base_config(tmp_path, teacher_dir, text_jsonl)
    cfg["student"] = {"name_or_path": str(other_dir)}
    # Logits distill across tokenizers (tests/integration/test_cross_tokenizer_runs.py); hidden states
    # are compared token by token, which two tokenizations do not allow.
    cfg["loss"] = {**cfg.get("loss", {}), "hidden": {"weight": 1.0}}
    proc = run_cli("distill", str(write_config(tmp_path / "run.yaml", **cfg)))
    assert_one_line_error(proc, "loss.hidden", "a teacher with another tokenizer", "token by token")
