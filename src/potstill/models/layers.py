"""Where a causal LM keeps its transformer blocks (``model.layers``, ``transformer.h``, ...)."""

from __future__ import annotations

from torch import nn

from ..errors import ModelError


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the transformer blocks: ``model.layers``, ``transformer.h``..."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__} "
                         "(no ModuleList with config.num_hidden_layers blocks)")
    return best


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model)[1])
