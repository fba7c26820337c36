"""Run directory lock, atomic verified checkpoints and resume.

A checkpoint is a folder ``checkpoints/step-000120/`` holding everything needed to
continue bit-exactly: student weights (safetensors), optimizer and scheduler state, each
process's RNG state, and ``state.json`` (written last). It is first written under a
temporary name in the same directory, fsynced, then renamed, so a run killed at any
moment leaves either a complete checkpoint or none: never half of one.

A disk can still damage a published checkpoint (a full disk on a network file system, a
copy that stopped halfway, a flipped bit), so ``state.json`` records the size and sha256
of every other file (``files``) and :func:`verify_checkpoint` checks them before a resume.
:func:`find_resumable` resumes from the newest checkpoint that verifies and moves damaged
newer ones aside as ``checkpoints/damaged-step-N`` (kept for inspection, never deleted).

Everything that can be left half-done by a kill is named so that the next start can
finish or undo it (:func:`clean_leftovers`): ``.tmp-step-N`` (a save in progress),
``.old-step-N-PID`` (a publish that replaced a folder), ``.trash-step-N`` (a prune).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import disk_errors, fsync_dir
from ..errors import RunDirError, first_line
from ..locking import FileLock

log = logging.getLogger("potstill")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
SHARDED_DIR = "sharded"        # FSDP: torch.distributed.checkpoint shards of weights and optimizer state
FILES_KEY = "files"            # state.json: {relative path: {"size": bytes, "sha256": hex}}
DAMAGED_PREFIX = "damaged-"    # checkpoints/damaged-step-N: kept for inspection, never resumed nor pruned
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HASH_BLOCK = 1 << 20          # stream files in 1-MiB blocks: constant memory whatever the checkpoint size


# ----------------------------------------------------------------------------------------
# Lock


class RunLock:
    """An exclusive ``flock`` on ``<run>/.potstill.lock``; released by the OS if the process dies."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".potstill.lock"
        self._lock = FileLock(self.path)

    def acquire(self) -> "RunLock":
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise RunDirError(f"output.dir {folder} is a file, not a folder: choose another output.dir")
        # The lock is the first thing a run writes: a read-only, full or misnamed output.dir fails here,
        # as one line, before any model is loaded.
        with disk_errors(f"cannot write the run directory {folder}",
                         advice="choose another output.dir or make that folder writable"):
            folder.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(busy=lambda holder: RunDirError(
                f"output directory {folder} is in use by {holder}: wait for that run to finish "
                "or choose another output.dir"))
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with state.json), oldest first."""
    return [(step, path) for step, path in _step_dirs(run_dir) if (path / STATE_FILE).is_file()]


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Every published ``step-N`` folder, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
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
    """The main process writes weights, optimizer, scheduler and, last, state.json.

    ``model`` and ``optimizer`` are None when every process already wrote its shard of them
    (:func:`write_sharded_state`). Every process's files (``rng-N.pt``, shards) must already be
    in ``tmp``: state.json records the size and sha256 of every file in the folder, and a
    checkpoint verifies only against that list."""
    tmp.mkdir(parents=True, exist_ok=True)
    if model is not None:
        model.save_pretrained(tmp / "student", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "student")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for name, module in (extra_modules or {}).items():
        torch.save(module.state_dict(), tmp / f"{name}.pt")
    files = {rel: {"size": (tmp / rel).stat().st_size, "sha256": sha256_of(tmp / rel)} for rel in checkpoint_files(tmp)}
    state = {**state, FILES_KEY: files}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def write_sharded_state(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shard of the student's weights and optimizer state (FSDP) into
    ``tmp/sharded`` with ``torch.distributed.checkpoint`` (a collective: all processes call it;
    the main process also writes its ``.metadata``). ``model`` holds every parameter the
    optimizer steps (the student, and the feature projectors beside it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(Path(tmp) / SHARDED_DIR))


def load_sharded_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`write_sharded_state` wrote into the sharded ``model`` and ``optimizer``
    (a collective). The shards are resharded to this run's processes by
    ``torch.distributed.checkpoint`` when their number changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(Path(ckpt) / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def checkpoint_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files a checkpoint folder holds, state.json excepted, sorted."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != STATE_FILE)


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1-MiB blocks (constant memory for multi-GB weights)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# Verification


_REQUIRED_FILES = ("optimizer.pt", "scheduler.pt", "rng-0.pt")
_REQUIRED_SHARDED = ("scheduler.pt", "rng-0.pt", f"{SHARDED_DIR}/.metadata")


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path``, in one phrase, or None when it is intact.

    ``state.json`` lists each file with its size and sha256: a file that is missing, shorter,
    longer or different is named ("optimizer.pt is truncated (1200 of 5400 bytes)"). Sizes
    are checked first (cheap), then the files are hashed. Checkpoints written before that list
    existed are accepted when their files load."""
    path = Path(path)
    if not path.is_dir():
        return "the checkpoint folder does not exist"
    state = _state_or_problem(path)
    if isinstance(state, str):
        return state
    files = state.get(FILES_KEY)
    if files is None:
        return _required_problem(path) or _legacy_problem(path)
    if not isinstance(files, dict):
        return f"{STATE_FILE}'s file list is not a mapping"
    entries = sorted(files.items())
    for rel, record in entries:
        problem = _size_problem(path, rel, record)
        if problem is not None:
            return problem
    for rel, record in entries:
        try:
            if sha256_of(path / rel) != record["sha256"]:
                return f"{rel} checksum differs"
        except OSError as err:
            return f"{rel} cannot be read ({err.strerror or err})"
    return _required_problem(path, sharded=state.get("format") == "sharded")


def _state_or_problem(path: Path) -> dict[str, Any] | str:
    """The checkpoint's state.json, or what is wrong with it."""
    try:
        raw = (path / STATE_FILE).read_bytes()
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except OSError as err:
        return f"{STATE_FILE} cannot be read ({err.strerror})"
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"{STATE_FILE} is not valid JSON"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    if not isinstance(state.get("step"), int):
        return f"{STATE_FILE} does not record the step"
    return state


def _size_problem(root: Path, rel: Any, record: Any) -> str | None:
    """What is wrong with one file listed in state.json, short of its content, or None."""
    valid_name = isinstance(rel, str) and rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts
    if not valid_name or not isinstance(record, dict) or not isinstance(record.get("size"), int) \
            or not isinstance(record.get("sha256"), str):
        return f"{STATE_FILE} has an invalid entry for {rel!r}"
    path, expected = root / rel, record["size"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{rel} is missing"
    except OSError as err:
        return f"{rel} cannot be read ({err.strerror})"
    if not path.is_file():
        return f"{rel} is not a file"
    if size < expected:
        return f"{rel} is truncated ({size} of {expected} bytes)"
    if size > expected:
        return f"{rel} is longer than recorded ({size} bytes, {expected} expected)"
    return None


def _required_problem(path: Path, *, sharded: bool = False) -> str | None:
    """A file every checkpoint has that is absent (a list in state.json can only vouch for what it lists)."""
    for name in _REQUIRED_SHARDED if sharded else _REQUIRED_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    if sharded:
        return None
    if not list((path / "student").glob("*.safetensors")):
        return "student/ has no weights (*.safetensors)"
    return None


def _legacy_problem(path: Path) -> str | None:
    """A checkpoint without a file list (written before verification existed): do its files load?"""
    from safetensors.torch import load_file

    for shard in sorted((path / "student").glob("*.safetensors")):
        try:
            load_file(str(shard))
        except Exception as err:  # noqa: BLE001 - any failure to load means damaged
            return f"student/{shard.name} does not load ({first_line(err)})"
    for pt in sorted(path.glob("*.pt")):
        try:
            torch.load(pt, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            return f"{pt.name} does not load ({first_line(err)})"
    return None


# ----------------------------------------------------------------------------------------
# Choosing the checkpoint to resume


def find_resumable(run_dir: Path, *, set_aside: bool = True, start_over_if_all_damaged: bool = False) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies (None when there is none at all).

    Each damaged newer one is logged (what is wrong, which checkpoint the run resumes from
    instead) and, with ``set_aside`` (the main process, under the run lock), renamed to
    ``checkpoints/damaged-step-N`` so it is kept but never resumed nor pruned. Other processes
    pass ``set_aside=False`` and reach the same answer without touching the folder.
    If every checkpoint is damaged: :class:`RunDirError`, nothing renamed; or, with
    ``start_over_if_all_damaged`` (``output.overwrite=true``), a warning and None."""
    found, damaged = newest_intact(run_dir)
    if found is None and damaged:
        if not start_over_if_all_damaged:
            raise all_damaged_error(run_dir, damaged)
        if set_aside:
            log.warning("train.resume=auto: every checkpoint in %s is damaged (%s): starting over, as "
                        "output.overwrite=true allows", Path(run_dir) / CHECKPOINT_DIR, describe(damaged))
        return None
    if found is not None and set_aside:
        set_aside_all(damaged, resuming_from=found)
    return found


def all_damaged_error(run_dir: Path, damaged: list[tuple[Path, str]]) -> RunDirError:
    return RunDirError(f"every checkpoint in {Path(run_dir) / CHECKPOINT_DIR} is damaged ({describe(damaged)}): "
                       "nothing to resume; start over with output.overwrite=true (deletes them) or choose "
                       "another output.dir")


def set_aside_all(damaged: list[tuple[Path, str]], *, resuming_from: Path) -> None:
    """Set each damaged checkpoint aside, with a warning naming its problem and the one resumed instead."""
    for bad, why in damaged:
        kept = set_aside_damaged(bad)
        log.warning("checkpoint %s is damaged (%s): resuming from %s instead; the damaged one is kept as %s",
                    bad, why, resuming_from.name, kept)


def newest_intact(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (or None), and the damaged newer ones with their problem.

    Verifies newest first and stops at the first intact one: older checkpoints are not read."""
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(_step_dirs(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def describe(damaged: list[tuple[Path, str]]) -> str:
    """``step-000008: optimizer.pt is missing; step-000006: ...`` (the first three)."""
    return "; ".join(f"{p.name}: {why}" for p, why in damaged[:3]) + ("; ..." if len(damaged) > 3 else "")


def set_aside_damaged(path: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged-step-N`` (``-2``, ``-3``... if taken); returns the new path."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    n = 2
    while target.exists():
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}")
        n += 1
    with disk_errors(f"setting aside the damaged checkpoint {path}",
                     advice="make the checkpoints folder writable, or move the damaged checkpoint away yourself"):
        os.replace(path, target)
        fsync_dir(path.parent)
    return target


# ----------------------------------------------------------------------------------------
# Pruning and leftovers of interrupted work


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints. Each older one is first renamed to ``.trash-step-N``
    (atomic), then deleted: a kill midway leaves a trash folder (removed at the next start),
    never a half-deleted ``step-N`` that looks resumable."""
    for _, path in list_checkpoints(run_dir)[:-keep]:
        _discard(path, path.with_name(f".trash-{path.name}"))
    root = Path(run_dir) / CHECKPOINT_DIR
    # Leftovers of a save that was killed midway are never valid; drop them.
    for child in root.glob(".tmp-step-*"):
        shutil.rmtree(child, ignore_errors=True)


def _discard(path: Path, trash: Path) -> None:
    if trash.exists():
        _remove(trash)
    os.replace(path, trash)
    fsync_dir(path.parent)
    _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# In the run dir and checkpoints/: what a killed save, publish or prune leaves behind.
_DISCARD_DIRS = {"": re.compile(r"^\.tmp-(student|projectors)$"), CHECKPOINT_DIR: re.compile(r"^\.(tmp|trash)-step-\d+$")}
_OLD_DIRS = {"": re.compile(r"^\.old-(student|projectors)-\d+$"), CHECKPOINT_DIR: re.compile(r"^\.old-(step-\d+)-\d+$")}
_ATOMIC_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")  # atomic_write_text's ".<name>.tmp-<pid>"


def clean_leftovers(run_dir: Path) -> list[str]:
    """Finish or undo what a killed run left half-done; returns what it did, one phrase each.

    Call it in the main process, under the run lock, in a run directory potstill owns:
    - ``.old-X-PID``: :func:`~potstill.atomic.publish_dir` was replacing ``X``. If ``X`` is
      missing, the kill fell between its two renames: the new version ``.tmp-X`` (complete,
      fsynced before the renames) is put in place, or, failing that, the old one is put back.
      Otherwise the old one is removed;
    - ``.tmp-step-N``, ``.tmp-student``, ``.tmp-projectors``: a save that never got published: removed;
    - ``.trash-step-N``: a prune that was killed while deleting: removed;
    - ``.<name>.tmp-<pid>``: a temporary file of ``atomic_write_text`` whose process is gone: removed.
    Damaged checkpoints (``damaged-step-N``) and anything else are left alone."""
    run_dir = Path(run_dir)
    done: list[str] = []
    for sub in ("", CHECKPOINT_DIR):
        folder = run_dir / sub if sub else run_dir
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):  # interrupted publishes first: they may use a .tmp-X
            m = _OLD_DIRS[sub].match(child.name)
            if m and child.is_dir() and not child.is_symlink():
                done.append(_finish_publish(child, child.with_name(m.group(1)), in_checkpoints=bool(sub)))
        for child in sorted(folder.iterdir()):
            action = _discard_leftover(sub, child)
            if action is not None:
                done.append(action)
    if done:
        log.info("cleaned up after an interrupted run in %s: %s", run_dir, "; ".join(done))
    return done


def _finish_publish(old: Path, final: Path, *, in_checkpoints: bool) -> str:
    """Complete a publish_dir(.tmp-X, X) that was killed after it moved X to ``old``."""
    rel = f"{CHECKPOINT_DIR}/{old.name}" if in_checkpoints else old.name
    if final.exists():
        shutil.rmtree(old)
        return f"removed {rel}"
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.is_dir() and (not in_checkpoints or verify_checkpoint(tmp) is None):
        os.replace(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old)
        return f"published {final.name} from {tmp.name}"
    os.replace(old, final)
    fsync_dir(final.parent)
    return f"restored {final.name} from {old.name}"


def _discard_leftover(sub: str, child: Path) -> str | None:
    """Remove ``child`` if it is a temporary or trash folder, or a stale atomic-write file; what was done."""
    name = child.name
    rel = f"{sub}/{name}" if sub else name
    if child.is_dir() and not child.is_symlink() and _DISCARD_DIRS[sub].match(name):
        shutil.rmtree(child)
        return f"removed {rel}"
    m = _ATOMIC_TMP_FILE.match(name)
    if m and child.is_file() and not child.is_symlink() and not _process_alive(int(m.group(1))):
        child.unlink()
        return f"removed {rel}"
    return None


def _process_alive(pid: int) -> bool:
    """Whether a process of that id runs on this machine (then its temporary file may be in use)."""
    if pid == os.getpid():
        return False  # ours, from before: this process writes nothing while it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text(encoding="utf-8"))


def load_student_weights(ckpt: Path, model) -> None:
    """Load the checkpoint's student weights into ``model`` in place (exact values)."""
    from safetensors.torch import load_file

    folder = Path(ckpt) / "student"
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise RunDirError(f"checkpoint {ckpt} has no student weights: it is damaged; resume with train.resume=auto "
                          "to continue from the newest intact checkpoint")
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
