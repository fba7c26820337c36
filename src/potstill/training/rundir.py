"""The run directory: refuse to clobber a run, find the checkpoint to resume, publish results.

    <run>/config.yaml  run_info.json  metrics.jsonl  tensorboard/
          checkpoints/step-000120/ ...   (atomic, see :mod:`potstill.training.checkpoint`)
          student/       the final student (save_pretrained, safetensors, tokenizer)
          projectors/    feature projectors, beside the student (not inside it)
          summary.json   written last
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text, publish_dir
from ..config import DistillConfig, config_to_yaml
from ..errors import RunDirError
from ..features.distiller import RUN_DIR_NAME as PROJECTORS_DIR
from . import checkpoint as ckpt
from .metrics import run_info

RUN_ARTIFACTS = ("checkpoints", "student", PROJECTORS_DIR, "metrics.jsonl", "tensorboard", "summary.json", "config.yaml",
                 "run_info.json")
STUDENT_DIR = "student"


def prepare_run_dir(cfg: DistillConfig, run_dir: Path, *, is_main: bool) -> Path | None:
    """The checkpoint to resume from (or None), after refusing to clobber an existing run."""
    resume = cfg.train.resume
    if resume not in (False, "auto"):
        path = Path(resume)
        if not (path / ckpt.STATE_FILE).is_file():
            raise RunDirError(f"train.resume: {path} is not a complete checkpoint (no {ckpt.STATE_FILE})")
        return path
    existing = [name for name in RUN_ARTIFACTS if (run_dir / name).exists() and name != "config.yaml"]
    if resume == "auto":
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None and existing and not cfg.output.overwrite:
            raise RunDirError(f"train.resume=auto: {run_dir} holds a run but no complete checkpoint to resume; "
                              "set output.overwrite=true to start over there")
        if latest is not None:
            return latest
    if existing:
        if not cfg.output.overwrite:
            steps = ckpt.list_checkpoints(run_dir)
            what = f"checkpoints up to step {steps[-1][0]}" if steps else ", ".join(existing)
            raise RunDirError(f"output.dir {run_dir} already holds a run ({what}): continue it with train.resume=auto, "
                              "start over with output.overwrite=true, or choose another output.dir")
        if is_main:
            for name in RUN_ARTIFACTS:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    return None


def write_run_files(cfg: DistillConfig, run_dir: Path) -> None:
    """The resolved config and what ran it (version, git commit, hardware)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    atomic_write_text(run_dir / "run_info.json", json.dumps(run_info(), indent=2))


def publish_student(run_dir: Path, student, tokenizer, projectors=None) -> Path:
    """Save the final student (and the feature projectors beside it), each folder atomically."""
    student_dir = run_dir / STUDENT_DIR
    tmp = run_dir / ".tmp-student"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, safe_serialization=True)
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
