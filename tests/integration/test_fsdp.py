"""train.strategy=fsdp: real torchrun processes over gloo, FSDP2 on CPU.

Two FSDP processes give the run of one process with grad_accum=2; a rank killed with -9 and
the run resumed gives the uninterrupted run bit for bit; the saved student is a plain folder
that transformers loads without potstill; what FSDP cannot do is one line.
"""

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
from tiny import assert_one_line_error, run_config, run_torchrun_distill

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _write(tmp_path: Path, name: str, cfg: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(cfg_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_torchrun_distill(cfg_path, *overrides)


def _single(cfg_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "potstill", "distill", str(cfg_path), *overrides, "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=400)


def _train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


def _config(out: Path, teacher_dir: Path, data: Path, **train) -> dict:
    cfg = run_config(out, teacher_dir, data, **{"max_steps": 4, "checkpoint_every": 2, **train})
    # Padding, not packing: micro-batches hold different numbers of valid tokens.
    cfg["data"].update({"packing": False})
    cfg["eval"] = {"max_batches": 3}
    return cfg


@pytest.mark.parametrize("variant", ["chunked", "features", "accumulation"])
def test_two_fsdp_processes_equal_one_process_with_accumulation(tmp_path, teacher_dir, text_jsonl, variant):
    cfg = _config(tmp_path / "two", teacher_dir, text_jsonl, strategy="fsdp")
    if variant == "features":  # a hidden-state term: its projector trains beside the sharded student
        cfg["loss"] = {"ce": {"weight": 0.2}, "hidden": {"weight": 0.5}}
    accum = 2 if variant == "accumulation" else 1  # FSDP reduce-scatters after every micro-batch
    cfg["train"]["grad_accum"] = accum
    path = _write(tmp_path, "run", cfg)
    two = _torchrun(path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _single(path, "train.strategy=ddp", f"train.grad_accum={2 * accum}", f"output.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]

    a, b = read_metrics(tmp_path / "two" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    compared = 0
    for ra, rb in zip(a, b):
        for key in [k for k in rb if k == "loss" or k in ("eval/ppl", "eval/ce", "eval/tokens")]:
            assert ra[key] == pytest.approx(rb[key], rel=1e-6), (ra["step"], key)
            compared += 1
        # Each term to the same absolute precision as the total: a small term such as the KL (a
        # difference of two near-equal cross-entropies) loses relative digits to cancellation.
        for key in [k for k in rb if k.startswith("loss/") or k in ("eval/kl", "eval/kd")]:
            scale = rb.get("loss", rb.get("eval/ce"))
            assert abs(ra[key] - rb[key]) <= 1e-6 * scale, (ra["step"], key, ra[key], rb[key])
            compared += 1
    assert compared >= 12
    wa, wb = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert sorted(wa) == sorted(wb)
    for k in wb:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), k
    ckpt = tmp_path / "two" / "checkpoints" / "step-000004"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["format"] == "sharded" and state["processes"] == 2
    assert (ckpt / "sharded" / ".metadata").is_file() and len(list((ckpt / "sharded").glob("*.distcp"))) == 2
    assert not (ckpt / "optimizer.pt").exists()  # the optimizer state is sharded too
    # Each process holds half of the student's weights, gradients and AdamW state, and of the teacher.
    held = [_train_records(tmp_path / run)[-1]["model_state_mb"] for run in ("two", "one")]
    assert 0.45 * held[1] <= held[0] <= 0.55 * held[1], held
    assert two.stdout.count("student saved to") == 1


def test_fsdp_student_loads_with_plain_transformers(tmp_path, teacher_dir, text_jsonl):
    """The final student is one plain folder: a fresh interpreter that never imports potstill loads it
    and computes the same logits as the weights say."""
    run = tmp_path / "run"
    proc = _torchrun(_write(tmp_path, "run", _config(run, teacher_dir, text_jsonl, strategy="fsdp", max_steps=2)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(run / 'student')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(run / 'student')!r})\n"
        "ids = t('the teacher model learns', return_tensors='pt').input_ids\n"
        "out = m(ids).logits\n"
        "assert torch.isfinite(out).all()\n"
        "assert 'potstill' not in sys.modules\n"
        "print(sum(p.numel() for p in m.parameters()), tuple(out.shape))\n")
    loaded = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    n_params = json.loads((run / "summary.json").read_text())["student_parameters"]
    assert loaded.stdout.split()[0] == str(n_params)


def _workers(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out]


def test_kill_9_of_one_rank_then_resume_equals_the_uninterrupted_run(tmp_path, teacher_dir, text_jsonl):
    cfg = _config(tmp_path / "run", teacher_dir, text_jsonl, strategy="fsdp", max_steps=8, checkpoint_every=2,
                  keep_checkpoints=10)
    path = _write(tmp_path, "run", cfg)
    run = tmp_path / "run"
    proc = subprocess.Popen(["torchrun", "--nproc_per_node", "2", "-m", "potstill", "distill", str(path),
                             "--no-progress"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (run / "checkpoints" / "step-000004").is_dir():
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the kill: " + proc.stderr.read().decode()[-3000:]
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert not (run / "student").exists()
    resumed = _torchrun(path, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    straight = _torchrun(path, f"output.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    got, want = _train_records(run), _train_records(tmp_path / "straight")
    assert [(r["step"], r["loss"], r["lr"]) for r in got] == [(r["step"], r["loss"], r["lr"]) for r in want]
    a, b = _weights(run), _weights(tmp_path / "straight")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_refusals_are_one_line(tmp_path, teacher_dir, text_jsonl):
    cfg = _config(tmp_path / "run", teacher_dir, text_jsonl, strategy="fsdp")
    path = _write(tmp_path, "run", cfg)
    fp16 = _single(path, "train.precision=fp16")
    assert_one_line_error(fp16, "train.strategy=fsdp", "fp16", "bf16")
    mixed = _single(path, "train.fsdp.mixed_precision=true")
    assert_one_line_error(mixed, "train.fsdp.mixed_precision", "train.precision=bf16")


def test_resume_on_another_number_of_processes(tmp_path, teacher_dir, text_jsonl):
    """Sharded checkpoints reshard on load: 2 processes write it, 1 process (with grad_accum=2, so each
    step sees the same examples) continues it and ends where 2 processes would have; without the
    matching grad_accum the resume is refused in one line that says which value keeps the data."""
    run = tmp_path / "run"
    # A constant schedule: the first part's 3 steps are then the first 3 of the 6.
    path = _write(tmp_path, "run", _config(run, teacher_dir, text_jsonl, strategy="fsdp", max_steps=6,
                                           checkpoint_every=3, scheduler="constant"))
    first = _torchrun(path, "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _single(path, "train.resume=auto")
    assert_one_line_error(refused, "on 1 processes", "written by 2 processes", "set train.grad_accum=2")
    resumed = _single(path, "train.resume=auto", "train.grad_accum=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming on 1 processes" in resumed.stderr
    straight = _torchrun(path, f"output.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    got, want = _train_records(run), _train_records(tmp_path / "straight")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for ra, rb in zip(got, want):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6), ra["step"]
    a, b = _weights(run), _weights(tmp_path / "straight")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in b)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in _train_records(run)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cache", "bitnet", "int8"])
def test_fsdp_with_a_teacher_cache_or_a_bitnet_student_equals_one_process(tmp_path, teacher_dir, text_jsonl, variant):
    """A cached teacher's top-k (sparse loss), a BitNet student (ternary linear layers, plain loss
    path) and an int8 teacher (kept whole on every process) under FSDP give what one process with
    grad_accum=2 gives."""
    cfg = _config(tmp_path / "two", teacher_dir, text_jsonl, strategy="fsdp")
    cfg["student"]["config"]["model_type"] = "llama"  # with a cache there is no teacher to copy it from
    if variant == "bitnet":
        cfg["student"]["bitnet"] = True
    if variant == "int8":
        cfg["teacher"]["quantization"] = "int8"
    path = _write(tmp_path, "run", cfg)
    extra: list[str] = []
    if variant == "cache":
        cfg["cache"] = {"dir": str(tmp_path / "cache"), "k": 8}
        path = _write(tmp_path, "run", cfg)
        captured = subprocess.run([sys.executable, "-m", "potstill", "cache-teacher", str(path), "--no-progress"],
                                  env=ENV, capture_output=True, text=True, timeout=300)
        assert captured.returncode == 0, captured.stderr[-3000:]
        extra = [f"teacher.cache={tmp_path / 'cache'}", f"student.tokenizer={teacher_dir}"]
    two = _torchrun(path, *extra)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _single(path, *extra, "train.strategy=ddp", "train.grad_accum=2", f"output.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-6)
    a, b = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in b)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["train.fsdp.reshard_after_forward=false", "student.gradient_checkpointing=true"])
def test_fsdp_memory_options_keep_the_numbers(tmp_path, teacher_dir, text_jsonl, option):
    """Keeping gathered layers until backward, or recomputing each layer's activations in backward
    (activation checkpointing per layer), changes memory and time, not the training."""
    path = _write(tmp_path, "run", _config(tmp_path / "base", teacher_dir, text_jsonl, strategy="fsdp",
                                           max_steps=3, checkpoint_every=None))
    base = _torchrun(path)
    assert base.returncode == 0, base.stderr[-3000:]
    varied = _torchrun(path, option, f"output.dir={tmp_path / 'varied'}")
    assert varied.returncode == 0, varied.stderr[-3000:]
    assert _losses(tmp_path / "varied") == pytest.approx(_losses(tmp_path / "base"), rel=1e-6)


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_policy(tmp_path, teacher_dir, text_jsonl):
    """train.fsdp.mixed_precision (auto: on with bf16): weights gathered and computed in bf16,
    gradients reduced in fp32, fp32 master weights saved. It trains (the loss falls), it is not
    the autocast run (mixed_precision=false), and the saved student is fp32."""
    cfg = _config(tmp_path / "policy", teacher_dir, text_jsonl, strategy="fsdp", max_steps=6, precision="bf16",
                  checkpoint_every=None)
    path = _write(tmp_path, "run", cfg)
    policy = _torchrun(path)
    assert policy.returncode == 0, policy.stderr[-3000:]
    autocast = _torchrun(path, "train.fsdp.mixed_precision=false", f"output.dir={tmp_path / 'autocast'}")
    assert autocast.returncode == 0, autocast.stderr[-3000:]
    a, b = _losses(tmp_path / "policy"), _losses(tmp_path / "autocast")
    assert a[-1] < a[0]
    assert a != b and a == pytest.approx(b, rel=0.05)
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "policy").values())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher not on PATH")
def test_accelerate_launch(tmp_path, teacher_dir, text_jsonl):
    """`accelerate launch` starts FSDP runs as torchrun does; with Accelerate's own FSDP config the run
    is refused in one line (potstill applies FSDP2 itself)."""
    path = _write(tmp_path, "run", _config(tmp_path / "run", teacher_dir, text_jsonl, strategy="fsdp", max_steps=2))
    # --multi_gpu is Accelerate's torch.distributed launcher; on a machine without GPUs the processes run
    # on the CPUs (gloo). Its --cpu flag would start one process (several need mpirun).
    launch = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    ok = subprocess.run([*launch, "--multi_gpu", "-m", "potstill", "distill", str(path), "--no-progress"], env=ENV,
                        capture_output=True, text=True, timeout=400)
    assert ok.returncode == 0, ok.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["format"] == "sharded" and state["processes"] == 2
    refused = subprocess.run([*launch, "--use_fsdp", "--fsdp_version", "2", "-m", "potstill", "distill", str(path),
                              f"output.dir={tmp_path / 'refused'}", "--no-progress"], env=ENV,
                             capture_output=True, text=True, timeout=400)
    assert refused.returncode != 0
    assert "potstill shards with FSDP2 itself" in refused.stderr, refused.stderr[-3000:]
