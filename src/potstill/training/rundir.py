"""The run directory: refuse to clobber a run, find the checkpoint to resume, publish results.

    <run>/config.yaml  run_info.json  metrics.jsonl  tensorboard/
          checkpoints/step-000120/ ...   (atomic, verified, see :mod:`potstill.training.checkpoint`)
          student/       the final student (save_pretrained, safetensors, tokenizer); with LoRA, merged
          adapter/       with student.lora: the LoRA adapter alone (PEFT's format)
          projectors/    feature projectors, beside the student (not inside it)
          summary.json   written last
          .potstill-owned  the mark that potstill made this folder a run (see :mod:`potstill.ownership`)

potstill writes into, and with ``output.overwrite=true`` deletes, only its own run
directories: a folder without the mark that holds any of these names belongs to the user
and is refused, whatever the settings say.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text, disk_errors, publish_dir
from ..config import DistillConfig, config_to_yaml
from ..errors import RunDirError
from ..features.distiller import RUN_DIR_NAME as PROJECTORS_DIR
from ..ownership import MARK_FILE, check_writable, input_paths, is_within, mark_owned, owner_kind, read_json_object
from . import checkpoint as ckpt
from .metrics import run_info

RUN_ARTIFACTS = ("checkpoints", "student", "adapter", PROJECTORS_DIR, "metrics.jsonl", "tensorboard", "summary.json",
                 "config.yaml", "run_info.json", "report")
STUDENT_DIR = "student"
ADAPTER_DIR = "adapter"

# What a run reads from disk: overwrite must never delete any of it.
INPUT_KEYS = ("student.name_or_path", "student.tokenizer", "teacher.name_or_path", "teacher.tokenizer",
              "teacher.cache", "data.source", "data.validation_source", "data.cache_dir")


def prepare_run_dir(cfg: DistillConfig, run_dir: Path, *, is_main: bool) -> Path | None:
    """The checkpoint to resume from (or None for a fresh start), after the refusals that keep
    every user file and every run safe:

    - ``output.dir`` must be a writable folder;
    - a folder potstill did not mark as a run (nor a legacy run) that holds a run's names is
      refused, whatever ``output.overwrite`` says;
    - a run is continued only with ``train.resume``, replaced only with ``output.overwrite=true``,
      and then only when nothing the run reads lies inside what would be deleted;
    - ``train.resume=auto`` takes the newest checkpoint that verifies (damaged newer ones are
      set aside with a warning); an explicit ``train.resume`` path must verify.

    Only the main process (``is_main``, under the run lock) changes anything: it cleans the
    leftovers of an interrupted run, sets damaged checkpoints aside, deletes on overwrite and
    marks the folder as a run. With ``is_main=False`` it checks the same things and reaches the
    same answer without touching the folder; the loop instead runs it on the main process only
    and broadcasts the answer (:func:`potstill.training.loop.share_resume_point`), so the
    checkpoints are hashed once."""
    run_dir = Path(run_dir)
    check_writable(run_dir, "output.dir")
    ours = refuse_foreign(run_dir)
    if ours and is_main:
        with _disk("cleaning up after an interrupted run in", run_dir):
            ckpt.clean_leftovers(run_dir)
    resume_from = _checkpoint_to_resume(cfg, run_dir, is_main=is_main)
    if resume_from is None:
        existing = [name for name in RUN_ARTIFACTS if os.path.lexists(run_dir / name) and name != "config.yaml"]
        if existing:
            _start_over(cfg, run_dir, existing, is_main=is_main)
    if is_main:
        with _disk("marking", run_dir):
            mark_owned(run_dir, "run")
    return resume_from


def _checkpoint_to_resume(cfg: DistillConfig, run_dir: Path, *, is_main: bool) -> Path | None:
    """train.resume: an explicit checkpoint (which must verify), ``auto`` (the newest intact one), or None."""
    resume = cfg.train.resume
    if resume not in (False, "auto"):
        path = Path(resume)
        problem = ckpt.verify_checkpoint(path)
        if problem is not None and (path / ckpt.CHECKPOINT_DIR).is_dir():
            raise RunDirError(f"train.resume: {path} is a run directory, not a checkpoint: give one of its "
                              f"{ckpt.CHECKPOINT_DIR}/step-N folders, or set output.dir={path} and train.resume=auto")
        if problem is not None:
            raise RunDirError(f"train.resume: {path} is not an intact checkpoint ({problem}): give another "
                              "checkpoint, or train.resume=auto for the newest intact one in output.dir")
        return path
    if resume != "auto":
        return None
    intact = ckpt.find_resumable(run_dir, set_aside=is_main, start_over_if_all_damaged=cfg.output.overwrite)
    if intact is None and has_run(run_dir) and not cfg.output.overwrite:
        raise RunDirError(f"train.resume=auto: {run_dir} holds a run but no complete checkpoint to resume; "
                          "set output.overwrite=true to start over there")
    return intact


def has_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the output of a run (its resolved config alone does not count)."""
    return any(os.path.lexists(run_dir / name) for name in RUN_ARTIFACTS if name != "config.yaml")


def _start_over(cfg: DistillConfig, run_dir: Path, existing: list[str], *, is_main: bool) -> None:
    """A fresh start where a run is: refused without output.overwrite, else its artifacts are deleted."""
    if not cfg.output.overwrite:
        steps = ckpt.list_checkpoints(run_dir)
        what = f"checkpoints up to step {steps[-1][0]}" if steps else ", ".join(existing)
        raise RunDirError(f"output.dir {run_dir} already holds a run ({what}): continue it with train.resume=auto, "
                          "start over with output.overwrite=true, or choose another output.dir")
    targets = [run_dir / name for name in RUN_ARTIFACTS if os.path.lexists(run_dir / name)]
    refuse_deleting_inputs(cfg, run_dir, targets)
    if is_main:
        with _disk("deleting the old run for output.overwrite=true in", run_dir):
            for target in targets:
                _delete(target)


def is_our_run(run_dir: Path) -> bool:
    """Marked as a run by potstill, or a run of a version before the mark (its run_info.json says potstill)."""
    if owner_kind(run_dir) == "run":
        return True
    return "potstill_version" in (read_json_object(run_dir / "run_info.json") or {})


def refuse_foreign(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a potstill run; raises when potstill would write over a user's files.

    A folder without potstill's run mark may be used for a new run only when it holds none of
    the names a run writes (config.yaml included: the resolved config would replace the user's)."""
    kind = owner_kind(run_dir)
    if kind is not None and kind != "run":
        raise RunDirError(f"output.dir {run_dir} holds a potstill {kind}, not a run: choose another output.dir")
    if is_our_run(run_dir):
        return True
    clashes = [name for name in RUN_ARTIFACTS if os.path.lexists(run_dir / name)]
    if clashes:
        raise RunDirError(f"output.dir {run_dir} holds {', '.join(clashes)} that potstill did not write (no "
                          f"{MARK_FILE} mark): potstill never overwrites your files; choose another "
                          "output.dir (a new or empty folder)")
    return False


def refuse_deleting_inputs(cfg: DistillConfig, run_dir: Path, targets: list[Path]) -> None:
    """Raise when something this run reads (a model, tokenizer, teacher cache, data) lies inside
    what output.overwrite=true would delete: the run would destroy its own input."""
    for key, path in input_paths(cfg, INPUT_KEYS):
        for target in targets:
            if is_within(path, target):
                raise RunDirError(
                    f"output.overwrite=true would delete {target}, but {key}={path} lies inside it: copy it "
                    f"out of {run_dir} first and point {key} there, or choose another output.dir")


def _delete(target: Path) -> None:
    """Delete one run artifact; a symlink is removed, never what it points to."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


def _disk(what: str, run_dir: Path):
    return disk_errors(f"{what} {run_dir}", advice="free space or make the folder writable, then run again")


def write_run_files(cfg: DistillConfig, run_dir: Path) -> None:
    """The resolved config and what ran it (version, git commit, hardware)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    atomic_write_text(run_dir / "run_info.json", json.dumps(run_info(), indent=2))


def publish_student(run_dir: Path, student, tokenizer, projectors=None, state_dict=None, base_model=None) -> Path:
    """Save the final student (and the feature projectors beside it), each folder atomically.
    ``state_dict``: the student's whole weights when the model holds only a shard of them (FSDP).
    A LoRA student is saved twice: ``adapter/`` (the adapter alone; ``base_model``, the student's
    starting point when it is a hub id or folder, is recorded in it) and ``student/``, merged: a
    plain model folder."""
    from ..models.lora import has_lora, merged_copy, save_adapter

    student_dir = run_dir / STUDENT_DIR
    if has_lora(student):
        tmp = run_dir / ".tmp-adapter"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(student, tmp, base_model=base_model)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, run_dir / ADAPTER_DIR)
        student = merged_copy(student)
    tmp = run_dir / ".tmp-student"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, student_dir)
    if projectors is not None:
        tmp = run_dir / ".tmp-projectors"
        shutil.rmtree(tmp, ignore_errors=True)
        projectors.save(tmp)
        publish_dir(tmp, run_dir / PROJECTORS_DIR)
    return student_dir


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
