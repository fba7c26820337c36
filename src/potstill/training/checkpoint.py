"""Run directory lock, atomic writes, checkpoints and resume.

A checkpoint is a folder ``checkpoints/step-000120/`` holding everything needed to
continue bit-exactly: student weights (safetensors), optimizer and scheduler state, each
process's RNG state, and ``state.json`` (written last). It is first written under a
temporary name in the same directory, fsynced, then renamed, so a run killed at any
moment leaves either a complete checkpoint or none: never half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RunDirError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------------
# Lock


class RunLock:
    """An exclusive ``flock`` on ``<run>/.potstill.lock``; released by the OS if the process dies."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".potstill.lock"
        self._fh = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunDirError(
                f"output directory {self.path.parent} is in use by {holder}: wait for that run to finish "
                "or choose another output.dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temp_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where every process writes its part of checkpoint ``step`` before it is published."""
    return Path(run_dir) / CHECKPOINT_DIR / f".tmp-step-{step:06d}"


def final_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:06d}"


def write_process_state(tmp: Path, rank: int) -> None:
    """Each process saves its own RNG state into the shared temporary folder."""
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")


def write_main_state(tmp: Path, *, model, tokenizer, optimizer, scheduler, state: dict[str, Any],
                     extra_modules: dict[str, torch.nn.Module] | None = None) -> None:
    """The main process writes weights, optimizer, scheduler and, last, state.json."""
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp / "student", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "student")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for name, module in (extra_modules or {}).items():
        torch.save(module.state_dict(), tmp / f"{name}.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINT_DIR
    # Leftovers of a save that was killed midway are never valid; drop them.
    for child in root.glob(".tmp-step-*"):
        shutil.rmtree(child, ignore_errors=True)


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text(encoding="utf-8"))


def load_student_weights(ckpt: Path, model) -> None:
    """Load the checkpoint's student weights into ``model`` in place (exact values)."""
    from safetensors.torch import load_file

    folder = Path(ckpt) / "student"
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise RunDirError(f"checkpoint {ckpt} has no student weights: it is damaged; delete it to resume from an older one")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights are saved once; anything else missing means a different architecture.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    real_missing = [k for k in missing if k not in tied and not _is_tied(model, k)]
    if real_missing or unexpected:
        raise RunDirError(f"checkpoint {ckpt} does not match the student (missing {real_missing[:3]}, "
                          f"unexpected {list(unexpected)[:3]}): was output.dir used for another model?")


def _is_tied(model, key: str) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and emb is not None and head.weight is emb.weight and key.endswith("weight") and "head" in key


def load_rng(ckpt: Path, rank: int) -> None:
    path = Path(ckpt) / f"rng-{rank}.pt"
    if not path.is_file():
        raise RunDirError(f"checkpoint {ckpt} has no RNG state for process {rank}: resume with the same number of processes")
    set_rng_state(torch.load(path, weights_only=False))
