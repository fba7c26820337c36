"""potstill: knowledge distillation for causal language models.

    import potstill
    result = potstill.distill("run.yaml")                  # or a DistillConfig / dict
    potstill.evaluate(result.output_dir, teacher="path/to/teacher")
"""

from __future__ import annotations

from .version import __version__  # noqa: E402

from .config import (  # noqa: E402
    DataConfig,
    DistillConfig,
    EvalConfig,
    LossConfig,
    OutputConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    load_config,
)
from .errors import PotstillError  # noqa: E402


def distill(config, *, overrides=(), progress: bool = True):
    """Run a distillation; see :func:`potstill.commands.distill.distill`."""
    from .commands.distill import distill as _distill

    return _distill(config, overrides=overrides, progress=progress)


def cache_teacher(config, *, overrides=(), progress: bool = True):
    """Capture the teacher's top-k / sampled logits to disk; see :func:`potstill.teachers.capture.cache_teacher`."""
    from .teachers.capture import cache_teacher as _cache_teacher

    return _cache_teacher(config, overrides=overrides, progress=progress)


def evaluate(model, **kwargs):
    """Evaluate a run directory, model folder or model object; see :func:`potstill.commands.evaluate.evaluate`."""
    from .commands.evaluate import evaluate as _evaluate

    return _evaluate(model, **kwargs)


def export(run, *, bitnet: bool = True, out=None, dtype: str = "float32") -> dict:
    """Packed 1.58-bit export of a BitNet run; see :func:`potstill.commands.export.export_packed`."""
    from .commands.export import export_packed

    if not bitnet:
        raise PotstillError("potstill.export: only the packed BitNet format exists (bitnet=True)")
    return export_packed(run, out, dtype=dtype)


__all__ = [
    "__version__", "distill", "cache_teacher", "evaluate", "export", "load_config", "PotstillError", "DistillConfig", "TeacherConfig",
    "StudentConfig", "DataConfig", "LossConfig", "TrainConfig", "EvalConfig", "OutputConfig",
]
