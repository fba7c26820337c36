"""TermBalancer's arithmetic against the papers' formulas, on parameters whose gradients we choose."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from potstill.config import LossConfig
from potstill.training.balance import TermBalancer, configured_weights


def _cfg(**loss) -> LossConfig:
    base = {"logits": {"weight": 1.0}, "hidden": {"weight": 1.0}}
    base.update(loss)
    return LossConfig.model_validate(base)


def _step(balancer: TermBalancer, grads: dict[str, list[float]], step: int = 0, value: dict | None = None):
    """One micro-batch whose term ``t`` has gradient ``grads[t]`` w.r.t. the single parameter."""
    (p,) = balancer.shared
    losses = {t: (p * torch.tensor(g)).sum() + (value or {}).get(t, 1.0) for t, g in grads.items()}
    balancer.accumulate(losses)
    return balancer.finish(None, step)


def _param(n: int = 2) -> nn.Parameter:
    return nn.Parameter(torch.zeros(n))


def test_pcgrad_matches_the_paper_on_two_conflicting_gradients():
    p = _param()
    b = TermBalancer(_cfg(balance="pcgrad"), [p], [])
    metrics = _step(b, {"logits": [1.0, 0.0], "hidden": [-1.0, 1.0]})
    # g1' = g1 - (g1.g2 / |g2|^2) g2 = [1, 0] + 0.5 [-1, 1];  g2' = g2 - (g2.g1 / |g1|^2) g1 = [0, 1]
    assert torch.allclose(p.grad, torch.tensor([0.5, 0.5]) + torch.tensor([0.0, 1.0]))
    assert metrics["grad_cos/logits_hidden"] == pytest.approx(-1 / math.sqrt(2))
    assert metrics["grad_norm/hidden"] == pytest.approx(math.sqrt(2))


def test_pcgrad_leaves_agreeing_gradients_alone():
    p = _param()
    b = TermBalancer(_cfg(balance="pcgrad"), [p], [])
    _step(b, {"logits": [1.0, 0.0], "hidden": [1.0, 2.0]})
    assert torch.allclose(p.grad, torch.tensor([2.0, 2.0]))


def test_pcgrad_three_terms_removes_every_pairwise_conflict_it_meets():
    p = _param(3)
    cfg = _cfg(balance="pcgrad", attention={"weight": 1.0})
    b = TermBalancer(cfg, [p], [])
    grads = {"logits": [1.0, 0.0, 0.0], "hidden": [-1.0, 1.0, 0.0], "attention": [0.0, -1.0, 1.0]}
    _step(b, grads, step=3)
    # The paper's algorithm, written out: each term's gradient projected off the others in some order.
    g = {t: torch.tensor(v, dtype=torch.float64) for t, v in grads.items()}

    def projected(t, order):
        x = g[t].clone()
        for o in order:
            if x @ g[o] < 0:
                x = x - (x @ g[o]) / (g[o] @ g[o]) * g[o]
        return x

    orders = {t: [[o for o in g if o != t], [o for o in g if o != t][::-1]] for t in g}
    candidates = [sum(projected(t, orders[t][i]) for t, i in zip(g, choice))
                  for choice in __import__("itertools").product((0, 1), repeat=3)]
    assert any(torch.allclose(p.grad.double(), c, atol=1e-6) for c in candidates)
    assert not torch.allclose(p.grad, torch.tensor([0.0, 0.0, 1.0]))  # not the plain sum


def test_pcgrad_order_is_seeded_by_step_and_the_same_on_a_rebuild():
    cfg = _cfg(balance="pcgrad", attention={"weight": 1.0})
    grads = {"logits": [1.0, 0.0, 0.0], "hidden": [-1.0, 1.0, 0.0], "attention": [0.0, -1.0, 1.0]}
    out = []
    for _ in range(2):
        p = _param(3)
        _step(TermBalancer(cfg, [p], [], seed=7), grads, step=5)
        out.append(p.grad.clone())
    assert torch.equal(out[0], out[1])


def test_fixed_mode_sums_and_only_measures():
    p = _param()
    b = TermBalancer(_cfg(log_term_gradients=True), [p], [])
    metrics = _step(b, {"logits": [1.0, 0.0], "hidden": [-1.0, 1.0]})
    assert torch.allclose(p.grad, torch.tensor([0.0, 1.0]))
    assert "balance/logits" not in metrics and "grad_cos/logits_hidden" in metrics


def test_gradnorm_equalizes_gradient_norms_at_alpha_zero():
    p = _param()
    b = TermBalancer(_cfg(balance="gradnorm", gradnorm_alpha=0.0, gradnorm_rate=0.5), [p], [])
    for step in range(200):
        metrics = _step(b, {"logits": [10.0, 0.0], "hidden": [0.0, 1.0]}, step=step)
    assert sum(b.weights.values()) == pytest.approx(2.0)
    # G_i = w_i |g_i| converge to the same value: w_logits * 10 == w_hidden * 1.
    assert b.weights["logits"] * 10 == pytest.approx(b.weights["hidden"] * 1, rel=1e-3)
    assert metrics["balance/hidden"] == pytest.approx(b.weights["hidden"])


def test_gradnorm_targets_follow_the_configured_weights():
    p = _param()
    cfg = _cfg(balance="gradnorm", gradnorm_alpha=0.0, gradnorm_rate=0.5, hidden={"weight": 0.25})
    b = TermBalancer(cfg, [p], [])
    for step in range(300):
        _step(b, {"logits": [1.0, 0.0], "hidden": [0.0, 1.0]}, step=step)
    # target shares 1 : 0.25 of the gradient norm
    assert b.weights["hidden"] / b.weights["logits"] == pytest.approx(0.25, rel=1e-3)
    assert configured_weights(cfg) == {"logits": 1.0, "hidden": 0.25}


def test_gradnorm_gives_a_slower_term_a_larger_share():
    p = _param()
    b = TermBalancer(_cfg(balance="gradnorm", gradnorm_alpha=1.5, gradnorm_rate=0.5), [p], [])
    _step(b, {"logits": [1.0, 0.0], "hidden": [0.0, 1.0]}, value={"logits": 1.0, "hidden": 1.0})
    for step in range(1, 200):  # logits' loss halved, hidden's unchanged: hidden trains slower
        _step(b, {"logits": [1.0, 0.0], "hidden": [0.0, 1.0]}, step=step, value={"logits": 0.5, "hidden": 1.0})
    assert b.weights["hidden"] > b.weights["logits"]


def test_accumulation_sums_micro_batches_before_combining():
    p = _param()
    b = TermBalancer(_cfg(balance="pcgrad"), [p], [])
    for g in ([1.0, 0.0], [1.0, 0.0]):
        b.accumulate({"logits": (p * torch.tensor(g)).sum(), "hidden": (p * torch.tensor([-1.0, 1.0])).sum()})
    b.finish(None, 0)
    # Step gradients [2, 0] and [-2, 2]: g1' = [2,0] + 0.5 [-2,2] = [1,1]; g2' = [0,2]
    assert torch.allclose(p.grad, torch.tensor([1.0, 3.0]))


def test_a_terms_own_parameters_get_its_gradient_only():
    p, projector = _param(), nn.Parameter(torch.zeros(1))
    b = TermBalancer(_cfg(balance="pcgrad"), [p], [projector])
    b.accumulate({"logits": (p * torch.tensor([1.0, 0.0])).sum(),
                  "hidden": (p * torch.tensor([-1.0, 1.0])).sum() + 3.0 * projector.sum()})
    b.finish(None, 0)
    assert torch.equal(projector.grad, torch.tensor([3.0]))


def test_state_round_trips_through_json():
    p = _param()
    cfg = _cfg(balance="gradnorm")
    b = TermBalancer(cfg, [p], [])
    for step in range(3):
        _step(b, {"logits": [3.0, 0.0], "hidden": [0.0, 1.0]}, step=step)
    state = json.loads(json.dumps(b.state_dict()))
    c = TermBalancer(cfg, [_param()], [])
    c.load_state_dict(state)
    assert c.weights == b.weights and c.initial == b.initial


def test_a_missing_term_is_an_error_and_one_term_is_refused():
    b = TermBalancer(_cfg(balance="pcgrad"), [_param()], [])
    with pytest.raises(RuntimeError, match="no hidden term"):
        b.accumulate({"logits": _param().sum()})
    with pytest.raises(ValueError, match="needs two terms or more"):
        _cfg(balance="pcgrad", hidden={"weight": 0.0})
    assert TermBalancer.build(_cfg(), [_param()], []) is None
