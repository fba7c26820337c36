"""``potstill distill`` and ``potstill.distill()``: one run, or the stages of a ``stages:`` config."""

from __future__ import annotations

from pathlib import Path

from ..config import DistillConfig, as_config
from ..training.loop import RunResult, train
from .stages import run_stages


def distill(config: DistillConfig | dict | str | Path, *, overrides=(), progress: bool = True) -> RunResult:
    """Run a distillation. ``config`` is a DistillConfig, a dict, or a YAML path; ``overrides``
    are dotted ``a.b=c`` strings applied over it. With ``stages:`` the runs go in a row
    (e.g. sequence-level KD on generated data, then the original data)."""
    cfg = as_config(config, overrides)
    if cfg.stages:
        return run_stages(cfg, progress=progress)
    return train(cfg, progress=progress)
