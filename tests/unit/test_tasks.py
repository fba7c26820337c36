"""lm-evaluation-harness through potstill.training.tasks: the real harness, the example local
tasks (YAML + jsonl, offline), the demo teacher and a tiny random student."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from potstill.commands.quickstart import DEMO_TEACHER
from potstill.errors import ConfigError
from potstill.training import tasks as T

pytest.importorskip("lm_eval")

TASKS = Path(__file__).resolve().parents[2] / "examples" / "lm-eval-tasks"


@pytest.fixture(scope="module")
def teacher():
    return AutoModelForCausalLM.from_pretrained(DEMO_TEACHER, dtype=torch.float32), \
        AutoTokenizer.from_pretrained(DEMO_TEACHER)


def test_multiple_choice_accuracy_is_the_argmax_of_the_choices_log_likelihoods(teacher):
    model, tok = teacher
    scores = T.run_tasks(model, tok, ["python_docs_mc"], task_paths=[TASKS], limit=4, progress=False)
    rows = [json.loads(line) for line in (TASKS / "python_docs_mc.jsonl").read_text().splitlines()][:4]
    right = 0
    with torch.no_grad():
        for row in rows:
            # As lm-eval scores a continuation: the context's trailing whitespace moves to the
            # continuation, the context alone is tokenized without special tokens, and the
            # continuation is the rest of the tokenized whole.
            context = tok(row["name"], add_special_tokens=False)["input_ids"]
            lls = []
            for choice in row["choices"]:
                whole = tok(f"{row['name']}\n\n{choice}", add_special_tokens=False)["input_ids"]
                assert whole[:len(context)] == context
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].double(), -1)
                targets = torch.tensor(whole[1:])
                lls.append(logp.gather(-1, targets[:, None])[len(context) - 1:].sum().item())
            right += int(max(range(len(lls)), key=lls.__getitem__) == row["answer"])
    assert scores["python_docs_mc"]["acc"] == pytest.approx(right / len(rows))
    assert set(scores["python_docs_mc"]) == {"acc", "acc_norm"}  # no stderr without bootstrap (limit)


def test_both_example_tasks_run_deterministically_and_leave_the_caller_as_it_was(tmp_path, teacher):
    _, tok = teacher
    student = tiny.build_llama(None, len(tok), hidden_size=32, layers=1)
    student.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = T.run_tasks(student, tok, ["python_docs_mc", "python_docs_gen"], task_paths=[TASKS], progress=False)
    assert student.training and torch.equal(torch.get_rng_state(), before)
    second = T.run_tasks(student, tok, ["python_docs_mc", "python_docs_gen"], task_paths=[TASKS], progress=False)
    assert first == second
    assert 0.0 <= first["python_docs_mc"]["acc"] <= 1.0 and "acc_stderr" in first["python_docs_mc"]
    assert 0.0 <= first["python_docs_gen"]["exact_match_strip"] <= 1.0
    flat = T.flatten_task_metrics(first)
    assert flat["python_docs_mc/acc"] == first["python_docs_mc"]["acc"]


def test_local_data_files_resolve_against_the_yaml_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for python_docs_mc.jsonl here
    cfg = T.local_task_config(T.task_manager([TASKS]), "python_docs_mc", [TASKS])
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str(TASKS / "python_docs_mc.jsonl")}
    assert T.local_task_config(T.task_manager([TASKS]), "hellaswag", [TASKS]) is None  # lm-eval's own


@pytest.mark.parametrize("tasks, paths, fragments", [
    (["python_docs_mcq"], [TASKS], ("unknown task 'python_docs_mcq'", "did you mean python_docs_mc")),
    (["hellaswagg"], [], ("unknown task 'hellaswagg'", "hellaswag")),
    (["python_docs_mc"], ["/nowhere/tasks"], ("task folder /nowhere/tasks does not exist",)),
])
def test_bad_tasks_are_one_clear_line(tasks, paths, fragments):
    with pytest.raises(ConfigError) as err:
        T.check_tasks(tasks, paths)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the package raises
    T._MANAGERS.clear()
    with pytest.raises(ConfigError, match=r"potstill\[eval\]"):
        T.check_tasks(["python_docs_mc"], [TASKS])
