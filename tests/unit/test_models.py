"""Models: student from the teacher's layers, from a config; vocabulary checks; loading errors."""

from __future__ import annotations

import pytest
import torch

import tiny
from potstill.config import StudentConfig, TeacherConfig
from potstill.errors import ModelError
from potstill.models.vocab import check_vocab
from potstill.models.students import load_student, select_layers, student_from_teacher
from potstill.models.teacher_model import load_teacher
from potstill.models.layers import num_layers


def test_select_layers():
    assert select_layers(9, None, 2) == [0, 2, 4, 6, 8]
    assert select_layers(28, [0, 27], None) == [0, 27]
    with pytest.raises(ModelError, match=r"out of range: the teacher has 4 layers"):
        select_layers(4, [0, 4], None)
    with pytest.raises(ModelError, match="repeated"):
        select_layers(4, [1, 1], None)


def test_student_from_teacher_copies_chosen_layers():
    teacher = tiny.build_llama(None, 50, hidden_size=16, layers=5, heads=2, intermediate=32)
    student = student_from_teacher(teacher, [0, 4])
    assert num_layers(student) == 2 and student.config.num_hidden_layers == 2
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[4].mlp.up_proj.weight)
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight)
    student.model.layers[1].mlp.up_proj.weight.data.zero_()  # a copy, not shared storage
    assert teacher.model.layers[4].mlp.up_proj.weight.abs().sum() > 0


def test_student_from_gpt2_teacher():
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=40, bos_token_id=0, eos_token_id=0))
    student = student_from_teacher(teacher, [2])
    x = torch.randint(0, 40, (1, 5))
    assert student(input_ids=x).logits.shape == (1, 5, 40)
    torch.testing.assert_close(student.transformer.h[0].mlp.c_fc.weight, teacher.transformer.h[2].mlp.c_fc.weight)


def test_load_teacher_is_frozen(teacher_dir):
    teacher, tok = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)), dtype=torch.bfloat16)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert tok.pad_token_id is not None


def test_student_from_config_shares_teacher_tokenizer(teacher_dir):
    teacher, tok = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)), dtype=None)
    cfg = StudentConfig(config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 32})
    student, s_tok = load_student(cfg, teacher=teacher, teacher_tokenizer=tok)
    assert s_tok is tok and student.config.model_type == "llama"
    assert student.config.vocab_size == teacher.config.vocab_size and student.training
    assert all(p.requires_grad and p.dtype == torch.float32 for p in student.parameters())


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ModelError, match=r"cannot load the teacher model '.*nowhere'"):
        load_teacher(TeacherConfig(name_or_path=str(tmp_path / "nowhere")), dtype=None)


def test_vocab_padding_rows_are_shared(tokenizer):
    n = len(tokenizer)
    teacher = tiny.build_llama(None, n + 16, hidden_size=16, layers=1, heads=2, intermediate=32)
    student = tiny.build_llama(None, n, hidden_size=16, layers=1, heads=2, intermediate=32)
    info = check_vocab(teacher, tokenizer, student, tokenizer)
    assert (info.shared, info.teacher_rows, info.student_rows) == (n, n + 16, n)


def test_different_tokenizers_are_refused(tokenizer, tmp_path):
    other = tiny.build_tokenizer(tmp_path / "other", vocab_size=300)
    m = tiny.build_llama(None, 384, hidden_size=16, layers=1, heads=2, intermediate=32)
    with pytest.raises(ModelError, match=r"teacher tokenizer .*384 tokens.* and student tokenizer .*300 tokens.*differ"):
        check_vocab(m, tokenizer, m, other)


def test_head_smaller_than_tokenizer_is_refused(tokenizer):
    small = tiny.build_llama(None, 100, hidden_size=16, layers=1, heads=2, intermediate=32)
    with pytest.raises(ModelError, match="do not belong together"):
        check_vocab(small, tokenizer, small, tokenizer)


def test_gradient_checkpointing_saves_fewer_activations(teacher_dir):
    """With checkpointing, far fewer activation bytes are kept for backward; gradients are the same."""
    teacher, tok = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)), dtype=None)
    fields = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 128}
    x = torch.randint(0, 100, (2, 64))
    saved, grads = {}, {}
    for flag in (False, True):
        torch.manual_seed(0)
        student, _ = load_student(StudentConfig(config=fields, gradient_checkpointing=flag), teacher=teacher,
                                  teacher_tokenizer=tok)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = student.model(input_ids=x).last_hidden_state.square().mean()
        loss.backward()
        saved[flag] = total[0]
        grads[flag] = student.model.layers[0].mlp.up_proj.weight.grad.clone()
    assert saved[True] < 0.5 * saved[False], saved
    torch.testing.assert_close(grads[True], grads[False])


@pytest.mark.parametrize("student", [{"from_teacher": {"every": 2}}, {"config": {"hidden_size": 32,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}},
                                     "folder"])
def test_meta_loading_builds_models_without_weights(teacher_dir, student_dir, student):
    """The non-main processes of an FSDP run build teacher and student on the meta device (no weights
    read, none initialized; their shards come from the main process) with the same structure."""
    student_cfg = StudentConfig(name_or_path=str(student_dir)) if student == "folder" else StudentConfig(**student)
    teacher, teacher_tok = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)), dtype=torch.bfloat16, meta=True)
    model, _ = load_student(student_cfg, teacher=teacher, teacher_tokenizer=teacher_tok, meta=True)
    real_teacher, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)), dtype=torch.bfloat16)
    real, _ = load_student(student_cfg, teacher=real_teacher, teacher_tokenizer=teacher_tok)
    for empty, full in ((teacher, real_teacher), (model, real)):
        assert all(t.is_meta for t in [*empty.parameters(), *empty.buffers()])
        assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == \
            {k: (v.shape, v.dtype) for k, v in full.state_dict().items()}
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_meta_loading_leaves_a_bitnet_student_real(teacher_dir):
    teacher, tok = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)), dtype=torch.float32)
    model, _ = load_student(StudentConfig(from_teacher={"every": 2}, bitnet=True), teacher=teacher,
                            teacher_tokenizer=tok, meta=True)
    assert not any(p.is_meta for p in model.parameters())
