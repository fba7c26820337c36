"""Two real processes (torchrun, gloo on CPU) give the step of one process with grad_accum=2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_equal_accumulation(tmp_path, teacher_dir, text_jsonl):
    cfg = {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 64}},
        # Padding, not packing: micro-batches hold different numbers of valid tokens.
        "data": {"source": str(text_jsonl), "max_length": 48, "packing": False, "validation_fraction": 0.1},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 3e-3, "precision": "fp32", "log_every": 1,
                  "checkpoint_every": 2},
        "eval": {"max_batches": 3},
        "output": {"dir": str(tmp_path / "two"), "tensorboard": False, "report": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "potstill", "distill", str(path), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "potstill", "distill", str(path), "train.grad_accum=2",
                          f"output.dir={tmp_path / 'one'}", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    a, b = _records(tmp_path / "two" / "metrics.jsonl"), _records(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "eval/ppl", "eval/kl", "eval/tokens"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5), (ra["step"], key)
    ckpt = tmp_path / "two" / "checkpoints" / "step-000004"
    assert (ckpt / "rng-0.pt").is_file() and (ckpt / "rng-1.pt").is_file()
    assert two.stdout.count("student saved to") == 1  # only the main process reports
