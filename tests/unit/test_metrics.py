"""Peak memory as the run logs report it."""

from __future__ import annotations

import subprocess
import sys

import torch

from potstill.training.metrics import peak_memory_mb


def test_peak_memory_grows_with_an_allocation():
    before = peak_memory_mb(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = peak_memory_mb(torch.device("cpu"))
    assert after >= before and after >= 64  # megabytes, and covering the block
    assert float(block[-1]) == 1.0


def test_a_child_process_does_not_report_its_parents_peak():
    # Linux carries ru_maxrss over fork+exec; the logged peak must be the child's own.
    parent_block = torch.ones(400 * 2**20 // 4)  # 400 MiB held by this process while the child runs
    code = "import torch; from potstill.training.metrics import peak_memory_mb; print(peak_memory_mb(torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_peak = float(out.stdout.strip().splitlines()[-1])
    assert child_peak < peak_memory_mb(torch.device("cpu")) - 300
    assert float(parent_block[0]) == 1.0
