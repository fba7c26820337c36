"""student.embeddings_from_teacher: copy, PCA projection, shape errors, freezing, tied and quantized models."""

from __future__ import annotations

import pytest
import torch
from tiny import build_llama

from potstill.errors import ModelError
from potstill.models.int4 import Int4Linear
from potstill.models.teacher_embeddings import embeddings_from_teacher, pca_basis

V = 96


def llama(hidden: int, *, vocab: int = V, seed: int = 0, **extra):
    return build_llama(None, vocab, hidden_size=hidden, layers=1, heads=2, intermediate=32, seed=seed, **extra)


def tied_llama(hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def low_rank_teacher(hidden: int, rank: int):
    """A teacher whose embeddings E = A @ B and head W = C @ B share one rank-`rank` row space (B's)."""
    teacher = llama(hidden, seed=1)
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(rank, hidden, generator=g)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.copy_(torch.randn(V, rank, generator=g) @ basis)
        teacher.lm_head.weight.copy_(torch.randn(V, rank, generator=g) @ basis)
    return teacher


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


def test_copy_equals_the_teacher_exactly():
    teacher, student = llama(32, seed=1), llama(32, seed=2)
    line = embeddings_from_teacher(student, teacher, mode="copy", freeze=False)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.lm_head.weight.requires_grad and student.model.embed_tokens.weight.requires_grad
    assert "\n" not in line and "copied" in line and "frozen" not in line


def test_copy_from_a_bf16_teacher_gives_float32():
    teacher, student = llama(32, seed=1).to(torch.bfloat16), llama(32, seed=2)
    embeddings_from_teacher(student, teacher, mode="copy", freeze=False)
    assert student.lm_head.weight.dtype == torch.float32
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight.float())


def test_project_keeps_the_logits_of_a_teacher_in_the_subspace():
    rank = 8
    teacher, student = low_rank_teacher(64, rank), llama(rank, seed=2)
    line = embeddings_from_teacher(student, teacher, mode="project", freeze=False)
    e_t, w_t = teacher.model.embed_tokens.weight.detach().double(), teacher.lm_head.weight.detach().double()
    e_s, w_s = student.model.embed_tokens.weight.detach().double(), student.lm_head.weight.detach().double()
    assert e_s.shape == (V, rank) and student.lm_head.weight.dtype == torch.float32
    teacher_logits, student_logits = e_t @ w_t.T, e_s @ w_s.T
    assert torch.allclose(student_logits, teacher_logits, rtol=1e-4, atol=1e-4 * float(teacher_logits.abs().max()))
    assert "projected from width 64 to 8" in line and "100.0%" in line


def test_project_to_the_same_width_is_a_rotation():
    teacher, student = llama(32, seed=1), llama(32, seed=2)
    embeddings_from_teacher(student, teacher, mode="project", freeze=False)
    e_t, w_t = teacher.model.embed_tokens.weight, teacher.lm_head.weight
    e_s, w_s = student.model.embed_tokens.weight, student.lm_head.weight
    assert torch.allclose(e_s @ w_s.T, e_t @ w_t.T, atol=1e-5)
    assert torch.allclose(e_s.norm(dim=1), e_t.norm(dim=1), atol=1e-5)


def test_pca_basis_is_orthonormal_and_ordered():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    e = torch.randn(500, 6, generator=g) * scales + 3.0  # variances fall along the axes; a non-zero mean
    basis, kept = pca_basis(e, 3)
    assert basis.shape == (6, 3) and basis.dtype == torch.float64
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis.abs(), torch.eye(6, 3, dtype=torch.float64), atol=0.1)  # the three widest axes
    assert 0.95 < kept < 1.0


def test_copy_needs_equal_widths():
    with pytest.raises(ModelError) as err:
        embeddings_from_teacher(llama(32), llama(16), mode="copy", freeze=False)
    assert_one_line(err, "student.embeddings_from_teacher", "32", "16", "use mode: project")


def test_project_cannot_widen():
    with pytest.raises(ModelError) as err:
        embeddings_from_teacher(llama(32), llama(16), mode="project", freeze=False)
    assert_one_line(err, "student.embeddings_from_teacher", "cannot widen 16 to 32")


def test_vocabularies_must_match():
    with pytest.raises(ModelError) as err:
        embeddings_from_teacher(llama(16, vocab=80), llama(32), mode="project", freeze=False)
    assert_one_line(err, "vocabularies differ (96 vs 80 rows)", "needs the teacher's tokenizer")


def test_unknown_mode():
    with pytest.raises(ModelError) as err:
        embeddings_from_teacher(llama(16), llama(16), mode="lstsq", freeze=False)
    assert_one_line(err, "student.embeddings_from_teacher.mode", "copy", "project")


@pytest.mark.parametrize("mode", ["copy", "project"])
def test_freeze_turns_both_off_and_nothing_else(mode):
    student = llama(16, seed=2)
    line = embeddings_from_teacher(student, llama(16, seed=1), mode=mode, freeze=True)
    assert not student.model.embed_tokens.weight.requires_grad and not student.lm_head.weight.requires_grad
    frozen = [n for n, p in student.named_parameters() if not p.requires_grad]
    assert frozen == ["model.embed_tokens.weight", "lm_head.weight"]
    assert line.endswith("; frozen")


def test_tied_student_gets_the_teacher_input_embeddings_only():
    teacher, student = llama(16, seed=1), tied_llama(16)
    line = embeddings_from_teacher(student, teacher, mode="copy", freeze=True)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert not student.model.embed_tokens.weight.requires_grad
    assert "ties its head" in line


def test_tied_teacher_untied_student():
    teacher, student = tied_llama(16), llama(16, seed=2)
    embeddings_from_teacher(student, teacher, mode="copy", freeze=False)
    assert torch.equal(student.lm_head.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_head_bias_is_copied_when_both_have_one():
    teacher, student = llama(16, seed=1), llama(16, seed=2)
    for model, value in ((teacher, 0.5), (student, 0.0)):
        model.lm_head.bias = torch.nn.Parameter(torch.full((V,), value))
    line = embeddings_from_teacher(student, teacher, mode="project", freeze=True)
    assert torch.equal(student.lm_head.bias, teacher.lm_head.bias) and not student.lm_head.bias.requires_grad
    assert "head bias copied" in line


def test_int4_teacher_head_is_dequantized():
    teacher, student = llama(32, seed=1), llama(32, seed=2)
    teacher.lm_head = Int4Linear.from_linear(teacher.lm_head, group_size=32)
    assert teacher.get_output_embeddings() is teacher.lm_head
    embeddings_from_teacher(student, teacher, mode="copy", freeze=False)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.dequantize(torch.float32))
