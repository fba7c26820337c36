"""`potstill report` over two real tiny runs (KD and cross-entropy only), as subprocesses: each run's
own report/ and model card, the comparison report, and the refusal of a folder potstill did not write."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import tiny
import yaml
from tiny import assert_one_line_error

PNG = b"\x89PNG\r\n\x1a\n"


def cells(row: str) -> list[str]:
    return re.split(r"(?<!\\)\|", row.strip()[1:-1])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, teacher_dir, text_jsonl):
    """A KD run and a cross-entropy-only run of the tiny student, side by side (two processes at once)."""
    root = tmp_path_factory.mktemp("report-runs")
    runs, procs = {}, []
    for name, loss in (("kd", {"ce": {"weight": 0.2}}), ("ce", {"logits": {"weight": 0.0}, "ce": {"weight": 1.0}})):
        cfg = tiny.run_config(root / name, teacher_dir, text_jsonl, loss=loss, eval={"every": 3, "max_batches": 1})
        cfg["output"]["report"] = True  # the default of a run; tiny.run_config turns it off
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen([sys.executable, "-m", "potstill", "distill", str(root / f"{name}.yaml"),
                                       "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}))
        runs[name] = root / name
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err[-3000:]
    return root, runs


def test_each_run_writes_its_report_and_card(two_runs):
    from huggingface_hub import ModelCard

    _, runs = two_runs
    for run in runs.values():
        assert (run / "report" / "report.md").is_file() and (run / "report" / "eval.png").read_bytes()[:8] == PNG
        card = ModelCard.load(run / "student" / "README.md")
        data = card.data.to_dict()
        assert data["library_name"] == "transformers" and "knowledge-distillation" in data["tags"]
        assert "base_model" not in data  # the student was built from a config: random init
        assert {r.metric_type for r in card.data.eval_results} >= {"perplexity", "bits_per_byte"}
        assert (run / "student" / "losses.png").read_bytes()[:8] == PNG and "](losses.png)" in card.text


def test_report_compares_runs(two_runs):
    root, runs = two_runs
    out = root / "compare"
    proc = tiny.run_cli("report", runs["kd"], runs["ce"], "--out", out, "--labels", "KD,CE")
    assert str(out) in proc.stdout
    for name in ("losses.png", "eval.png", "throughput.png"):
        assert (out / name).read_bytes()[:8] == PNG
    md = (out / "report.md").read_text()
    tables = [[cells(line) for line in block.splitlines()] for block in re.findall(r"(?m)(?:^\|.*\|\n?)+", md)]
    assert len(tables) == 3  # one per run, the comparison
    for table in tables:
        assert all(len(row) == len(table[0]) for row in table)
    assert [row[0].strip() for row in tables[2][2:]] == ["KD", "CE"]
    saved = json.loads((out / "report.json").read_text())
    for label, run in (("KD", runs["kd"]), ("CE", runs["ce"])):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "eval/ce" in r]
        metrics = saved["runs"][label]["metrics"]
        assert metrics["ce"]["before"] == evals[0]["eval/ce"] and evals[0]["step"] == 0
        assert metrics["ce"]["after"] == evals[-1]["eval/ce"]
        assert metrics["bpb"]["teacher"] == evals[-1]["eval/teacher_bpb"]
        before, after, teacher = evals[0]["eval/ce"], evals[-1]["eval/ce"], evals[-1]["eval/teacher_ce"]
        # the tiny teacher is untrained: where the student starts at or below its CE there is no gap to close
        expected = (before - after) / (before - teacher) if before > teacher else None
        assert saved["recovery"][label]["ce"] == (pytest.approx(expected) if expected is not None else None)
        losses = {k for r in records for k in r if k.startswith("loss/")}
        assert set(saved["runs"][label]["curves"]["train"]) >= losses | {"loss"}


def test_report_refuses_a_foreign_folder(two_runs):
    root, runs = two_runs
    foreign = root / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("mine")
    proc = tiny.run_cli("report", runs["kd"], "--out", foreign, check=False)
    assert_one_line_error(proc, "not written by potstill")
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]
