"""Several runs in a row from one config: ``stages:``.

    stages:
      - {data.source: runs/gen.jsonl, loss.logits.weight: 0, loss.ce.weight: 1}   # SeqKD on teacher answers
      - {train.lr: 3.0e-5}                                                      # then the original data

Stage N (from 1) is the base config with the stage's keys (dotted or nested) set over it,
run in ``<output.dir>/stage-N``; from stage 2 on, the student starts from the previous
stage's saved student. A stage whose run finished (``summary.json``) is skipped on a rerun,
a stopped one continues from its last checkpoint, so one command resumes across stages.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import DistillConfig, _set_dotted, describe_validation_error
from ..errors import ConfigError
from ..training.loop import RunResult, train

log = logging.getLogger("potstill")


def stage_config(cfg: DistillConfig, index: int, previous_student: Path | None) -> DistillConfig:
    """The config of stage ``index`` (1-based)."""
    from pydantic import ValidationError

    raw = cfg.model_dump()
    raw["stages"] = None
    stage = _flatten(cfg.stages[index - 1])
    for key, value in stage.items():
        if key[0] == "stages":
            raise ConfigError(f"stages[{index}]: a stage cannot hold stages")
        _set_dotted(raw, key, value)
    if previous_student is not None:
        raw["student"].update(name_or_path=str(previous_student), config=None, from_teacher=None, tokenizer=None)
        if not any(key[:2] == ("student", "embeddings_from_teacher") for key in stage):
            # The previous stage's trained embeddings stay, unless this stage asks for the teacher's again.
            raw["student"]["embeddings_from_teacher"] = None
    raw["output"]["dir"] = str(Path(cfg.output.dir) / f"stage-{index}")
    raw["train"]["resume"] = "auto"
    try:
        return DistillConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"stages[{index}]: {describe_validation_error(err, {})}") from None


def _flatten(stage: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in stage.items():
        path = prefix + tuple(str(key).split("."))
        if isinstance(value, dict) and path[-1] not in ("config",):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def run_stages(cfg: DistillConfig, *, progress: bool = True):
    """Run every stage in order (skipping finished ones); returns the last stage's RunResult."""
    if not all(isinstance(s, dict) and s for s in cfg.stages):
        raise ConfigError("stages: give a list of non-empty mappings of config keys, e.g. "
                          "[{data.source: gen.jsonl}, {train.lr: 3e-5}]")
    previous: Path | None = None
    result = None
    for index in range(1, len(cfg.stages) + 1):
        stage = stage_config(cfg, index, previous)
        run_dir = Path(stage.output.dir)
        if (run_dir / "summary.json").is_file() and (run_dir / "student" / "config.json").is_file():
            import json

            log.info("stage %d of %d: finished earlier in %s, skipped", index, len(cfg.stages), run_dir)
            summary = json.loads((run_dir / "summary.json").read_text())
            result = RunResult(output_dir=run_dir, student_dir=run_dir / "student", steps=summary.get("steps", 0),
                               final_eval=summary.get("final_eval", {}), train_metrics=summary.get("train", {}))
        else:
            log.info("stage %d of %d -> %s", index, len(cfg.stages), run_dir)
            result = train(stage, progress=progress)
        previous = result.student_dir
    return result
