"""The teacher's statistics for ``loss.hidden.preprocess`` = standardize | whitening.

Fitted once, before training, on the teacher's activations at each mapped teacher layer over
the valid tokens of the first ``loss.hidden.fit_batches`` train batches (the same batches on
every process and at every resume point: :func:`potstill.training.setup.calibration_batches`).
Both sides of the hidden-state loss then go through the same fixed map
(:func:`potstill.losses.features.standardize` / :func:`~potstill.losses.features.whiten`):
fitted on the teacher, the target does not move while the student trains.

    standardize   mean (H,), std (H,) = sqrt(var + eps)            per channel
    whitening     mean (H,), W (H, H) = U diag((lambda + eps)^-1/2) U^T   (ZCA: Sigma^{-1/2})

Sigma is the teacher's channel covariance (population: divided by the token count), from
float64 sums over the fit tokens (n, sum of x, sum of x x^T; never a (tokens, H, H) tensor),
its eigendecomposition in float64; what is kept is float32. ``eps`` is relative:
``EPS_RELATIVE`` (1e-5) x the mean eigenvalue (for standardize: x the mean variance), so a
singular covariance (fewer fit tokens than channels, a constant channel) still gives a finite map.

Saved with the run: in each checkpoint as ``feature_stats.pt`` (restored on resume), and after
the run in ``<run>/projectors/`` as ``feature_stats.safetensors`` + ``feature_stats.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..losses.features import FITTED, LayerStats
from ..models.hidden import forward_hidden
from .hooks import capture

log = logging.getLogger("potstill")

CHECKPOINT_NAME = "feature_stats"            # <checkpoint>/feature_stats.pt
WEIGHTS_FILE = "feature_stats.safetensors"   # <run>/projectors/feature_stats.safetensors
SPEC_FILE = "feature_stats.json"
EPS_RELATIVE = 1e-5


class Moments:
    """Float64 running sums of one layer's activations (N, H) over the fit tokens.

    Sums are of ``x - shift`` (shift: the first rows' mean), which keeps the covariance exact
    when the mean is large against the spread. ``full``: the (H, H) sum of outer products
    (whitening), else the per-channel sum of squares (standardize)."""

    def __init__(self, full: bool):
        self.full = full
        self.n = 0
        self.shift = self.s1 = self.s2 = None

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        device = x.device if x.device.type != "mps" else torch.device("cpu")  # no float64 on mps
        x = x.detach().to(device=device, dtype=torch.float64)
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=device) if self.full \
                else torch.zeros_like(self.shift)
        d = x - self.shift
        self.s1 += d.sum(0)
        self.s2 += d.T @ d if self.full else d.pow(2).sum(0)
        self.n += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.n

    def covariance(self) -> torch.Tensor:
        """(H, H) float64, population (divided by n); needs ``full``."""
        c = (self.s2 - torch.outer(self.s1, self.s1) / self.n) / self.n
        return (c + c.T) / 2

    def variance(self) -> torch.Tensor:
        """(H,) float64, population."""
        if self.full:
            return self.covariance().diagonal().clamp(min=0)
        return ((self.s2 - self.s1.pow(2) / self.n) / self.n).clamp(min=0)


def relative_eps(values: torch.Tensor) -> float:
    """``EPS_RELATIVE`` x the mean of ``values`` (eigenvalues or variances); 1e-12 if that is 0."""
    return max(EPS_RELATIVE * float(values.clamp(min=0).mean()), 1e-12)


def zca_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """``Sigma^{-1/2}`` (H, H) float64 of a symmetric PSD ``covariance``, with the relative eps."""
    lam, u = torch.linalg.eigh(covariance.double())
    lam = lam.clamp(min=0)
    return (u * (lam + relative_eps(lam)).rsqrt()) @ u.T


class FeatureStats(nn.Module):
    """Buffers ``t{L}_mean`` (H,) and ``t{L}_std`` (H,) or ``t{L}_whitening`` (H, H) per teacher
    layer L (float32), and ``n_tokens`` (the fit tokens). No parameters: nothing trains them."""

    def __init__(self, kind: str, layers: Iterable[int], width: int):
        super().__init__()
        if kind not in FITTED:
            raise ValueError(f"no statistics to fit for preprocess '{kind}' (one of {', '.join(FITTED)})")
        self.kind, self.layers, self.width = kind, sorted(set(layers)), int(width)
        for layer in self.layers:
            self.register_buffer(f"t{layer}_mean", torch.zeros(width))
            if kind == "standardize":
                self.register_buffer(f"t{layer}_std", torch.ones(width))
            else:
                self.register_buffer(f"t{layer}_whitening", torch.eye(width))
        self.register_buffer("n_tokens", torch.zeros((), dtype=torch.int64))

    def layer(self, layer: int) -> LayerStats:
        """What :func:`potstill.losses.features.hidden_loss` takes for teacher layer ``layer``."""
        if self.kind == "standardize":
            return LayerStats(mean=getattr(self, f"t{layer}_mean"), std=getattr(self, f"t{layer}_std"))
        return LayerStats(mean=getattr(self, f"t{layer}_mean"), whitening=getattr(self, f"t{layer}_whitening"))

    @classmethod
    def from_moments(cls, kind: str, moments: Mapping[int, Moments]) -> "FeatureStats":
        first = next(iter(moments.values()))
        stats = cls(kind, moments, first.s1.shape[0])
        for layer, m in moments.items():
            getattr(stats, f"t{layer}_mean").copy_(m.mean())
            if kind == "standardize":
                var = m.variance()
                getattr(stats, f"t{layer}_std").copy_((var + relative_eps(var)).sqrt())
            else:
                getattr(stats, f"t{layer}_whitening").copy_(zca_matrix(m.covariance()))
        stats.n_tokens.fill_(first.n)
        return stats

    def spec(self) -> dict:
        return {"preprocess": self.kind, "teacher_layers": self.layers, "width": self.width,
                "n_tokens": int(self.n_tokens), "eps": f"{EPS_RELATIVE} x mean eigenvalue (standardize: x mean variance)",
                "covariance": "population (divided by n_tokens)"}

    def save(self, folder: Path) -> None:
        """``feature_stats.safetensors`` + ``feature_stats.json`` in ``folder`` (created)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))
        (folder / SPEC_FILE).write_text(json.dumps(self.spec(), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "FeatureStats":
        from safetensors.torch import load_file

        folder = Path(folder)
        spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
        stats = cls(spec["preprocess"], spec["teacher_layers"], spec["width"])
        stats.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return stats


@torch.no_grad()
def fit_feature_stats(teacher: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], layers: Iterable[int],
                      mask_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], *, kind: str = "whitening",
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      progress: bool = False) -> FeatureStats:
    """Run ``teacher`` (no grad, its capture hooks on ``layers``, 1-based) on ``batches`` (dicts of
    ``input_ids``, ``attention_mask``, ``labels`` (B, T)) and fit ``kind`` statistics on the rows
    ``mask_fn(batch)`` (B, T) bool selects. The forward is the teacher's own (under ``autocast``),
    so the statistics describe the activations training will see."""
    from tqdm.auto import tqdm

    layers = sorted(set(layers))
    moments = {layer: Moments(full=kind == "whitening") for layer in layers}
    batches = list(batches)
    for batch in tqdm(batches, desc=f"loss.hidden {kind}: teacher statistics", disable=not progress, leave=False):
        with autocast(), capture(teacher, layers) as got:
            forward_hidden(teacher, teacher, batch["input_ids"], batch.get("attention_mask"))
        mask = mask_fn(batch)
        for layer in layers:
            moments[layer].add(got.hidden[layer][mask])
    n = moments[layers[0]].n
    if n == 0:
        raise ConfigError(f"loss.hidden.preprocess={kind}: the first {len(batches)} train batches hold no token that "
                          "counts, so the teacher's statistics cannot be fitted; raise loss.hidden.fit_batches")
    width = moments[layers[0]].s1.shape[0]
    if kind == "whitening" and n <= width:
        log.warning("loss.hidden.preprocess=whitening: %d fit tokens for %d channels, so the teacher's covariance is "
                    "singular (eps = %g x mean eigenvalue keeps the map finite); raise loss.hidden.fit_batches",
                    n, width, EPS_RELATIVE)
    stats = FeatureStats.from_moments(kind, moments)
    log.info("loss.hidden.preprocess=%s: teacher statistics of layers %s fitted on %d tokens (%d batches)",
             kind, layers, n, len(batches))
    return stats
