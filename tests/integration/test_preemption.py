"""SIGTERM and Ctrl-C: finish the step, checkpoint, exit 128+signal with one line, resume to the same result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from potstill.training.metrics import read_metrics
from tiny import run_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _config(out: Path, teacher_dir: Path, data: Path, **train) -> dict:
    """A long run (stopped by a signal long before its end) that checkpoints only when stopped."""
    return run_config(out, teacher_dir, data, **{"max_steps": 400, "checkpoint_every": 1000, "warmup_steps": 2,
                                                 **train})


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((r["step"] for r in read_metrics(path) if "loss" in r), default=0)


def _signal_after(proc: subprocess.Popen, run: Path, steps: int, sig: int, pid: int | None = None) -> None:
    """Send ``sig`` once the run has logged ``steps`` steps (to ``pid``, default the process)."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _logged_steps(run) < steps:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal: " + proc.stderr.read().decode()[-3000:]
    os.kill(pid or proc.pid, sig)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("potstill: error:")]


def _stopped_step(run: Path) -> int:
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert len(steps) == 1, steps
    return int(steps[0].removeprefix("step-"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, teacher_dir, text_jsonl, sig, code):
    run = tmp_path / "run"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(run, teacher_dir, text_jsonl)))
    proc = subprocess.Popen([sys.executable, "-m", "potstill", "distill", str(cfg_path), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _signal_after(proc, run, 3, sig)
    stderr = proc.communicate(timeout=240)[1].decode()
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = _error_lines(stderr)
    step = _stopped_step(run)
    assert 3 <= step < 400
    assert f"stopped by {signal.Signals(sig).name} after step {step} of 400" in line and "train.resume=auto" in line
    assert not (run / "student").exists() and not (run / "summary.json").exists()
    # Every step up to the checkpoint is in the log, none after it.
    assert _logged_steps(run) == step

    # Resume to a shorter end (train.max_steps may change on resume) and compare with a straight run.
    end = step + 3
    resumed = subprocess.run([sys.executable, "-m", "potstill", "distill", str(cfg_path), "train.resume=auto",
                              f"train.max_steps={end}", "--no-progress"], env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run([sys.executable, "-m", "potstill", "distill", str(cfg_path), f"train.max_steps={end}",
                               f"output.dir={tmp_path / 'straight'}", "--no-progress"], env=ENV, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    records = [{r["step"]: r for r in read_metrics(d / "metrics.jsonl") if "loss" in r}
               for d in (run, tmp_path / "straight")]
    assert sorted(records[0]) == sorted(records[1]) == list(range(1, end + 1))
    # After the resume the schedule is the new one: lr(step) of a run started with max_steps=end.
    for s in range(step + 1, end + 1):
        assert records[0][s]["lr"] == pytest.approx(records[1][s]["lr"], rel=1e-12), s
    assert records[0][step + 1]["lr"] != records[0][step]["lr"]


def test_sigterm_resume_equals_an_uninterrupted_run(tmp_path, teacher_dir, text_jsonl):
    """Bit-exact: stop a 12-step run by SIGTERM, resume it, compare with the same 12 steps straight."""
    run = tmp_path / "run"
    cfg = _config(run, teacher_dir, text_jsonl, max_steps=60)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "potstill", "distill", str(cfg_path), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _signal_after(proc, run, 4, signal.SIGTERM)
    stderr = proc.communicate(timeout=240)[1].decode()
    assert proc.returncode == 143, stderr[-3000:]
    step = _stopped_step(run)
    resumed = subprocess.run([sys.executable, "-m", "potstill", "distill", str(cfg_path), "train.resume=auto",
                              "--no-progress"], env=ENV, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step-{step:06d}'}" in resumed.stderr
    straight = subprocess.run([sys.executable, "-m", "potstill", "distill", str(cfg_path),
                               f"output.dir={tmp_path / 'straight'}", "--no-progress"], env=ENV,
                              capture_output=True, text=True, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    records = [[r for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (run, tmp_path / "straight")]
    assert [(r["step"], r["loss"], r["lr"]) for r in records[0]] == [(r["step"], r["loss"], r["lr"])
                                                                      for r in records[1]]
    a, b = load_file(str(run / "student" / "model.safetensors")), load_file(
        str(tmp_path / "straight" / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, teacher_dir, text_jsonl):
    """A scheduler may signal one process only: the ranks agree, checkpoint together, and stop."""
    run = tmp_path / "run"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(run, teacher_dir, text_jsonl)))
    proc = subprocess.Popen(["torchrun", "--nproc_per_node", "2", "-m", "potstill", "distill", str(cfg_path),
                             "--no-progress"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and _logged_steps(run) < 3 and proc.poll() is None:
            time.sleep(0.05)
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGTERM)  # one worker only (the newer process: usually rank 1)
        stderr = proc.communicate(timeout=240)[1].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    step = _stopped_step(run)
    ckpt = run / "checkpoints" / f"step-{step:06d}"
    assert (ckpt / "rng-0.pt").is_file() and (ckpt / "rng-1.pt").is_file()  # both ranks wrote their state
    assert json.loads((ckpt / "state.json").read_text())["step"] == step
    assert "stopped by SIGTERM" in stderr
    # Both ranks resume from it and finish.
    resumed = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "potstill", "distill", str(cfg_path),
                              "train.resume=auto", f"train.max_steps={step + 2}", "--no-progress"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "student" / "model.safetensors").is_file()


def _workers(parent: int) -> list[int]:
    """The child processes of torchrun that run potstill."""
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out]


def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.02)
    assert proc.poll() is None, f"{what}: the command ended before the signal: " + proc.stderr.read().decode()[-3000:]


def test_sigterm_stops_generate_after_a_batch_and_it_continues_to_the_same_file(tmp_path, teacher_dir, chat_jsonl):
    def config(out: Path) -> Path:
        cfg = {"teacher": {"name_or_path": str(teacher_dir)}, "data": {"source": str(chat_jsonl)},
               "generate": {"output": str(out), "max_new_tokens": 120, "batch_size": 1, "temperature": 1.0,
                            "max_prompt_length": 256}}
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(cfg))
        return path

    out = tmp_path / "stopped" / "gen.jsonl"
    out.parent.mkdir()
    partial = out.with_name("gen.jsonl.partial.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "potstill", "generate", str(config(out)), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: partial.is_file() and partial.read_text().count("\n") >= 2, proc, "generate")
    os.kill(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=240)[1].decode()
    assert proc.returncode == 143, stderr[-3000:]
    [line] = _error_lines(stderr)
    kept = partial.read_text().count("\n")
    assert f"stopped by SIGTERM after {kept} of " in line and "run the same command again" in line, line
    assert not out.exists()

    resumed = subprocess.run([sys.executable, "-m", "potstill", "generate", str(config(out)), "--no-progress"],
                             env=ENV, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight" / "gen.jsonl"
    straight.parent.mkdir()
    done = subprocess.run([sys.executable, "-m", "potstill", "generate", str(config(straight)), "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [[json.loads(x) for x in p.read_text().splitlines()] for p in (out, straight)]
    assert [(r["prompt_index"], r["completion"]) for r in rows[0]] == [(r["prompt_index"], r["completion"])
                                                                        for r in rows[1]]


def test_sigterm_stops_cache_teacher_after_a_shard_and_it_continues_to_the_same_files(tmp_path, teacher_dir):
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tiny

    data = tiny.write_jsonl(tmp_path / "many.jsonl", [{"text": s} for s in tiny.synthetic_sentences(1500, seed=3)])

    def config(folder: Path) -> Path:
        cfg = {"teacher": {"name_or_path": str(teacher_dir)},
               "data": {"source": str(data), "max_length": 48, "validation_fraction": 0.0},
               "train": {"precision": "fp32", "batch_size": 1},
               "cache": {"dir": str(folder), "k": 4, "examples_per_shard": 1}}
        path = tmp_path / f"{folder.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    folder = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "potstill", "cache-teacher", str(config(folder)), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: len(list(folder.glob("shard-*.npz"))) >= 3, proc, "cache-teacher")
    os.kill(proc.pid, signal.SIGTERM)
    stderr = proc.communicate(timeout=240)[1].decode()
    assert proc.returncode == 143, stderr[-3000:]
    [line] = _error_lines(stderr)
    manifest = json.loads((folder / "manifest.json").read_text())
    n = len(manifest["shards"])
    assert f"stopped by SIGTERM after shard {n} of {manifest['n_shards']}" in line, line
    assert not manifest["complete"] and sorted(p.name for p in folder.glob("shard-*")) == [
        e["file"] for e in manifest["shards"]]

    for cfg in (config(folder), config(tmp_path / "straight")):
        done = subprocess.run([sys.executable, "-m", "potstill", "cache-teacher", str(cfg), "--no-progress"],
                              env=ENV, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
    for shard in sorted((tmp_path / "straight").glob("shard-*.npz")):
        assert (folder / shard.name).read_bytes() == shard.read_bytes(), shard.name
