"""potstill: knowledge distillation for causal language models.

    import potstill
    result = potstill.distill("run.yaml")                  # or a DistillConfig / dict
    potstill.evaluate(result.output_dir, teacher="path/to/teacher")
"""

from __future__ import annotations

__version__ = "0.1.0"

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
    """Run a distillation; see :func:`potstill.train.distill`."""
    from .train import distill as _distill

    return _distill(config, overrides=overrides, progress=progress)


def cache_teacher(config, *, overrides=(), progress: bool = True):
    """Capture the teacher's top-k / sampled logits to disk; see :func:`potstill.capture.cache_teacher`."""
    from .capture import cache_teacher as _cache_teacher

    return _cache_teacher(config, overrides=overrides, progress=progress)


def evaluate(model, **kwargs):
    """Evaluate a run directory, model folder or model object; see :func:`potstill.evaluate.evaluate`."""
    from .evaluate import evaluate as _evaluate

    return _evaluate(model, **kwargs)


def export(run, *, bitnet: bool = True, out=None, dtype: str = "float32") -> dict:
    """Packed 1.58-bit export of a BitNet run; see :func:`potstill.bitnet.export_packed`."""
    from .bitnet import export_packed

    if not bitnet:
        raise PotstillError("potstill.export: only the packed BitNet format exists (bitnet=True)")
    return export_packed(run, out, dtype=dtype)


__all__ = [
    "__version__", "distill", "cache_teacher", "evaluate", "export", "load_config", "PotstillError", "DistillConfig", "TeacherConfig",
    "StudentConfig", "DataConfig", "LossConfig", "TrainConfig", "EvalConfig", "OutputConfig",
]
