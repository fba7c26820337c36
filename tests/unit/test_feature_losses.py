"""Hidden-state and attention-relation losses: identities, invariances, masks, gradients."""

from __future__ import annotations

import pytest
import torch

from potstill.losses.features import (
    attention_relation_loss,
    hidden_cosine,
    hidden_loss,
    hidden_mse,
    hidden_nmse,
    relation_kl,
    relation_log_probs,
)

torch.manual_seed(0)
B, T, H = 2, 6, 8


def _mask():
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 4:] = False
    return m


@pytest.mark.parametrize("kind", ["mse", "nmse", "cosine"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_zero_when_equal(kind, layer_norm):
    x = torch.randn(B, T, H)
    loss, n = hidden_loss(kind, x, x.clone(), _mask(), layer_norm=layer_norm)
    assert n == 10
    assert loss.abs() < 1e-5


def test_values_by_hand():
    s, t = torch.randn(B, T, H), torch.randn(B, T, H)
    mask = _mask()
    assert torch.allclose(hidden_mse(s, t, mask)[0], ((s - t) ** 2).mean(-1)[mask].sum())
    assert torch.allclose(hidden_nmse(s, t, mask)[0], (((s - t) ** 2).sum(-1) / (t ** 2).sum(-1))[mask].sum())
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    assert torch.allclose(hidden_cosine(s, t, mask)[0], (1 - cos)[mask].sum())


def test_cosine_is_scale_invariant_mse_is_not():
    s, t = torch.randn(B, T, H), torch.randn(B, T, H)
    mask = _mask()
    assert torch.allclose(hidden_cosine(3.0 * s, t, mask)[0], hidden_cosine(s, t, mask)[0], atol=1e-5)
    assert not torch.allclose(hidden_mse(3.0 * s, t, mask)[0], hidden_mse(s, t, mask)[0])
    # nmse is relative to the teacher's scale: scaling both sides leaves it unchanged.
    assert torch.allclose(hidden_nmse(5 * s, 5 * t, mask)[0], hidden_nmse(s, t, mask)[0], rtol=1e-5)


def test_layer_norm_removes_shift_and_scale():
    s, t = torch.randn(B, T, H), torch.randn(B, T, H)
    mask = _mask()
    plain = hidden_mse(s, t, mask, layer_norm=True)[0]
    assert torch.allclose(hidden_mse(4 * s + 2, t, mask, layer_norm=True)[0], plain, atol=1e-4)
    assert not torch.allclose(hidden_mse(4 * s + 2, t, mask)[0], hidden_mse(s, t, mask)[0])


@pytest.mark.parametrize("kind", ["mse", "nmse", "cosine"])
def test_masked_tokens_are_ignored(kind):
    s, t = torch.randn(B, T, H, requires_grad=True), torch.randn(B, T, H)
    mask = _mask()
    t2 = t.clone()
    t2[0, 4:] += 100.0  # change only masked positions
    a, _ = hidden_loss(kind, s, t, mask)
    b, _ = hidden_loss(kind, s, t2, mask)
    assert torch.allclose(a, b)
    a.backward()
    assert torch.all(s.grad[0, 4:] == 0) and s.grad[0, :4].abs().sum() > 0


def test_bf16_inputs_work_in_float32():
    s, t = torch.randn(B, T, H), torch.randn(B, T, H)
    loss, _ = hidden_mse(s.bfloat16(), t.bfloat16(), _mask())
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, hidden_mse(s, t, _mask())[0], rtol=2e-2)


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="project the student"):
        hidden_mse(torch.randn(B, T, 4), torch.randn(B, T, 8), _mask())


def test_relations_are_causal_masked_distributions():
    x = torch.randn(B, T, 8)
    key_mask = torch.ones(B, T)
    key_mask[1, 0] = 0  # a padded first position
    logp = relation_log_probs(x, 2, key_mask)
    p = logp.exp()
    assert p.shape == (B, 2, T, T)
    assert torch.allclose(p.sum(-1), torch.ones(B, 2, T))
    assert torch.all(p.triu(1) == 0)          # no future keys
    assert torch.all(p[1, :, 1:, 0] == 0)     # no padded keys
    # Without the causal mask every allowed key gets mass.
    assert torch.all(relation_log_probs(x, 2, torch.ones(B, T), causal=False).exp() > 0)


def test_relation_kl_zero_when_equal_and_width_free():
    mask = _mask()
    s = torch.randn(B, T, 8)
    loss, n = relation_kl(s, s.clone(), mask, heads=2)
    assert loss.abs() < 1e-5 and n == 10
    # Widths may differ (student 8, teacher 12): the relations are T x T either way.
    loss, _ = relation_kl(torch.randn(B, T, 8, requires_grad=True), torch.randn(B, T, 12), mask, heads=2)
    assert loss > 0


def test_relation_kl_by_hand():
    s, t = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, _ = relation_kl(s, t, mask, heads=1, causal=False)
    ps = torch.softmax(s @ s.transpose(-1, -2) / 2.0, -1)
    pt = torch.softmax(t @ t.transpose(-1, -2) / 2.0, -1)
    assert torch.allclose(loss, (pt * (pt.log() - ps.log())).sum(), atol=1e-5)


def test_relation_masked_queries_ignored_and_gradient_finite():
    mask = _mask()
    key_mask = mask.clone()
    s = torch.randn(B, T, 8, requires_grad=True)
    t = torch.randn(B, T, 8)
    t2 = t.clone()
    t2[0, 4:] = 50.0  # masked queries *and* keys: no effect
    a, _ = relation_kl(s, t, mask, heads=2, key_mask=key_mask)
    b, _ = relation_kl(s, t2, mask, heads=2, key_mask=key_mask)
    assert torch.allclose(a, b)
    a.backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[0, 4:] == 0)


def test_attention_relation_loss_sums_q_k_v():
    mask = _mask()
    qkv_s = [torch.randn(B, T, 8) for _ in range(3)]
    qkv_t = [torch.randn(B, T, 12) for _ in range(3)]
    total, n = attention_relation_loss(qkv_s, qkv_t, mask, heads=4)
    parts = [relation_kl(s, t, mask, heads=4)[0] for s, t in zip(qkv_s, qkv_t)]
    assert torch.allclose(total, sum(parts)) and n == 10
    assert attention_relation_loss(qkv_s, qkv_s, mask, heads=4)[0].abs() < 1e-5
    with pytest.raises(ValueError, match="must divide"):
        attention_relation_loss(qkv_s, qkv_t, mask, heads=3)
