"""Combining the loss terms' gradients: fixed weights, GradNorm, or PCGrad (``loss.balance``).

The objective has up to three terms (:attr:`potstill.config.LossConfig.balanced_terms`):
``logits`` (the logit divergence with hard-label CE), ``hidden`` and ``attention``. With fixed
weights their weighted sum is backpropagated once. When their gradients point against each
other, fixed weights make them fight; a :class:`TermBalancer` instead takes each term's gradient
separately (one backward pass per term and micro-batch, ``torch.autograd.grad``), sums them over
the step's micro-batches and processes, and only then combines them:

* ``fixed`` (with ``loss.log_term_gradients``): the plain sum, as without a balancer; only the
  measurements below are added;
* ``gradnorm`` (Chen et al., arXiv 1711.02257): term ``i`` gets a multiplier ``w_i``. With
  ``G_i = w_i ||g_i||`` its gradient norm on the student's parameters (the shared ones; a feature
  projector belongs to one term), ``r_i`` its loss relative to its first step's loss, over the mean
  of those ratios (a term that trains slower has ``r_i > 1``), and ``c_i`` its configured weight (for
  ``logits``: ``loss.logits.weight + loss.ce.weight``), the target is
  ``G*_i = mean(G) * c_i / mean(c) * r_i ** alpha``. After each step
  ``log w_i -= rate * (G_i - G*_i) / mean(G)`` (GradNorm's gradient step on ``|G_i - G*_i|``, taken
  on the log-weights and divided by the mean norm so that the rate does not depend on the
  gradients' scale), then the weights are rescaled to sum to the number of terms. The configured
  weights are thus the target *shares of the gradient norm*, not fixed multipliers;
* ``pcgrad`` (Yu et al., arXiv 2001.06782): each term's gradient loses its component along every
  other term's gradient it conflicts with (negative dot product), in a random order drawn from a
  generator seeded by the run's seed and the step (the same on every process and after a resume);
  the projected gradients are summed.

Normalization stays where it is for every mode: each micro-batch's term is divided by the step's
valid tokens on all processes (:func:`~potstill.training.objective.step_loss` with a world size of
1, because the buffers are summed over processes here, not averaged by DDP). The combination runs
on the summed, step-wide gradients, identical on every process, so gradient accumulation and many
processes give what one process with the whole batch gives.

Logged per step: ``grad_norm/<term>`` (before any weight of the balancer, after the configured
ones), ``grad_cos/<a>_<b>`` for each pair of terms (the conflict: negative means they fight), and
with gradnorm ``balance/<term>`` (the multipliers).

Memory: one gradient buffer per term (float32, the trained parameters' size). Time: one backward
pass per term instead of one in total.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ..config import LossConfig
from ..errors import ConfigError

MODES = ("fixed", "gradnorm", "pcgrad")


def configured_weights(cfg: LossConfig) -> dict[str, float]:
    """Each balanced term's configured weight (``logits``: the divergence's plus CE's)."""
    weights = {"logits": cfg.logits.weight + cfg.ce.weight, "hidden": cfg.hidden.weight,
               "attention": cfg.attention.weight}
    return {name: weights[name] for name in cfg.balanced_terms}


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Sum of elementwise products over parameter lists, in float64."""
    return float(sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b)))


class TermBalancer:
    """Per-term gradients of one optimizer step, combined by ``loss.balance``.

    ``shared``: the student's trained parameters (norms, cosines and projections are measured on
    them); ``extra``: parameters of one term only (feature projectors), which receive their term's
    gradient (times its GradNorm multiplier) but take no part in the measurements.
    """

    def __init__(self, cfg: LossConfig, shared: list[nn.Parameter], extra: list[nn.Parameter], *, seed: int = 0):
        if cfg.balance not in MODES:
            raise ConfigError(f"loss.balance must be one of {', '.join(MODES)}, got {cfg.balance!r}")
        self.mode = cfg.balance
        self.terms = cfg.balanced_terms
        self.targets = configured_weights(cfg)
        self.alpha, self.rate, self.seed = cfg.gradnorm_alpha, cfg.gradnorm_rate, seed
        self.shared, self.extra = list(shared), list(extra)
        self.params = self.shared + self.extra
        self.weights = dict.fromkeys(self.terms, 1.0)
        self.initial: dict[str, float] = {}
        self._grads: dict[str, list[torch.Tensor]] = {}
        self._values: dict[str, torch.Tensor] = {}

    @classmethod
    def build(cls, cfg: LossConfig, shared: list[nn.Parameter], extra: list[nn.Parameter], *, seed: int = 0,
              precision: str = "fp32") -> "TermBalancer | None":
        """A balancer where the run needs one (``loss.balance`` not fixed, or ``log_term_gradients``).
        Preflight has refused FSDP (per-term gradients of sharded parameters are not built)."""
        if cfg.balance == "fixed" and not cfg.log_term_gradients:
            return None
        what = f"loss.balance={cfg.balance}" if cfg.balance != "fixed" else "loss.log_term_gradients"
        if precision == "fp16":
            raise ConfigError(f"{what} is not supported with train.precision=fp16 (its loss scaling): use bf16 or fp32")
        if len(cfg.balanced_terms) < 2:
            raise ConfigError(f"{what} needs two terms or more among loss.logits (with loss.ce), loss.hidden and "
                              f"loss.attention; this run has {', '.join(cfg.balanced_terms) or 'none'}")
        return cls(cfg, shared, extra, seed=seed)

    # -- one micro-batch ----------------------------------------------------------------------
    def accumulate(self, term_losses: dict[str, torch.Tensor]) -> None:
        """Add each term's gradient w.r.t. every parameter to its buffer: one backward pass per
        term. ``term_losses``: name -> 0-dim loss, already normalized by the step's valid tokens."""
        missing = [t for t in self.terms if t not in term_losses]
        if missing:
            raise RuntimeError(f"the objective gave no {', '.join(missing)} term to balance")
        for k, name in enumerate(self.terms):
            loss = term_losses[name]
            grads = torch.autograd.grad(loss, self.params, retain_graph=k < len(self.terms) - 1, allow_unused=True)
            buffer = self._grads.get(name)
            if buffer is None:
                self._grads[name] = [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                                     for p, g in zip(self.params, grads)]
            else:
                for b, g in zip(buffer, grads):
                    if g is not None:
                        b.add_(g)
            self._values[name] = self._values.get(name, torch.zeros((), dtype=torch.float64)) + \
                loss.detach().double().cpu()

    # -- the step -----------------------------------------------------------------------------
    def finish(self, accelerator, step: int) -> dict[str, float]:
        """Sum the buffers over processes, combine them into every parameter's ``.grad``, update the
        GradNorm multipliers; returns the step's measurements (the same on every process)."""
        grads, values = self._grads, self._values
        self._grads, self._values = {}, {}
        if accelerator is not None and accelerator.num_processes > 1:
            for name in self.terms:
                flat = torch.cat([g.reshape(-1) for g in grads[name]] + [values[name].float().reshape(1)])
                flat = accelerator.reduce(flat.to(accelerator.device), reduction="sum")
                offset = 0
                for g in grads[name]:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
                values[name] = flat[-1].double().cpu()
        n = len(self.shared)
        norms = {t: math.sqrt(_dot(grads[t][:n], grads[t][:n])) for t in self.terms}
        metrics = {f"grad_norm/{t}": norms[t] for t in self.terms}
        for a, b in itertools.combinations(self.terms, 2):
            denom = norms[a] * norms[b]
            metrics[f"grad_cos/{a}_{b}"] = _dot(grads[a][:n], grads[b][:n]) / denom if denom > 0 else 0.0
        if self.mode == "pcgrad":
            combined = self._pcgrad(grads, step)
        else:
            combined = [sum(self.weights[t] * grads[t][i] for t in self.terms) for i in range(len(self.params))]
        for p, g in zip(self.params, combined):
            p.grad = g.to(p.dtype)
        if self.mode == "gradnorm":
            self._update_weights(norms, {t: float(values[t]) for t in self.terms})
            metrics.update({f"balance/{t}": w for t, w in self.weights.items()})
        return metrics

    def _pcgrad(self, grads: dict[str, list[torch.Tensor]], step: int) -> list[torch.Tensor]:
        """PCGrad: project each term's gradient off the others it conflicts with, then sum."""
        n = len(self.shared)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        squared = {t: _dot(grads[t][:n], grads[t][:n]) for t in self.terms}
        combined = [torch.zeros_like(g) for g in grads[self.terms[0]]]
        for t in self.terms:
            g = [x.clone() for x in grads[t][:n]]
            others = [o for o in self.terms if o != t]
            for j in torch.randperm(len(others), generator=generator).tolist():
                o = others[j]
                dot = _dot(g, grads[o][:n])
                if dot < 0 and squared[o] > 0:
                    for x, y in zip(g, grads[o][:n]):
                        x.add_(y, alpha=-dot / squared[o])
            for i, x in enumerate(g):
                combined[i].add_(x)
            for i in range(n, len(self.params)):  # a term's own parameters: unchanged
                combined[i].add_(grads[t][i])
        return combined

    def _update_weights(self, norms: dict[str, float], losses: dict[str, float]) -> None:
        """One GradNorm step on the multipliers (see the module docstring)."""
        if not self.initial:
            self.initial = {t: max(v, 1e-12) for t, v in losses.items()}
        weighted = {t: self.weights[t] * norms[t] for t in self.terms}
        mean_g = sum(weighted.values()) / len(self.terms)
        if not mean_g > 0:
            return
        ratios = {t: losses[t] / self.initial[t] for t in self.terms}
        mean_r = sum(ratios.values()) / len(self.terms)
        mean_c = sum(self.targets.values()) / len(self.terms)
        for t in self.terms:
            r = ratios[t] / mean_r if mean_r > 0 else 1.0
            target = mean_g * self.targets[t] / mean_c * max(r, 0.0) ** self.alpha
            self.weights[t] *= math.exp(-self.rate * (weighted[t] - target) / mean_g)
        total = sum(self.weights.values())
        self.weights = {t: w * len(self.terms) / total for t, w in self.weights.items()}

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-safe state (floats round-trip exactly through JSON)."""
        return {"mode": self.mode, "weights": dict(self.weights), "initial": dict(self.initial)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            return  # the balance mode changed on resume: start its state afresh
        self.weights = {t: float(state["weights"].get(t, 1.0)) for t in self.terms}
        self.initial = {t: float(v) for t, v in state.get("initial", {}).items() if t in self.terms}
