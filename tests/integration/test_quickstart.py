"""`potstill quickstart` as a new user runs it: offline, the bundled teacher, the python-docs corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from potstill.commands.quickstart import DEMO_TEACHER

pytestmark = pytest.mark.skipif(not (DEMO_TEACHER / "config.json").is_file(), reason="demo teacher not built")


def test_demo_teacher_loads_with_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER)
    tok = AutoTokenizer.from_pretrained(DEMO_TEACHER)
    n = sum(p.numel() for p in model.parameters())
    assert 15e6 <= n <= 30e6
    assert tok.chat_template and tok.eos_token_id is not None
    size = sum(f.stat().st_size for f in DEMO_TEACHER.iterdir())
    assert size <= 60 * 2**20


@pytest.mark.slow  # unpacks the corpus and tokenizes 5M tokens on a fresh cache: minutes
def test_quickstart_short_run_with_baseline(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "potstill", "quickstart", "--out", str(out), "--steps", "6",
                           "--baseline"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("teacher", "student before", "student, KD", "student, CE only"):
        assert name in proc.stdout
    for path in ("student/model.safetensors", "student/tokenizer.json", "metrics.jsonl", "config.yaml",
                 "results.json", "results.md", "baseline-ce/student/model.safetensors", "student-init/config.json"):
        assert (out / path).is_file(), path
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "results.json").read_text())["results"]
    assert rows["teacher"]["ppl"] < rows["student before"]["ppl"]
    assert rows["student, KD"]["ppl"] < rows["student before"]["ppl"]
    ratio = rows["teacher"]["params"] / rows["student, KD"]["params"]
    assert 4 <= ratio <= 8, ratio
    # Running it again continues the finished run instead of failing or starting over.
    again = subprocess.run([sys.executable, "-m", "potstill", "quickstart", "--out", str(out), "--steps", "6"],
                           env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
