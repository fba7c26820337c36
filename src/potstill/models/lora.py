"""LoRA students (``student.lora``): low-rank adapters through PEFT, trained in place of the weights.

The adapters are injected *into* the student (``peft.inject_adapter_in_model``), so the model the
run trains is still the Hugging Face causal LM itself: its head, its decoder, its module names and
its checkpoints stay what the rest of potstill reads (the chunked loss path reads the head, the
feature hooks find the blocks), with ``lora.Linear`` layers in place of the targeted linear ones.
Everything but the adapters is frozen, so the optimizer holds state for the adapters alone.

At the end the run writes both forms (:func:`save_adapter`, :func:`merged_copy`): the adapter
(PEFT's folder: ``adapter_config.json`` + ``adapter_model.safetensors``, loaded with
``PeftModel.from_pretrained(base, folder)``) and the merged student, a plain model folder.

``peft`` is an optional dependency (``pip install 'potstill[lora]'``).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..config import LoraConfig
from ..errors import ModelError, one_line

log = logging.getLogger("potstill")

ADAPTER = "default"  # PEFT's adapter name; one adapter per student


def import_peft():
    """The ``peft`` module, or one line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ModelError("student.lora needs the peft package, which is not installed: pip install 'potstill[lora]' "
                         "(or pip install peft), or remove student.lora to train the whole student") from None
    return peft


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns ``model``.

    ``target_modules``: PEFT's names or regex; ``all-linear`` is every linear layer but the output
    head (PEFT's rule), so the head stays the plain ``nn.Linear`` the chunked path reads."""
    peft = import_peft()
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        model = peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:  # "Target modules {...} not found in the base model."
        raise ModelError(f"student.lora.target_modules {cfg.target_modules!r}: {one_line(err)}; name linear layers "
                         f"of the student, e.g. {', '.join(linear_names(model)[:6])}") from None
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    if not adapters:
        raise ModelError(f"student.lora.target_modules {cfg.target_modules!r} matched no layer that takes an adapter: "
                         f"name linear layers of the student, e.g. {', '.join(linear_names(model)[:6])}")
    for p in adapters:
        p.requires_grad_(True)
    layers = lora_layers(model)
    for layer in layers.values():
        # PEFT casts each adapter's input to the adapter's float32 weights; under bf16 autocast that
        # keeps a float32 copy of every adapted layer's input for backward (+5% peak memory on the
        # bench's student). Autocast casts the weights instead, as for the base layer.
        layer.cast_input_dtype_enabled = False
    trained = sum(p.numel() for p in adapters)
    total = sum(p.numel() for p in model.parameters())
    log.info("student.lora: r=%d, alpha=%g on %d layers; training %.3fM of %.2fM parameters (%.2f%%)",
             cfg.r, cfg.alpha, len(layers), trained / 1e6, total / 1e6, 100 * trained / max(total, 1))
    return model


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (``q_proj``, ``down_proj``, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> PEFT LoRA layer, for every adapted layer of ``model``."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter added into its base weights (W + B A * alpha / r) and
    the LoRA layers replaced by their base layers: the plain model class, as ``save_pretrained``
    writes it. ``model`` itself keeps its adapters (evaluation or training may go on)."""
    merged = copy.deepcopy(model)
    for name, layer in list(lora_layers(merged).items()):
        layer.merge(safe_merge=True, adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, layer.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def save_adapter(model: nn.Module, folder: Path, *, base_model: Any = None) -> None:
    """The adapter as PEFT writes it: ``adapter_config.json`` and ``adapter_model.safetensors``
    (keys ``base_model.model.<module>.lora_A.weight``, loadable by ``PeftModel.from_pretrained``).
    ``base_model``: the student's starting point when it is a hub id or folder, recorded as
    ``base_model_name_or_path``."""
    peft = import_peft()
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER)
    # PeftModel.from_pretrained wraps the base model as ``base_model.model``: its keys carry that prefix.
    state = {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.base_model_name_or_path = base_model if isinstance(base_model, str) else None
    config.save_pretrained(str(folder))
    # PEFT writes sets (target_modules) as lists in arbitrary order: sort them, so reruns write the same file.
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
