"""lm-evaluation-harness tasks in a run and from `potstill evaluate`: the real harness, the local
example tasks (YAML + jsonl, offline), the demo teacher and a tiny student with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tiny
from tiny import assert_one_line_error
from potstill.commands.quickstart import DEMO_TEACHER

pytest.importorskip("lm_eval")  # the [eval] extra; the [test] extra installs it

TASKS = Path(__file__).resolve().parents[2] / "examples" / "lm-eval-tasks"


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    """A two-step run with eval.tasks on the local multiple-choice task."""
    root = tmp_path_factory.mktemp("tasks")
    data = tiny.write_jsonl(root / "text.jsonl", [{"text": s} for s in tiny.synthetic_sentences(80, seed=5)])
    cfg = {
        "teacher": {"name_or_path": str(DEMO_TEACHER)},
        "student": {"config": dict(tiny.TINY_STUDENT)},
        "data": {"source": str(data), "max_length": 64, "validation_fraction": 0.1},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1},
        "eval": {"max_batches": 1, "tasks": ["python_docs_mc"], "task_paths": [str(TASKS)], "task_limit": 6},
        "output": {"dir": str(root / "run"), "tensorboard": False},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = tiny.run_cli("distill", path, "--no-progress")
    return root / "run", path, proc


def test_a_run_scores_its_tasks_before_and_after_and_the_teacher_once(task_run):
    run, _, proc = task_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if any(k.startswith("tasks/") for k in r)}
    assert sorted(scored) == [0, 2]
    for r in scored.values():
        assert 0.0 <= r["tasks/python_docs_mc/acc"] <= 1.0
    teacher = [r for r in records if any(k.startswith("teacher_tasks/") for k in r)]
    assert [r["step"] for r in teacher] == [0]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["tasks"]) == {"student_before", "student", "teacher"}
    assert summary["tasks"]["student"]["python_docs_mc"]["acc"] == scored[2]["tasks/python_docs_mc/acc"]
    assert summary["tasks"]["teacher"]["python_docs_mc"]["acc"] == teacher[0]["teacher_tasks/python_docs_mc/acc"]
    assert "python_docs_mc" in (run / "student" / "README.md").read_text()


def test_evaluate_reruns_the_runs_tasks_and_takes_tasks_by_name(task_run, tmp_path):
    run, _, _ = task_run
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "tasks.json"
    proc = tiny.run_cli("evaluate", run, "--no-progress", "--max-batches", "1", "--json", out)
    result = json.loads(out.read_text())
    assert result["tasks/python_docs_mc/acc"] == summary["tasks"]["student"]["python_docs_mc"]["acc"]
    assert result["teacher_tasks/python_docs_mc/acc"] == summary["tasks"]["teacher"]["python_docs_mc"]["acc"]
    assert "python_docs_mc/acc" in proc.stdout and result["bpb"] > 0
    # A model folder on tasks alone, no text data.
    proc = tiny.run_cli("evaluate", run / "student", "--tasks", "python_docs_gen", "--task-dir", TASKS,
                        "--task-limit", "3", "--no-progress")
    assert "python_docs_gen/" in proc.stdout


def test_bad_task_inputs_are_one_line_before_any_model_loads(task_run, tmp_path):
    run, cfg_path, _ = task_run
    proc = tiny.run_cli("evaluate", run / "student", "--tasks", "python_docs_mcq", "--task-dir", TASKS, check=False)
    assert_one_line_error(proc, "python_docs_mcq")
    proc = tiny.run_cli("evaluate", run / "student", "--tasks", "python_docs_mc", "--task-dir", tmp_path / "nowhere",
                        check=False)
    assert_one_line_error(proc, "nowhere")
    proc = tiny.run_cli("distill", cfg_path, f"output.dir={tmp_path / 'fsdp'}", "train.strategy=fsdp", check=False)
    assert_one_line_error(proc, "eval.tasks", "train.strategy=fsdp", "potstill evaluate")
    proc = tiny.run_cli("distill", cfg_path, f"output.dir={tmp_path / 'bad'}", "eval.tasks=[no_such_task_xyz]",
                        check=False)
    assert_one_line_error(proc, "no_such_task_xyz")
    assert not (tmp_path / "bad" / "student").exists()
