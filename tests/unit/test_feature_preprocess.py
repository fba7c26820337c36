"""loss.hidden.preprocess: none | layernorm | standardize | whitening (the teacher's fitted statistics)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from potstill.config import LossConfig
from potstill.features.distiller import FeatureDistiller, fit_mask
from potstill.features.hooks import capture
from potstill.features.preprocess import FeatureStats, Moments, fit_feature_stats, zca_matrix
from potstill.features.projectors import Projectors
from potstill.losses.features import LayerStats, hidden_loss, standardize, whiten

V = 64


def tiny_llama(layers: int = 2, width: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                        pad_token_id=0)).eval()


def batches(n: int = 3, b: int = 4, t: int = 20, seed: int = 0) -> list[dict]:
    """Right-padded batches with a masked prompt: labels -100 on the first 3 tokens and on padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, V, (b, t), generator=g)
        attn = torch.ones(b, t, dtype=torch.long)
        for row, length in enumerate(torch.randint(t // 2, t + 1, (b,), generator=g).tolist()):
            ids[row, length:], attn[row, length:] = 0, 0
        labels = ids.masked_fill(attn == 0, -100)
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": attn, "labels": labels})
    return out


def well_conditioned(n: int, h: int, seed: int = 0) -> torch.Tensor:
    """(n, h) correlated data with eigenvalues in [0.25, 9] and a large mean."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=torch.float64))
    scales = torch.linspace(0.5, 3.0, h, dtype=torch.float64)
    return (torch.randn(n, h, generator=g, dtype=torch.float64) * scales) @ q.T + 50.0


def captured_rows(teacher, data, layers) -> dict[int, torch.Tensor]:
    rows = {layer: [] for layer in layers}
    for batch in data:
        with torch.no_grad(), capture(teacher, layers) as got:
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for layer in layers:
            rows[layer].append(got.hidden[layer][fit_mask(batch)])
    return {layer: torch.cat(r) for layer, r in rows.items()}


# -- the float64 sums ---------------------------------------------------------------------------
def test_moments_equal_torch_cov():
    x = well_conditioned(300, 16)
    full, diag = Moments(full=True), Moments(full=False)
    for part in x.split(37):  # uneven parts, float32 in as activations come
        full.add(part.float())
        diag.add(part.float())
    ref = x.float().double()
    assert full.n == diag.n == 300
    torch.testing.assert_close(full.mean(), ref.mean(0), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(full.covariance(), torch.cov(ref.T, correction=0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(diag.variance(), ref.var(0, correction=0), rtol=1e-10, atol=1e-10)
    assert full.s2.dtype == torch.float64 and full.s2.shape == (16, 16)   # (H, H), never (tokens, H, H)


# -- what the maps do on the fit data -------------------------------------------------------------
def test_standardize_makes_the_teachers_fit_activations_zero_mean_unit_variance():
    teacher, data = tiny_llama(), batches()
    stats = fit_feature_stats(teacher, data, [1, 2], fit_mask, kind="standardize")
    rows = captured_rows(teacher, data, [1, 2])
    for layer in (1, 2):
        y = standardize(rows[layer].float(), stats.layer(layer)).double()
        torch.testing.assert_close(y.mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-4, rtol=0)
        # var / (var + eps), eps = 1e-5 x mean variance: within 1e-3 of 1 for these channels
        torch.testing.assert_close(y.var(0, correction=0), torch.ones(32, dtype=torch.float64), atol=1e-3, rtol=0)
    assert int(stats.n_tokens) == sum(int(fit_mask(b).sum()) for b in data)


def test_whitening_makes_the_fit_covariance_identity():
    x = well_conditioned(2000, 24)
    m = Moments(full=True)
    m.add(x.float())
    stats = FeatureStats.from_moments("whitening", {5: m})
    w = stats.layer(5).whitening
    assert w.dtype == torch.float32 and torch.allclose(w, w.T, atol=1e-6)   # ZCA: symmetric
    y = whiten(x.float(), stats.layer(5)).double()
    # eps = 1e-5 x mean eigenvalue, eigenvalues >= 0.25: lambda / (lambda + eps) > 1 - 2e-4; float32 storage
    torch.testing.assert_close(torch.cov(y.T, correction=0), torch.eye(24, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(y.mean(0), torch.zeros(24, dtype=torch.float64), atol=1e-4, rtol=0)


def test_whitening_through_the_teacher():
    teacher, data = tiny_llama(width=16), batches(n=4)
    stats = fit_feature_stats(teacher, data, [2], fit_mask, kind="whitening")
    y = whiten(captured_rows(teacher, data, [2])[2].float(), stats.layer(2)).double()
    cov = torch.cov(y.T, correction=0)
    # the teacher's own activations are less well conditioned: eps damps the smallest directions a little
    assert (cov - torch.eye(16, dtype=torch.float64)).abs().max() < 2e-2


def test_singular_covariance_still_gives_a_finite_map(caplog):
    teacher = tiny_llama(width=32)
    data = [b for b in batches(n=1, b=1, t=10)]          # < 10 fit tokens for 32 channels
    with caplog.at_level(logging.WARNING, logger="potstill"):
        stats = fit_feature_stats(teacher, data, [1], fit_mask, kind="whitening")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "singular" in warnings[0].getMessage()
    w = stats.layer(1).whitening
    assert torch.isfinite(w).all()
    s, t = torch.randn(1, 10, 32), captured_rows(teacher, data, [1])[1].float().unsqueeze(0)
    loss, _ = hidden_loss("mse", s[:, :t.shape[1]], t, torch.ones(1, t.shape[1], dtype=torch.bool),
                          preprocess="whitening", stats=stats.layer(1))
    assert torch.isfinite(loss)
    # The pure function too: a rank-1 covariance.
    v = torch.randn(8, dtype=torch.float64)
    assert torch.isfinite(zca_matrix(torch.outer(v, v))).all()


# -- which tokens are fitted on -------------------------------------------------------------------
def test_masked_and_padded_tokens_are_excluded_from_the_fit():
    teacher, data = tiny_llama(), batches()
    b = data[0]
    mask = fit_mask(b)
    assert not mask[b["attention_mask"] == 0].any()            # padding
    assert not mask[:, :2].any()                               # predicts a label -100 (the prompt)
    assert not mask[:, -1].any()                               # nothing to predict after the last token
    stats = fit_feature_stats(teacher, data, [2], fit_mask, kind="standardize")
    ref = captured_rows(teacher, data, [2])[2].double()
    torch.testing.assert_close(stats.layer(2).mean, ref.mean(0).float(), rtol=1e-5, atol=1e-6)
    # Other tokens in the padding (after every counted position: a causal model's counted
    # activations do not change) and other labels where they are -100: the same statistics.
    changed = [dict(x) for x in data]
    for x in changed:
        x["input_ids"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, V - 1)
    same = fit_feature_stats(teacher, changed, [2], fit_mask, kind="standardize")
    assert all(torch.equal(a, c) for a, c in zip(stats.buffers(), same.buffers()))
    # Counting every token instead changes them: the mask matters.
    everything = fit_feature_stats(teacher, data, [2], lambda x: torch.ones_like(x["labels"], dtype=torch.bool),
                                   kind="standardize")
    assert not torch.allclose(everything.layer(2).mean, stats.layer(2).mean)


# -- none / layernorm unchanged -------------------------------------------------------------------
def _old(kind: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, layer_norm: bool):
    """The hidden-state losses as they were before preprocess existed."""
    s, t = s.float(), t.float()
    if layer_norm:
        s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
    if kind == "mse":
        per = (s - t).pow(2).mean(-1)
    elif kind == "nmse":
        per = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-6)
    else:
        per = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
    return per[mask].sum(), mask.sum()


@pytest.mark.parametrize("kind", ["mse", "nmse", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_none_and_layernorm_are_bit_identical_to_before(kind, dtype):
    torch.manual_seed(0)
    s, t = torch.randn(2, 7, 16, dtype=dtype) * 3 + 1, torch.randn(2, 7, 16, dtype=dtype)
    mask = torch.rand(2, 7) > 0.3
    for layer_norm, preprocess in ((False, "none"), (True, "layernorm")):
        old = _old(kind, s, t, mask, layer_norm)
        for kwargs in ({"layer_norm": layer_norm}, {"preprocess": preprocess}):
            new = hidden_loss(kind, s, t, mask, **kwargs)
            assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]), (kwargs, kind)
    with pytest.raises(ValueError, match="disagree"):
        hidden_loss(kind, s, t, mask, layer_norm=True, preprocess="whitening")
    with pytest.raises(ValueError, match="needs the teacher's fitted statistics"):
        hidden_loss(kind, s, t, mask, preprocess="standardize")


def test_every_preprocess_changes_the_loss():
    x = well_conditioned(64, 8)
    m = Moments(full=True)
    m.add(x.float())
    w = FeatureStats.from_moments("whitening", {1: m}).layer(1)
    d = Moments(full=False)
    d.add(x.float())
    sd = FeatureStats.from_moments("standardize", {1: d}).layer(1)
    t = x[:10].float().view(2, 5, 8)
    s = t + torch.randn_like(t)
    mask = torch.ones(2, 5, dtype=torch.bool)
    values = [float(hidden_loss("mse", s, t, mask, preprocess=p, stats=st)[0])
              for p, st in (("none", None), ("layernorm", None), ("standardize", sd), ("whitening", w))]
    assert len(set(values)) == 4


# -- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preprocess", ["standardize", "whitening"])
def test_gradients_reach_the_student_side_only(preprocess):
    x = well_conditioned(200, 8)
    m = Moments(full=preprocess == "whitening")
    m.add(x.float())
    stats = FeatureStats.from_moments(preprocess, {1: m})
    assert list(stats.parameters()) == [] and all(not b.requires_grad for b in stats.buffers())
    student = torch.randn(2, 5, 8, requires_grad=True)
    teacher = x[:10].float().view(2, 5, 8)
    for kind in ("mse", "nmse", "cosine"):
        student.grad = None
        loss, n = hidden_loss(kind, student, teacher, torch.ones(2, 5, dtype=torch.bool), preprocess=preprocess,
                              stats=stats.layer(1))
        loss.backward()
        assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
        assert all(b.grad is None for b in stats.buffers())


# -- the distiller: fit, terms, checkpoint, run folder --------------------------------------------
def test_distiller_fits_saves_and_restores(tmp_path):
    teacher, student = tiny_llama(layers=3, width=32), tiny_llama(layers=2, width=16, seed=1)
    cfg = LossConfig.model_validate({"logits": {"weight": 0.0}, "hidden": {
        "weight": 1.0, "mapping": "uniform", "preprocess": "whitening", "loss": "mse"}})
    fd = FeatureDistiller(cfg, teacher, student)
    assert fd.needs_fit and fd.hidden_pairs == [(2, 1), (3, 2)]
    data = batches(n=2)
    with capture(student, *fd.student_layers) as s:
        student(input_ids=data[0]["input_ids"])
    with torch.no_grad(), capture(teacher, *fd.teacher_layers) as t:
        teacher(input_ids=data[0]["input_ids"])
    with pytest.raises(RuntimeError, match="fit was not called"):
        fd.terms(s, t, data[0]["labels"], None)
    fd.fit(teacher, data)
    assert fd.stats.layers == [2, 3] and set(fd.checkpoint_modules()) == {"projectors", "feature_stats"}
    term = fd.terms(s, t, data[0]["labels"], None)["hidden"]
    assert torch.isfinite(term) and term > 0
    term.backward()
    assert all(p.grad is not None for p in fd.parameters())

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name, module in fd.checkpoint_modules().items():   # as training.checkpoint.write_main_state does
        torch.save(module.state_dict(), ckpt / f"{name}.pt")
    fitted = {k: v.clone() for k, v in fd.stats.state_dict().items()}
    for b in fd.stats.buffers():
        b.zero_()
    fd.load_checkpoint(ckpt)
    assert all(torch.equal(fd.stats.state_dict()[k], v) for k, v in fitted.items())
    # The run folder: beside projectors.safetensors (what publish_student writes).
    fd.projectors.save(tmp_path / "projectors")
    loaded = FeatureStats.load(tmp_path / "projectors")
    assert loaded.kind == "whitening" and all(torch.equal(loaded.state_dict()[k], v) for k, v in fitted.items())
    assert Projectors.load(tmp_path / "projectors").spec == fd.projectors.spec
    (ckpt / "feature_stats.pt").unlink()
    with pytest.raises(Exception, match="feature_stats.pt"):
        fd.load_checkpoint(ckpt)


def test_none_needs_no_fit():
    teacher, student = tiny_llama(layers=2, width=32), tiny_llama(layers=2, width=16, seed=1)
    for preprocess in ("none", "layernorm"):
        cfg = LossConfig.model_validate({"logits": {"weight": 0.0}, "hidden": {"weight": 1.0, "preprocess": preprocess}})
        fd = FeatureDistiller(cfg, teacher, student)
        assert not fd.needs_fit and set(fd.checkpoint_modules()) == {"projectors"}
    assert LossConfig.model_validate({"hidden": {"layer_norm": True}}).hidden.preprocess == "layernorm"


def test_layer_stats_is_a_plain_container():
    st = LayerStats(mean=torch.zeros(3), std=torch.ones(3))
    assert torch.equal(standardize(torch.ones(3), st), torch.ones(3))
