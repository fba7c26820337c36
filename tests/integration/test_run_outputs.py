"""What a finished run leaves for a person: the step-0 point, whole-run throughput that leaves
evaluation out, bits per byte, the report and the model card; `potstill evaluate` on text
with and without packing; the checks of output.push_to_hub before any training."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml

import tiny
from tiny import assert_one_line_error
from potstill import distill
from potstill.training import loop


def _config(tmp_path, teacher_dir, data, **eval_keys) -> dict:
    cfg = tiny.run_config(tmp_path / "run", teacher_dir, data, eval={"every": 3, "max_batches": 1, **eval_keys},
                          checkpoint_every=3)
    return cfg


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_step_zero_point_and_whole_run_throughput_without_evaluation(tmp_path, teacher_dir, chat_jsonl,
                                                                     monkeypatch):
    """Evaluation made slow on purpose (a real evaluation after a pause): tokens/s over the run and in
    each window counts training time only; the pause shows up as evaluation time."""
    pause = 1.5  # far above a tiny step's time, even on a loaded machine
    real = loop.evaluate_models

    def slow_evaluation(*args, **kwargs):
        time.sleep(pause)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_models", slow_evaluation)
    cfg = _config(tmp_path, teacher_dir, chat_jsonl)
    cfg["output"]["report"] = False
    result = distill(cfg, progress=False)
    records = _records(result.output_dir)
    evals = [r for r in records if "eval/ce" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]  # the student before training, then eval.every
    for r in evals:
        assert r["eval/bpb"] > 0 and r["eval/bytes"] > r["eval/tokens"] > 0
        assert r["eval/teacher_bpb"] > 0
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["initial_eval"] == {k.removeprefix("eval/"): v for k, v in evals[0].items() if k != "step"}
    overall = summary["train_overall"]
    assert overall["steps"] == 6 and overall["tokens"] > 0
    assert overall["eval_time_s"] >= 3 * pause
    assert overall["train_time_s"] + overall["eval_time_s"] + overall["checkpoint_time_s"] <= overall["wall_time_s"]
    assert overall["tokens_per_s"] == pytest.approx(overall["tokens"] / overall["train_time_s"])
    # The window right after the mid-run evaluation (step 4) is not slowed down by it (step 1 also
    # follows one, but the first step of a process carries its own warm-up).
    train = {r["step"]: r for r in records if "loss" in r}
    assert train[4]["step_time_s"] < pause, train[4]["step_time_s"]
    assert summary["hardware"]["device"] == "cpu" and summary["hardware"]["processes"] == 1
    assert summary["teacher_parameters"] > summary["student_parameters"] > 0


def test_no_step_zero_point_when_switched_off(tmp_path, teacher_dir, chat_jsonl):
    cfg = _config(tmp_path, teacher_dir, chat_jsonl, at_start=False)
    cfg["output"]["report"] = False
    result = distill(cfg, progress=False)
    assert [r["step"] for r in _records(result.output_dir) if "eval/ce" in r] == [3, 6]
    assert json.loads((result.output_dir / "summary.json").read_text())["initial_eval"] == {}


def test_evaluate_scores_every_token_without_packing_and_says_what_packing_drops(tmp_path, teacher_dir,
                                                                                   chat_jsonl):
    data = tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.chat_rows(9, seed=11))
    out = {}
    for flag in ("", "--packing"):
        json_path = tmp_path / f"eval{flag}.json"
        proc = tiny.run_cli("evaluate", teacher_dir, "--data", data, "--max-length", "200", "--no-progress",
                            "--json", json_path, *([flag] if flag else []))
        assert "data evaluation" in proc.stderr and "data train" not in proc.stderr
        assert "scored" in proc.stderr
        out[flag] = (json.loads(json_path.read_text()), proc.stderr)
    whole, packed = out[""][0], out["--packing"][0]
    assert whole["tokens"] > packed["tokens"]  # the tail block packing drops
    assert "nothing dropped" in out[""][1]
    assert "dropped by the last partial block (packing)" in out["--packing"][1]
    assert whole["bpb"] > 0 and whole["bytes"] > whole["tokens"]


@pytest.mark.parametrize("repo, env, fragments", [
    ("not a repo id!", {}, ("output.push_to_hub", "is not a Hub repository id")),
    ("me/tiny-student", {"HF_HUB_OFFLINE": "1"}, ("HF_HUB_OFFLINE is set",)),
    ("me/tiny-student", {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "HF_HOME": "<tmp>"}, ("needs a Hub token",)),
])
def test_push_to_hub_is_checked_before_training(tmp_path, teacher_dir, chat_jsonl, repo, env, fragments,
                                                 monkeypatch):
    cfg = _config(tmp_path, teacher_dir, chat_jsonl)
    cfg["output"].update(push_to_hub=repo, report=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for key, value in env.items():
        monkeypatch.setenv(key, str(tmp_path / "hf-home") if value == "<tmp>" else value)
    if "HF_TOKEN" in env:
        monkeypatch.delenv("HF_TOKEN")
    proc = tiny.run_cli("distill", path, "--no-progress", check=False)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_push_to_hub_needs_the_report(tmp_path, teacher_dir, chat_jsonl):
    cfg = _config(tmp_path, teacher_dir, chat_jsonl)
    cfg["output"].update(push_to_hub="me/tiny-student", report=False)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert_one_line_error(tiny.run_cli("distill", path, check=False), "keep output.report=true")


def test_what_push_to_hub_would_upload_is_the_student_folder_with_its_card(tmp_path, teacher_dir, chat_jsonl):
    """The upload itself needs the network (not here); the folder and metadata it sends are checked."""
    from huggingface_hub import ModelCard

    from potstill.commands.hub import upload_plan

    cfg = _config(tmp_path, teacher_dir, chat_jsonl)
    cfg["output"]["report"] = True
    result = distill(cfg, progress=False)
    files = {str(f) for f in upload_plan(result.student_dir)}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "losses.png", "eval.png",
            "throughput.png"} <= files
    assert not any(part.startswith(".") for f in files for part in f.split("/"))
    card = ModelCard.load(result.student_dir / "README.md")
    assert "distillation" in card.data.tags
    assert card.data.to_dict().get("base_model") is None  # a student built from a config: no base model
    assert "](eval.png)" in card.text  # pictures linked beside the card, as uploaded


def test_the_step_zero_evaluation_changes_nothing_in_training(tmp_path, teacher_dir, chat_jsonl):
    """eval.at_start draws no random numbers and touches no weights: the same student either way."""
    from safetensors.torch import load_file

    weights = []
    for at_start in (True, False):
        cfg = tiny.run_config(tmp_path / f"run-{at_start}", teacher_dir, chat_jsonl,
                              eval={"every": 3, "max_batches": 1, "at_start": at_start})
        weights.append(load_file(str(distill(cfg, progress=False).student_dir / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
