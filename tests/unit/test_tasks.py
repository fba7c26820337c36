"""lm-evaluation-harness through potstill.training.tasks: the real harness, the example local
tasks (YAML + jsonl, offline), the demo teacher and a tiny random student."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from potstill.commands.quickstart import DEMO_TEACHER
from potstill.errors import ConfigError, ModelError
from potstill.training import tasks as T

pytest.importorskip("lm_eval")

TASKS = Path(__file__).resolve().parents[2] / "examples" / "lm-eval-tasks"
BOTH = ["python_docs_mc", "python_docs_gen"]


@pytest.fixture(scope="module")
def teacher():
    return AutoModelForCausalLM.from_pretrained(DEMO_TEACHER, dtype=torch.float32), \
        AutoTokenizer.from_pretrained(DEMO_TEACHER)


def test_multiple_choice_accuracy_is_the_argmax_of_the_choices_log_likelihoods(teacher):
    model, tok = teacher
    model.eval()
    limit = 5
    scores = T.run_tasks(model, tok, ["python_docs_mc"], task_paths=[TASKS], limit=limit, progress=False)
    assert not model.training
    rows = [json.loads(line) for line in (TASKS / "python_docs_mc.jsonl").read_text().splitlines()][:limit]
    right = right_norm = 0
    with torch.no_grad():
        for row in rows:
            # As lm-eval scores a choice: context "<name>\n\n<start>", continuation " <choice>"
            # (target_delimiter); the context alone is tokenized without special tokens and the
            # continuation is the rest of the tokenized whole.
            context_text = f"{row['name']}\n\n{row['start']}"
            context = tok(context_text, add_special_tokens=False)["input_ids"]
            lls = []
            for choice in row["choices"]:
                whole = tok(f"{context_text} {choice}", add_special_tokens=False)["input_ids"]
                assert whole[:len(context)] == context
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].double(), -1)
                targets = torch.tensor(whole[1:])
                lls.append(logp.gather(-1, targets[:, None])[len(context) - 1:].sum().item())
            right += int(np.argmax(lls) == row["answer"])
            right_norm += int(np.argmax(np.array(lls) / [len(c) for c in row["choices"]]) == row["answer"])
    mc = scores["python_docs_mc"]
    assert set(mc) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert mc["acc"] == pytest.approx(right / limit) and mc["acc_norm"] == pytest.approx(right_norm / limit)
    # The closed-form stderr of a mean of 0/1 over n examples: n is the limit, not all 38.
    for key in ("acc", "acc_norm"):
        assert mc[f"{key}_stderr"] == pytest.approx(math.sqrt(mc[key] * (1 - mc[key]) / (limit - 1)))


def test_both_example_tasks_run_deterministically_and_leave_the_caller_as_it_was(teacher):
    import lm_eval.evaluator

    _, tok = teacher
    student = tiny.build_llama(None, len(tok), hidden_size=32, layers=1)
    student.train()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    env_info, env = lm_eval.evaluator.add_env_info, os.environ.get("DISABLE_MULTIPROC")
    first = T.run_tasks(student, tok, BOTH, task_paths=[TASKS], batch_size=16, progress=False)
    assert student.training
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert lm_eval.evaluator.add_env_info is env_info and os.environ.get("DISABLE_MULTIPROC") == env
    second = T.run_tasks(student, tok, BOTH, task_paths=[TASKS], batch_size=16, progress=False)
    assert first == second
    assert set(first["python_docs_mc"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(first["python_docs_gen"]) == {"exact_match_first_word", "exact_match_stderr_first_word"}
    assert all(0.0 <= v <= 1.0 for row in first.values() for v in row.values())
    flat = T.flatten_task_metrics(first)
    assert flat["python_docs_mc/acc"] == first["python_docs_mc"]["acc"]
    assert flat["python_docs_gen/exact_match_first_word"] == first["python_docs_gen"]["exact_match_first_word"]
    assert len(flat) == 6


def test_local_data_files_resolve_against_the_yaml_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for python_docs_mc.jsonl here
    manager = T.task_manager([TASKS], ["python_docs_mc"])
    assert "hellaswag" not in manager.all_tasks  # local tasks only: no ~5 s index of lm-eval's own
    cfg = T.local_task_config(manager, "python_docs_mc", [TASKS])
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str(TASKS / "python_docs_mc.jsonl")}
    full = T.task_manager([TASKS], ["python_docs_mc", "hellaswag"])
    assert {"hellaswag", "python_docs_mc"} <= set(full.all_tasks)
    assert T.local_task_config(full, "hellaswag", [TASKS]) is None  # lm-eval's own


@pytest.mark.parametrize("tasks, paths, fragments", [
    (["python_docs_mcq"], [TASKS], ("unknown task 'python_docs_mcq'", "did you mean python_docs_mc", "--task-dir")),
    (["hellaswagg"], [TASKS], ("unknown task 'hellaswagg'", "hellaswag")),
    (["python_docs_mc"], ["/nowhere/tasks"], ("task folder /nowhere/tasks does not exist",)),
    (["python_docs_mc"], [TASKS / "python_docs_mc.jsonl"], ("neither a folder nor a .yaml file",)),
    ([], [TASKS], ("no task names given",)),
])
def test_bad_tasks_are_one_clear_line(tasks, paths, fragments):
    with pytest.raises(ConfigError) as err:
        T.check_tasks(tasks, paths)
    assert "\n" not in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_a_model_lm_eval_cannot_drive_is_refused(teacher):
    _, tok = teacher
    with pytest.raises(ModelError, match="Hugging Face causal LM"):
        T.run_tasks(torch.nn.Linear(2, 2), tok, ["python_docs_mc"], task_paths=[TASKS])


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the package raises
    monkeypatch.setattr(T, "_MANAGERS", {})
    with pytest.raises(ConfigError, match=r"potstill\[eval\]"):
        T.check_tasks(["python_docs_mc"], [TASKS])
