"""Peak memory as the run logs report it."""

from __future__ import annotations

import subprocess
import sys

import torch

import json
import logging

from potstill.training.metrics import peak_memory_mb, read_metrics, truncate_after


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


def test_a_torn_or_damaged_metrics_line_is_skipped_with_a_warning(tmp_path, caplog):
    """A write cut short by a kill or a full disk leaves half a line: resume must still read the log."""
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.25}]
    lines = [json.dumps(r) for r in good]
    path.write_bytes(("\n".join([lines[0], "[1, 2]", lines[1], '{"step": "x"}', lines[2]]) + "\n"
                      + '{"step": 4, "lo').encode() + b"\xff")
    with caplog.at_level(logging.WARNING, logger="potstill"):
        assert read_metrics(path) == good
    warned = [r.getMessage() for r in caplog.records]
    assert [w.split(" line ")[1].split(" ")[0] for w in warned] == ["2", "4", "6"], warned
    assert all(str(path) in w for w in warned)
    truncate_after(path, 2)  # what a resume from step 2 does: the damage is gone, the history kept
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in good[:2])
