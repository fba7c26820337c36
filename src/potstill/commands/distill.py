"""``potstill distill`` and ``potstill.distill()``: one run, or the stages of a ``stages:`` config;
then the run's report and model card, and the upload where ``output.push_to_hub`` asks for it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import DistillConfig, as_config
from ..training.loop import RunResult, train
from .stages import run_stages

log = logging.getLogger("potstill")


def distill(config: DistillConfig | dict | str | Path, *, overrides=(), progress: bool = True) -> RunResult:
    """Run a distillation. ``config`` is a DistillConfig, a dict, or a YAML path; ``overrides``
    are dotted ``a.b=c`` strings applied over it. With ``stages:`` the runs go in a row
    (e.g. sequence-level KD on generated data, then the original data). At the end (main
    process): ``report/`` and the model card ``student/README.md`` (``output.report``), then
    the upload to ``output.push_to_hub``."""
    cfg = as_config(config, overrides)
    if cfg.output.push_to_hub:
        from .hub import check_push

        check_push(cfg.output.push_to_hub)
    result = run_stages(cfg, progress=progress) if cfg.stages else train(cfg, progress=progress)
    if os.environ.get("RANK", "0") == "0":
        publish_results(result, cfg)
    return result


def publish_results(result: RunResult, cfg: DistillConfig) -> None:
    """The report and model card of a finished run, and its upload."""
    if cfg.output.report:
        from .card import write_model_card
        from .report import build_report

        report = build_report([result.output_dir])
        card = write_model_card(result.output_dir, report=report)
        log.info("report: %s; model card: %s", Path(result.output_dir) / "report" / "report.md", card)
    if cfg.output.push_to_hub:
        from .hub import push_student

        url = push_student(result.student_dir, cfg.output.push_to_hub, private=cfg.output.hub_private,
                           commit_message=f"potstill: student after {result.steps} steps")
        log.info("uploaded to %s", url)
