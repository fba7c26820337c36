"""train.strategy=fsdp on CUDA: NCCL, the bf16 mixed-precision policy, CPU offload.

Marked ``gpu``: skipped where no CUDA device is present (the CPU paths are in
tests/integration/test_fsdp.py). Uses as many processes as there are devices, at most 2.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from potstill.training.metrics import read_metrics
from tiny import run_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _run(tmp_path: Path, teacher_dir: Path, data: Path, name: str, *overrides: str) -> Path:
    out = tmp_path / name
    cfg = run_config(out, teacher_dir, data, max_steps=6, strategy="fsdp", checkpoint_every=3)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    nproc = min(2, torch.cuda.device_count())
    proc = subprocess.run(["torchrun", "--nproc_per_node", str(nproc), "-m", "potstill", "distill", str(path),
                           *overrides, "--no-progress"], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_fsdp_on_cuda_with_nccl_equals_ddp_in_fp32(tmp_path, teacher_dir, text_jsonl):
    fsdp = _run(tmp_path, teacher_dir, text_jsonl, "fsdp")
    ddp = _run(tmp_path, teacher_dir, text_jsonl, "ddp", "train.strategy=ddp")
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-4)
    a, b = load_file(str(fsdp / "student" / "model.safetensors")), load_file(str(ddp / "student" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in b)


def test_bf16_mixed_precision_policy_and_cpu_offload_on_cuda(tmp_path, teacher_dir, text_jsonl):
    """bf16 compute with fp32 master weights (FSDP's policy), and sharded state kept in CPU memory:
    the run trains and saves an fp32 student."""
    run = _run(tmp_path, teacher_dir, text_jsonl, "policy", "train.precision=bf16",
               "train.fsdp.mixed_precision=true", "train.fsdp.cpu_offload=true")
    losses = _losses(run)
    assert losses[-1] < losses[0]
    weights = load_file(str(run / "student" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
