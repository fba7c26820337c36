"""Minitron-style structured pruning: a smaller student cut out of the teacher by importance.

NVIDIA's Minitron (Muralidharan et al., "Compact Language Models via Pruning and Knowledge
Distillation", arXiv 2407.14679) prunes a trained model instead of training a small one from
scratch, then distills the teacher into it. Importance is *activation-based*: a few calibration
batches go through the teacher with forward hooks, no gradients:

* attention heads: the L2 norm of each head's output (the input of ``o_proj``, one ``head_dim``
  slice per head), averaged over tokens;
* MLP channels: the mean ``|activation|`` of each channel entering ``down_proj``;
* embedding (hidden) channels: the mean ``|output|`` of every RMSNorm per channel, summed over the norms;
* blocks (depth): ShortGPT's Block Influence, ``1 - cos(block input, block output)`` averaged over
  tokens (Men et al., arXiv 2403.03853), or the rise of the LM loss when the block is skipped.

Width pruning then keeps the most important heads, channels and blocks (in their original order)
and copies the sliced weights into a plain Hugging Face model of the teacher's class. Grouped-query
attention stays consistent: whole key/value groups go first (by the summed importance of their
query heads), then every kept group keeps the same number of its most important query heads.

The target is a shape, or a parameter count (:func:`pruned_config` fits the hidden and MLP widths
to it by one common ratio). The shape depends on the config only, so a process that builds the
student on the meta device gets the same one without data.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PruneConfig
from ..errors import ModelError
from .int4 import dequantized_state_dict, plain_tensor

log = logging.getLogger("potstill")

SUPPORTED = ("llama", "qwen2", "mistral")
KEY = "student.from_teacher.prune"

# Which index set slices each dimension of a weight (rows first): "h" hidden channels, "q" kept query
# heads' rows, "kv" kept key/value groups' rows, "m" MLP channels, None whole. A bias takes the first entry.
_LAYER_SLICES = {
    "self_attn.q_proj": ("q", "h"),
    "self_attn.k_proj": ("kv", "h"),
    "self_attn.v_proj": ("kv", "h"),
    "self_attn.o_proj": ("h", "q"),
    "mlp.gate_proj": ("m", "h"),
    "mlp.up_proj": ("m", "h"),
    "mlp.down_proj": ("h", "m"),
    "input_layernorm": ("h",),
    "post_attention_layernorm": ("h",),
}
_TOP_SLICES = {"model.embed_tokens": (None, "h"), "lm_head": (None, "h"), "model.norm": ("h",)}


# ---------------------------------------------------------------------------------------------
# The student's shape
# ---------------------------------------------------------------------------------------------

def _check_family(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ModelError(f"{KEY} supports {', '.join(SUPPORTED)} teachers, not {model_type}: use "
                         "student.from_teacher.layers or student.config for this teacher")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def count_parameters(config) -> int:
    """The exact parameter count of a llama / qwen2 / mistral causal LM of this config: embeddings,
    output head unless tied, per block q/k/v/o (+ their biases), gate/up/down (+ biases) and two
    norms, and the final norm."""
    _check_family(config)
    vocab, hidden, inter = config.vocab_size, config.hidden_size, config.intermediate_size
    d = _head_dim(config)
    q, kv = config.num_attention_heads * d, _kv_heads(config) * d
    attn = hidden * q + 2 * hidden * kv + q * hidden
    mlp = 3 * hidden * inter
    if config.model_type == "qwen2":  # q/k/v have biases, o_proj has none
        attn += q + 2 * kv
    elif getattr(config, "attention_bias", False):  # llama's attention_bias covers all four
        attn += q + 2 * kv + hidden
    if getattr(config, "mlp_bias", False):
        mlp += 2 * inter + hidden
    embeddings = vocab * hidden * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * (attn + mlp + 2 * hidden) + hidden


def _check_not_larger(prune: PruneConfig, config) -> None:
    teacher = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
               "num_attention_heads": config.num_attention_heads, "num_key_value_heads": _kv_heads(config),
               "num_layers": config.num_hidden_layers}
    for field, full in teacher.items():
        value = getattr(prune, field)
        if value is not None and value > full:
            raise ModelError(f"{KEY}.{field} {value} is larger than the teacher's {full}: pruning only "
                             f"removes, give at most {full}")


def _target_heads(prune: PruneConfig, config) -> tuple[int, int]:
    """(query heads, key/value heads) of the student, checked to form whole GQA groups that each fit
    in one of the teacher's groups (pruning keeps a query head with its own key/value head)."""
    heads, kv = config.num_attention_heads, _kv_heads(config)
    group = heads // kv
    n_heads, n_kv = prune.num_attention_heads, prune.num_key_value_heads
    if n_heads is None:
        n_heads = (n_kv or kv) * group  # fewer groups: drop whole groups, keep their size
    if n_kv is None:
        if n_heads % kv == 0:
            n_kv = kv
        elif kv == heads:  # multi-head attention stays multi-head
            n_kv = n_heads
        else:
            raise ModelError(f"{KEY}.num_attention_heads {n_heads} is not a multiple of the teacher's {kv} "
                             f"key/value heads: give a multiple of {kv}, or set {KEY}.num_key_value_heads too")
    if n_heads % n_kv:
        raise ModelError(f"{KEY}.num_attention_heads {n_heads} and {KEY}.num_key_value_heads {n_kv} are heads "
                         "that do not divide: give num_attention_heads a multiple of num_key_value_heads")
    if n_heads // n_kv > group:
        raise ModelError(f"{KEY}.num_attention_heads {n_heads} over {n_kv} key/value heads puts {n_heads // n_kv} "
                         f"query heads in a group, more than the teacher's {group}: give num_attention_heads "
                         f"at most {n_kv * group} or keep more key/value heads")
    return n_heads, n_kv


def _shrunk(full: int, ratio: float, round_to: int) -> int:
    """``full * ratio`` rounded down to a multiple of ``round_to`` (at least ``round_to``), never above ``full``."""
    return min(full, max(round_to, int(full * ratio) // round_to * round_to))


def _fit_params(config, prune: PruneConfig) -> None:
    """Shrink the widths the user did not give (hidden, MLP) by one common ratio, found by binary
    search, until ``count_parameters(config) <= prune.params``; ``config`` is changed in place."""
    full_hidden, full_inter = config.hidden_size, config.intermediate_size
    free_hidden, free_inter = prune.hidden_size is None, prune.intermediate_size is None

    # transformers requires the hidden size to be a multiple of the query heads (even with head_dim set).
    hidden_step = math.lcm(prune.round_to, config.num_attention_heads)

    def shape(ratio: float) -> int:
        if free_hidden:
            config.hidden_size = _shrunk(full_hidden, ratio, hidden_step)
        if free_inter:
            config.intermediate_size = _shrunk(full_inter, ratio, prune.round_to)
        return count_parameters(config)

    if shape(1.0) <= prune.params:
        config.hidden_size, config.intermediate_size = full_hidden, full_inter  # it fits unpruned
        return
    smallest = shape(0.0)
    if smallest > prune.params:
        raise ModelError(f"{KEY}.params {prune.params} is below the smallest reachable student: {smallest} "
                         f"parameters (hidden_size {config.hidden_size}, intermediate_size "
                         f"{config.intermediate_size}); raise params or give fewer num_layers / heads")
    lo, hi = 0.0, 1.0  # shape(lo) fits, shape(hi) does not
    for _ in range(40):  # 2**-40: far below one rounding step of any width
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shape(mid) <= prune.params else (lo, mid)
    shape(lo)


def pruned_config(teacher_config, prune: PruneConfig):
    """The student's config: a deep copy of the teacher's with the target shape (config only, no data).

    ``head_dim`` is set explicitly to the teacher's, so it stays when ``hidden_size`` shrinks. A list
    ``layer_types`` is cut to the kept count (:func:`prune_teacher` then sets the kept layers' own).
    With ``params``, the hidden and MLP widths not given shrink by one ratio, rounded down to
    multiples of ``round_to``, until the count is at most ``params``."""
    _check_family(teacher_config)
    _check_not_larger(prune, teacher_config)
    n_heads, n_kv = _target_heads(prune, teacher_config)
    config = copy.deepcopy(teacher_config)
    config.head_dim = _head_dim(teacher_config)
    config.num_attention_heads, config.num_key_value_heads = n_heads, n_kv
    config.hidden_size = prune.hidden_size or teacher_config.hidden_size
    config.intermediate_size = prune.intermediate_size or teacher_config.intermediate_size
    config.num_hidden_layers = prune.num_layers or teacher_config.num_hidden_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    if prune.params is not None:
        _fit_params(config, prune)
    if config.hidden_size % n_heads:
        field = "hidden_size" if prune.hidden_size is not None else "num_attention_heads"
        raise ModelError(f"{KEY}.{field}: a hidden size of {config.hidden_size} is not a multiple of "
                         f"{n_heads} query heads, which transformers requires: give a hidden_size that "
                         f"{n_heads} divides, or a number of heads that divides {config.hidden_size}")
    return config


# ---------------------------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------------------------

@dataclass
class Importance:
    """Activation importance of a teacher with L blocks, H hidden channels, n query heads, I MLP channels."""

    hidden: Tensor  # (H,) embedding-channel importance
    heads: Tensor   # (L, n) query-head importance per block
    mlp: Tensor     # (L, I) MLP channel importance per block
    layers: Tensor  # (L,) block importance


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _block_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Sums:
    """Per-token statistics summed over the calibration tokens; ``mask`` (B, T) bool marks the real
    (non-padding) tokens of the batch in flight."""

    def __init__(self, config) -> None:
        n_layers, hidden = config.num_hidden_layers, config.hidden_size
        self.hidden = torch.zeros(hidden, dtype=torch.float64)
        self.heads = torch.zeros(n_layers, config.num_attention_heads, dtype=torch.float64)
        self.mlp = torch.zeros(n_layers, config.intermediate_size, dtype=torch.float64)
        self.layers = torch.zeros(n_layers, dtype=torch.float64)
        self.tokens = 0
        self.mask: Tensor | None = None

    def tokens_of(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (N, ...) the real tokens, in float32 (a bf16 teacher's sums stay exact enough)."""
        return x[self.mask].float()

    def add(self, name: str, index: Any, values: Tensor) -> None:
        """Add ``values`` (N, ...) summed over tokens at ``self.<name>[index]``."""
        getattr(self, name)[index] += values.sum(0).double().cpu()


def _hooks(model: nn.Module, sums: _Sums, *, cosine: bool) -> list:
    """Forward hooks that add each block's head, MLP, norm (and, for ``cosine``, block) statistics."""
    handles = []
    d = _head_dim(model.config)

    def heads(i):
        def hook(_module, args):
            x = sums.tokens_of(args[0])  # (N, n_heads * head_dim), the concatenated head outputs
            sums.add("heads", i, x.view(x.shape[0], -1, d).norm(dim=-1))
        return hook

    def mlp(i):
        return lambda _module, args: sums.add("mlp", i, sums.tokens_of(args[0]).abs())

    def norm(_module, _args, output):
        sums.add("hidden", slice(None), sums.tokens_of(output).abs())

    def block(i):
        def hook(_module, args, kwargs, output):
            x_in, x_out = sums.tokens_of(_block_input(args, kwargs)), sums.tokens_of(_first(output))
            sums.add("layers", i, 1 - F.cosine_similarity(x_in, x_out, dim=-1))
        return hook

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(heads(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(mlp(i)))
        handles.append(layer.input_layernorm.register_forward_hook(norm))
        handles.append(layer.post_attention_layernorm.register_forward_hook(norm))
        if cosine:
            handles.append(layer.register_forward_hook(block(i), with_kwargs=True))
    handles.append(model.model.norm.register_forward_hook(norm))
    return handles


def _skip(_module, args, kwargs, output):
    """A forward hook that makes a block the identity: its output is its input."""
    x = _block_input(args, kwargs)
    return (x, *output[1:]) if isinstance(output, tuple) else x


def _lm_loss(model: nn.Module, batch: Mapping[str, Tensor], mask: Tensor) -> tuple[float, int]:
    """(summed next-token loss, number of predicted tokens) on one batch; the targets are ``labels``
    (else ``input_ids``), -100 and padding left out."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
    labels = batch.get("labels", batch["input_ids"]).masked_fill(~mask, -100)[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")
    return loss.item(), int((labels != -100).sum())


def _on(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def _mask(batch: Mapping[str, Tensor]) -> Tensor:
    """(B, T) bool: the real tokens."""
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


@torch.no_grad()
def measure_importance(teacher: nn.Module, batches: Iterable[Mapping[str, Tensor]], *,
                       layer_importance: str = "cosine", progress: bool = False) -> Importance:
    """Minitron's activation importance of ``teacher`` on ``batches`` (dicts with ``input_ids`` (B, T),
    optional ``attention_mask`` and ``labels`` (B, T)); every statistic is a mean over real tokens.

    ``layer_importance``: ``cosine`` (ShortGPT Block Influence, ``1 - cos(block in, block out)``) or
    ``loss`` (the LM loss rise when the block is skipped: one more forward per block and batch)."""
    from tqdm.auto import tqdm

    _check_family(teacher.config)
    if layer_importance not in ("cosine", "loss"):
        raise ModelError(f"{KEY}.layer_importance {layer_importance!r} is not one of: cosine, loss")
    teacher.eval()
    device = next(teacher.parameters()).device
    batches = [_on(b, device) for b in batches]
    if not batches:
        raise ModelError(f"{KEY} has no calibration batches: the importance needs data (give more train data)")
    cosine = layer_importance == "cosine"
    sums = _Sums(teacher.config)
    base_loss = base_count = 0.0
    handles = _hooks(teacher, sums, cosine=cosine)
    try:
        for batch in tqdm(batches, desc="prune: importance", disable=not progress, leave=False):
            sums.mask = _mask(batch)
            sums.tokens += int(sums.mask.sum())
            if cosine:
                teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
            else:
                loss, count = _lm_loss(teacher, batch, sums.mask)
                base_loss, base_count = base_loss + loss, base_count + count
    finally:
        for h in handles:
            h.remove()
    tokens = max(sums.tokens, 1)
    layers = sums.layers / tokens if cosine else _loss_rise(teacher, batches, base_loss, base_count, progress)
    return Importance(hidden=(sums.hidden / tokens).float(), heads=(sums.heads / tokens).float(),
                      mlp=(sums.mlp / tokens).float(), layers=layers.float())


def _loss_rise(teacher: nn.Module, batches: list, base_loss: float, base_count: float, progress: bool) -> Tensor:
    """(L,) the mean LM loss with each block skipped, minus the teacher's."""
    from tqdm.auto import tqdm

    base = base_loss / max(base_count, 1)
    rise = torch.zeros(len(teacher.model.layers), dtype=torch.float64)
    for i, layer in enumerate(tqdm(teacher.model.layers, desc="prune: block loss", disable=not progress,
                                   leave=False)):
        handle = layer.register_forward_hook(_skip, with_kwargs=True)
        try:
            total = count = 0
            for batch in batches:
                loss, n = _lm_loss(teacher, batch, _mask(batch))
                total, count = total + loss, count + n
        finally:
            handle.remove()
        rise[i] = total / max(count, 1) - base
    return rise


# ---------------------------------------------------------------------------------------------
# Slicing
# ---------------------------------------------------------------------------------------------

def _top(scores: Tensor, k: int) -> Tensor:
    """The indices of the ``k`` largest ``scores``, in their original order (so an unpruned dimension
    keeps the identity order)."""
    return scores.topk(k).indices.sort().values


def _kept_heads(scores: Tensor, n_kv_teacher: int, n_heads: int, n_kv: int) -> tuple[Tensor, Tensor]:
    """(kept query heads (n_heads,), kept key/value heads (n_kv,)) from one block's head scores (n,).

    Whole groups go by the summed importance of their query heads; each kept group keeps its
    ``n_heads // n_kv`` best query heads. Listed group by group, new query head j falls in new group
    ``j // (n_heads // n_kv)``, which is how transformers pairs query and key/value heads."""
    grouped = scores.view(n_kv_teacher, -1)  # (kv, group): query head h is in group h // group
    groups = _top(grouped.sum(1), n_kv)
    per_group = n_heads // n_kv
    heads = torch.cat([g * grouped.shape[1] + _top(grouped[g], per_group) for g in groups.tolist()])
    return heads, groups


def _rows(units: Tensor, size: int) -> Tensor:
    """Weight rows of the kept ``units`` (heads) of ``size`` rows each: (k,) -> (k * size,)."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def _slice(value: Tensor, dims: tuple, index: Mapping[str, Tensor]) -> Tensor:
    for dim, kind in enumerate(dims[:value.dim()]):
        if kind is not None:
            value = value.index_select(dim, index[kind].to(value.device))
    return value


def _pruned_state(teacher: nn.Module, student_keys: Iterable[str], layers: list[int],
                  index_of_layer: list[dict], hidden: Tensor) -> dict[str, Tensor]:
    """The student's float32 state dict: each teacher weight (dequantized) sliced by the kept indices."""
    teacher_state = dequantized_state_dict(teacher)  # an int4 teacher's layers give float weights
    state = {}
    for key in student_keys:
        module, _, kind = key.rpartition(".")
        if module.startswith("model.layers."):
            idx, rest = module[len("model.layers."):].split(".", 1)
            source = f"model.layers.{layers[int(idx)]}.{rest}.{kind}"
            dims, index = _LAYER_SLICES.get(rest), {**index_of_layer[int(idx)], "h": hidden}
        else:
            source, dims, index = key, _TOP_SLICES.get(module), {"h": hidden}
        if dims is None:
            raise ModelError(f"{KEY} does not know how to prune the teacher's {key}: an unsupported variant "
                             "of this family; use student.from_teacher.layers")
        value = plain_tensor(teacher_state[source])  # a torchao teacher's weights, dequantized one at a time
        state[key] = _slice(value.detach(), dims, index).float().cpu().clone()
    return state


def _shape(config) -> str:
    return (f"layers {config.num_hidden_layers}, hidden {config.hidden_size}, intermediate "
            f"{config.intermediate_size}, heads {config.num_attention_heads}/{_kv_heads(config)} kv, "
            f"{count_parameters(config):,} parameters")


def prune_teacher(teacher: nn.Module, prune: PruneConfig, batches: Iterable[Mapping[str, Tensor]], *,
                  progress: bool = False) -> nn.Module:
    """A float32 student of the teacher's class with config :func:`pruned_config`: the most important
    blocks (in order), heads and channels of ``teacher`` on the first ``prune.calibration_batches``
    of ``batches``, their weights copied."""
    config = pruned_config(teacher.config, prune)
    importance = measure_importance(teacher, itertools.islice(batches, prune.calibration_batches),
                                    layer_importance=prune.layer_importance, progress=progress)
    layers = _top(importance.layers, config.num_hidden_layers).tolist()
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [teacher.config.layer_types[i] for i in layers]
    d, n_kv_teacher = config.head_dim, _kv_heads(teacher.config)
    index_of_layer = []
    for i in layers:
        heads, groups = _kept_heads(importance.heads[i], n_kv_teacher, config.num_attention_heads,
                                    config.num_key_value_heads)
        index_of_layer.append({"q": _rows(heads, d), "kv": _rows(groups, d),
                               "m": _top(importance.mlp[i], config.intermediate_size)})
    hidden = _top(importance.hidden, config.hidden_size)
    student = type(teacher)(config)
    student.load_state_dict(_pruned_state(teacher, student.state_dict(), layers, index_of_layer, hidden))
    student = student.float()
    log.info("pruned the teacher (%s) to %s; kept blocks %s", _shape(teacher.config), _shape(config), layers)
    return student
