"""preflight: every cheap check before any model loads, on real tiny model folders saved and then damaged."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import transformers

import tiny
from potstill.commands.evaluate import evaluate
from potstill.config import DistillConfig
from potstill.data import build_datasets, formats
from potstill.data.preflight import check_data, warn_about_datasets
from potstill.errors import ConfigError, DataError, ModelError, PotstillError
from potstill.models.loading import load_causal_lm
from potstill.models.preflight import preflight


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail any attempt to load model weights: preflight must not need them."""
    def boom(*args, **kwargs):
        raise AssertionError("preflight loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def make_config(tmp_path, teacher_ref, data_ref, **sections) -> DistillConfig:
    raw = {"teacher": {"name_or_path": str(teacher_ref)},
           "student": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "intermediate_size": 64}},
           "data": {"source": str(data_ref), "max_length": 64, "validation_fraction": 0.1,
                    "cache_dir": str(tmp_path / "cache")},
           "output": {"dir": str(tmp_path / "run")}}
    for section, values in sections.items():
        raw[section] = values if section == "student" else {**raw.get(section, {}), **values}
    return DistillConfig.model_validate(raw)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------
# What preflight returns, and that it never loads weights


def test_preflight_loads_the_tokenizers_and_no_weights(tmp_path, teacher_dir, student_dir, text_jsonl,
                                                       no_weight_loading):
    cfg = make_config(tmp_path, teacher_dir, text_jsonl, student={"name_or_path": str(student_dir)})
    checked = preflight(cfg)
    assert checked.tokenizer.get_vocab() == checked.teacher_tokenizer.get_vocab()
    assert checked.tokenizer is not checked.teacher_tokenizer  # the student's own, from its folder


def test_a_student_cut_from_the_teacher_uses_the_teacher_tokenizer(tmp_path, teacher_dir, text_jsonl,
                                                                   no_weight_loading):
    cfg = make_config(tmp_path, teacher_dir, text_jsonl, student={"from_teacher": {"every": 2}})
    checked = preflight(cfg)
    assert checked.tokenizer is checked.teacher_tokenizer


# ----------------------------------------------------------------------------------------
# Damaged model folders: one line naming the file, before any weight is read


def _truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _garbage_weights(folder):
    (folder / "model.safetensors").write_bytes(b"\xff" * 4096)


def _config_not_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 48,')


def _config_without_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))


def _no_weights(folder):
    (folder / "model.safetensors").unlink()


def _index_with_missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("damage, fragments", [
    (_truncate_weights, ["model.safetensors is damaged", "cut short", "re-download the teacher model"]),
    (_garbage_weights, ["model.safetensors is damaged", "header claims"]),
    (_config_not_json, ["config.json is not valid JSON", "line 1"]),
    (_config_without_model_type, ["config.json has no model_type"]),
    (_no_weights, ["has no weights (model.safetensors"]),
    (_index_with_missing_shard, ["lacks 1 weight shard", "model-00002-of-00002.safetensors"]),
], ids=["truncated", "garbage", "config-not-json", "no-model-type", "no-weights", "missing-shard"])
def test_damaged_teacher_folder_is_one_line(tmp_path, teacher_dir, text_jsonl, no_weight_loading, damage, fragments):
    teacher = copy_model(teacher_dir, tmp_path / "teacher")
    damage(teacher)
    with pytest.raises(ModelError) as err:
        preflight(make_config(tmp_path, teacher, text_jsonl))
    message = one_line(err)
    assert str(teacher) in message
    for fragment in fragments:
        assert fragment in message, message


def test_damaged_student_folder_is_named_as_the_student(tmp_path, teacher_dir, student_dir, text_jsonl,
                                                        no_weight_loading):
    student = copy_model(student_dir, tmp_path / "student")
    _truncate_weights(student)
    with pytest.raises(ModelError) as err:
        preflight(make_config(tmp_path, teacher_dir, text_jsonl, student={"name_or_path": str(student)}))
    assert f"{student}/model.safetensors is damaged" in one_line(err) and "student model" in one_line(err)


def test_the_loader_itself_names_a_damaged_folder(tmp_path, teacher_dir):
    """Callers without preflight (export, quickstart) get the same line from load_causal_lm."""
    teacher = copy_model(teacher_dir, tmp_path / "teacher")
    _truncate_weights(teacher)
    with pytest.raises(ModelError, match="model.safetensors is damaged"):
        load_causal_lm(str(teacher), revision=None, dtype=None, trust_remote_code=False, role="teacher")


def test_weights_that_do_not_match_config_json_are_one_line(tmp_path, teacher_dir):
    teacher = copy_model(teacher_dir, tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128)
    (teacher / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as err:
        load_causal_lm(str(teacher), revision=None, dtype=None, trust_remote_code=False, role="teacher")
    assert f"cannot load the teacher model from folder {teacher}" in one_line(err)
    assert "do not match config.json" in one_line(err)


def test_missing_and_file_paths(tmp_path, teacher_dir, text_jsonl, no_weight_loading):
    with pytest.raises(ModelError, match=r"cannot load the teacher model '/no/such/model': no such folder"):
        preflight(make_config(tmp_path, "/no/such/model", text_jsonl))
    with pytest.raises(ModelError, match=r"is a file, not a model folder"):
        preflight(make_config(tmp_path, teacher_dir / "config.json", text_jsonl))


def test_student_folder_without_tokenizer_files(tmp_path, teacher_dir, text_jsonl, no_weight_loading):
    student = tmp_path / "student"
    student.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(teacher_dir / name, student / name)
    with pytest.raises(ModelError) as err:
        preflight(make_config(tmp_path, teacher_dir, text_jsonl, student={"name_or_path": str(student)}))
    assert f"the student tokenizer folder {student} has no tokenizer files" in one_line(err)
    assert "student.tokenizer" in one_line(err)


# ----------------------------------------------------------------------------------------
# student.config


@pytest.mark.parametrize("fields, fragments", [
    ({"hiden_size": 32}, ["student.config.hiden_size is not a setting of the llama model config",
                          "did you mean 'student.config.hidden_size'?"]),
    ({"num_layers": 2, "hidden_sise": 32}, ["student.config.num_layers", "and 1 more: hidden_sise"]),
    ({"model_type": "lama"}, ["student.config.model_type 'lama' is not a model type", "did you mean 'llama'"]),
    ({"hidden_size": 30, "num_attention_heads": 4}, ["cannot build the student from student.config (llama)",
                                                     "not a multiple of the number of attention heads"]),
    ({"hidden_size": "wide"}, ["cannot build the student from student.config (llama)", "hidden_size"]),
])
def test_student_config_mistakes_are_one_line(tmp_path, teacher_dir, text_jsonl, no_weight_loading, fields, fragments):
    with pytest.raises(ModelError) as err:
        preflight(make_config(tmp_path, teacher_dir, text_jsonl, student={"config": fields}))
    for fragment in fragments:
        assert fragment in one_line(err), one_line(err)


def test_student_config_takes_every_real_setting(tmp_path, teacher_dir, text_jsonl, no_weight_loading):
    # Init parameters, base-class keyword arguments (rope_theta, torch_dtype) and attribute_map aliases.
    fields = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "rope_theta": 5000.0, "tie_word_embeddings": True, "max_position_embeddings": 128,
              "attention_dropout": 0.0, "model_type": "llama"}
    preflight(make_config(tmp_path, teacher_dir, text_jsonl, student={"config": fields}))
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "hidden_size": 32}
    preflight(make_config(tmp_path, teacher_dir, text_jsonl, student={"config": gpt2}))


def test_student_config_check_does_not_move_the_random_state(tmp_path, teacher_dir, text_jsonl):
    import torch

    torch.manual_seed(0)
    preflight(make_config(tmp_path, teacher_dir, text_jsonl))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


# ----------------------------------------------------------------------------------------
# Data, before any model


def test_malformed_data_is_found_before_any_model_loads(tmp_path, teacher_dir, no_weight_loading):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three\n')
    with pytest.raises(DataError) as err:
        preflight(make_config(tmp_path, teacher_dir, bad))
    assert f"{bad}:3:" in one_line(err) and "malformed JSON" in one_line(err)


@pytest.mark.parametrize("rows, fmt, fragment", [
    ([{"text": "a"}, {"text": None}], "auto", ":2 (row 1): row has no 'text' field"),
    ([{"text": "a"}, {"text": 7}], "auto", ":2 (row 1): inconsistent field types: 'text' is a int where earlier rows hold a str"),
    ([{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"content": "x"}]}], "auto",
     ":2 (row 1): message 0 of 'messages' has no 'role'"),
    ([{"conversations": [{"from": "alien", "value": "x"}]}], "auto", "unknown speaker 'alien'"),
    ([{"prompt": "p"}], "prompt_completion", "row has no 'completion' field"),
])
def test_check_data_finds_what_tokenizing_would(tmp_path, rows, fmt, fragment):
    path = tiny.write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = make_config(tmp_path, "t", path, data={"format": fmt, "validation_fraction": 0.0}).data
    with pytest.raises(DataError) as err:
        check_data(cfg)
    assert fragment in one_line(err) and str(path) in one_line(err), one_line(err)


def test_generate_needs_no_format_fields(tmp_path, teacher_dir, no_weight_loading):
    prompts = tiny.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hi."}, {"prompt": "Say bye."}])
    preflight(make_config(tmp_path, teacher_dir, prompts, generate={"output": str(tmp_path / "gen.jsonl")}),
              role="generate")


def test_data_in_the_cache_is_not_read_again(tmp_path, teacher_dir, text_jsonl, tokenizer, monkeypatch):
    cfg = make_config(tmp_path, teacher_dir, text_jsonl)
    calls = []
    monkeypatch.setattr(formats, "check_rows", lambda *a, **k: calls.append(1) or "text")
    check_data(cfg.data, tokenizer, seed=cfg.train.seed)
    assert calls == [1]  # one source, split in two: walked once
    build_datasets(cfg.data, tokenizer, seed=cfg.train.seed, progress=False)
    check_data(cfg.data, tokenizer, seed=cfg.train.seed)
    assert calls == [1]


# ----------------------------------------------------------------------------------------
# Settings a command needs, warnings


def test_command_settings(tmp_path, teacher_dir, text_jsonl, no_weight_loading):
    cfg = make_config(tmp_path, teacher_dir, text_jsonl)
    with pytest.raises(ConfigError, match="generate.output is required"):
        preflight(cfg, role="generate")
    no_teacher = make_config(tmp_path, teacher_dir, text_jsonl, loss={"logits": {"weight": 0}, "ce": {"weight": 1}},
                             student={"config": {"model_type": "llama", "hidden_size": 32}})
    no_teacher = no_teacher.model_copy(update={"teacher": no_teacher.teacher.model_copy(update={"name_or_path": None})})
    with pytest.raises(ConfigError, match="cache-teacher needs teacher.name_or_path"):
        preflight(no_teacher, role="cache-teacher")
    with pytest.raises(ModelError, match="student.from_teacher needs a teacher"):
        preflight(make_config(tmp_path, teacher_dir, text_jsonl, student={"from_teacher": {"every": 2}},
                              teacher={"cache": str(tmp_path / "cache")}))


def test_max_length_beyond_the_context_warns(tmp_path, teacher_dir, text_jsonl, caplog, no_weight_loading):
    cfg = make_config(tmp_path, teacher_dir, text_jsonl, data={"max_length": 512},
                      student={"config": {"hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 128}})
    with caplog.at_level(logging.WARNING, logger="potstill"):
        preflight(cfg, check_data=False)
    lines = [r.getMessage() for r in caplog.records if "context" in r.getMessage()]
    assert len(lines) == 2
    assert "data.max_length=512 is beyond the student's context of 128 tokens" in lines[0]
    assert "data.max_length=512 is beyond the teacher's context of 256 tokens" in lines[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="potstill"):  # a student cut from the teacher: one line for both
        preflight(make_config(tmp_path, teacher_dir, text_jsonl, data={"max_length": 300},
                              student={"from_teacher": {"every": 2}}), check_data=False)
    assert [r.getMessage() for r in caplog.records if "context" in r.getMessage()] == [
        "data.max_length=300 is beyond the teacher's and student's context of 256 tokens: positions past it were "
        "never trained (models with learned positions fail on them); lower it to 256 or less"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="potstill"):
        preflight(make_config(tmp_path, teacher_dir, text_jsonl), check_data=False)
    assert "context" not in caplog.text


def test_small_validation_and_many_epochs_warn(tmp_path, tokenizer, caplog):
    path = tiny.write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in tiny.synthetic_sentences(30, seed=1)])
    cfg = make_config(tmp_path, "t", path, data={"max_length": 16, "packing": False}).data
    train, val = build_datasets(cfg, tokenizer, progress=False)
    with caplog.at_level(logging.WARNING, logger="potstill"):
        warn_about_datasets(train, val, epochs=1.0)
        assert "the validation split holds only 3 example(s)" in caplog.text
        warn_about_datasets(train, None, epochs=50.0)
        assert f"passes 50 times over a train set of {len(train)} example(s)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="potstill"):
        warn_about_datasets(train, None, epochs=2.0)
    assert not caplog.records


# ----------------------------------------------------------------------------------------
# evaluate: arguments checked before anything loads


@pytest.mark.parametrize("kwargs, fragment", [
    ({"batch_size": 0}, "--batch-size (or batch_size=) must be a whole number from 1 to"),
    ({"batch_size": -4}, "got -4"),
    ({"max_length": 4}, "--max-length (or max_length=) must be a whole number from 8 to"),
    ({"max_batches": 0}, "--max-batches"),
    ({"precision": "fp8"}, "--precision 'fp8'"),
])
def test_evaluate_refuses_bad_arguments(student_dir, text_jsonl, no_weight_loading, kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        evaluate(str(student_dir), data=str(text_jsonl), progress=False, **kwargs)
    assert fragment in one_line(err)


def test_evaluate_refuses_missing_paths_and_unfinished_runs(tmp_path, student_dir, text_jsonl, no_weight_loading):
    with pytest.raises(PotstillError, match="no such folder"):
        evaluate(str(tmp_path / "nowhere"), data=str(text_jsonl), progress=False)
    with pytest.raises(PotstillError, match="no such folder"):
        evaluate(str(student_dir), teacher=str(tmp_path / "no-teacher"), data=str(text_jsonl), progress=False)
    with pytest.raises(DataError, match="data file not found"):
        evaluate(str(student_dir), data=str(tmp_path / "missing.jsonl"), progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data: {source: x}\n")
    with pytest.raises(ConfigError, match="run directory without student/"):
        evaluate(str(run), progress=False)


def test_a_cached_teacher_run_without_a_student_tokenizer_says_which_one_to_give(tmp_path, teacher_dir, text_jsonl,
                                                                                no_weight_loading):
    cfg = make_config(tmp_path, teacher_dir, text_jsonl, teacher={"cache": str(tmp_path / "cache-dir")})
    with pytest.raises(ModelError) as err:
        preflight(cfg, role="distill")
    assert "set student.tokenizer to the tokenizer the cache was captured with" in one_line(err)
    cfg = make_config(tmp_path, teacher_dir, text_jsonl, teacher={"cache": str(tmp_path / "cache-dir")},
                      student={"config": {"model_type": "llama", **tiny.TINY_STUDENT}, "tokenizer": str(teacher_dir)})
    assert preflight(cfg, role="distill").tokenizer is not None
