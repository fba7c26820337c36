"""Config: precedence, validation messages, suggestions for typos."""

from __future__ import annotations

import pytest

from potstill.config import DistillConfig, apply_overrides, config_to_yaml, load_config
from potstill.errors import ConfigError

BASE = ["data.source=data.jsonl", "teacher.name_or_path=teacher"]


def test_defaults_are_valid_with_data_and_teacher():
    cfg = load_config(None, BASE, env={})
    assert cfg.loss.logits.divergence == "fkl"
    assert cfg.student.from_teacher.every == 2
    assert cfg.train.resume is False


def test_yaml_then_env_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher: {name_or_path: t}\ndata: {source: d}\ntrain: {lr: 0.1, batch_size: 3}\n")
    cfg = load_config(path, [], env={})
    assert (cfg.train.lr, cfg.train.batch_size) == (0.1, 3)
    cfg = load_config(path, [], env={"POTSTILL_TRAIN__LR": "0.2", "POTSTILL_CACHE": "/not/config"})
    assert cfg.train.lr == 0.2
    cfg = load_config(path, ["train.lr=0.3"], env={"POTSTILL_TRAIN__LR": "0.2"})
    assert cfg.train.lr == 0.3 and cfg.train.batch_size == 3


def test_override_values_are_yaml_typed():
    cfg = load_config(None, BASE + ["student.from_teacher.layers=[0, 3]", "student.from_teacher.every=null",
                                    "train.resume=auto", "output.tensorboard=false"], env={})
    assert cfg.student.from_teacher.layers == [0, 3]
    assert cfg.train.resume == "auto" and cfg.output.tensorboard is False


def test_resume_true_means_auto():
    assert load_config(None, BASE + ["train.resume=true"], env={}).train.resume == "auto"


@pytest.mark.parametrize("override, expected", [
    ("loss.logits.temprature=2", "did you mean 'loss.logits.temperature'"),
    ("trian.lr=1", "did you mean 'train'"),
    ("train.learning_rate=1", "unknown config key 'train.learning_rate'"),
])
def test_unknown_keys_suggest_the_closest(override, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(None, BASE + [override], env={})
    assert f"override '{override}'" in str(err.value)


def test_unknown_key_in_env_names_the_variable():
    with pytest.raises(ConfigError, match="environment variable POTSTILL_TRAIN__LRR"):
        load_config(None, BASE, env={"POTSTILL_TRAIN__LRR": "1"})


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher: {name_or_path: t}\ndata: {source: d}\nloss: {logit: {weight: 1}}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.logit' \(from .*bad.yaml\): did you mean 'loss.logits'"):
        load_config(path, [], env={})


@pytest.mark.parametrize("override, fragment", [
    ("loss.logits.temperature=-1", "loss.logits.temperature"),
    ("loss.logits.temperature=0", "greater than 0"),
    ("loss.logits.beta=1.5", "loss.logits.beta"),
    ("loss.logits.alpha=-0.1", "loss.logits.alpha"),
    ("loss.logits.divergence=kld", "loss.logits.divergence"),
    ("train.lr=fast", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("data.max_length=2", "data.max_length"),
    ("train.precision=int3", "train.precision"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, BASE + [override], env={})


def test_cross_checks():
    with pytest.raises(ConfigError, match="data.source is required"):
        load_config(None, ["teacher.name_or_path=t"], env={})
    with pytest.raises(ConfigError, match="teacher.name_or_path is required"):
        load_config(None, ["data.source=d"], env={})
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        load_config(None, BASE + ["loss.logits.weight=0"], env={})
    with pytest.raises(ConfigError, match="exactly one of student"):
        load_config(None, BASE + ["student.name_or_path=s", "student.config={hidden_size: 8}"], env={})
    # Naming the student replaces the default (cut from the teacher).
    assert load_config(None, BASE + ["student.name_or_path=s"], env={}).student.from_teacher is None
    with pytest.raises(ConfigError, match="exactly one of 'layers'"):
        load_config(None, BASE + ["student.from_teacher.layers=[0]", "student.from_teacher.every=2"], env={})


def test_label_only_training_needs_no_teacher():
    cfg = load_config(None, ["data.source=d", "loss.logits.weight=0", "loss.ce.weight=1",
                             "student.from_teacher=null", "student.config={model_type: llama}"], env={})
    assert cfg.teacher.name_or_path is None


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [\n")
    with pytest.raises(ConfigError, match="bad.yaml:.*not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, BASE + ["train.lr"], env={})


def test_objects_pass_through_and_are_named_in_yaml():
    import torch

    module = torch.nn.Linear(2, 2)
    cfg = DistillConfig(teacher={"name_or_path": module, "tokenizer": "tok"}, data={"source": ["a", "b"]})
    assert cfg.teacher.name_or_path is module
    text = config_to_yaml(cfg)
    assert "<object torch.nn.modules.linear.Linear>" in text
    cfg2 = apply_overrides(cfg, ["train.lr=0.5"])
    assert cfg2.train.lr == 0.5 and cfg2.teacher.name_or_path is module


def test_a_teacher_cache_cannot_feed_feature_terms():
    # The cache stores logits only; hidden-state and attention terms need the teacher's activations.
    with pytest.raises(ConfigError, match="teacher.cache holds the teacher's logits only"):
        load_config(None, BASE + ["student.name_or_path=s", "teacher.cache=c", "loss.hidden.weight=1"], env={})
    with pytest.raises(ConfigError, match="student.from_teacher needs teacher.name_or_path"):
        load_config(None, ["data.source=d", "teacher.cache=c"], env={})


@pytest.mark.parametrize("override, fragments", [
    ("train.lr=1e400", ["train.lr", "finite number", "'1e400'"]),  # parses to inf
    ("loss.logits.temperature=.nan", ["loss.logits.temperature", "finite number"]),
    ("train.max_steps=100000000000000000000", ["train.max_steps", "less than or equal to 2147483647"]),
    ("train.batch_size=99999999999999999999999", ["train.batch_size", "less than or equal to"]),
    ("data.max_length=1000000000", ["data.max_length", "less than or equal to 16777216"]),
    ("train.seed=-1", ["train.seed", "greater than or equal to 0"]),
    ("train.seed=4294967296", ["train.seed", "less than or equal to 4294967295"]),
    ("train.epochs=1e300", ["train.epochs", "less than or equal to"]),
    ("train.adam_betas=[0.9, 1.5]", ["train.adam_betas", "each beta must be in [0, 1)"]),
])
def test_overflowing_and_huge_numbers_are_one_line(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + [override], env={})
    message = str(err.value)
    assert "\n" not in message and f"override '{override}'" in message
    for fragment in fragments:
        assert fragment in message, message


def test_largest_sensible_values_are_accepted():
    cfg = load_config(None, BASE + ["train.seed=4294967295", "train.max_steps=2147483647", "train.lr=1e-30"], env={})
    assert cfg.train.seed == 2**32 - 1 and cfg.train.max_steps == 2**31 - 1


def test_non_utf8_yaml_is_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("teacher: {name_or_path: t}\ndata: {source: d}\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(path, [], env={})
    assert str(err.value) == f"{path}:3: the config file is not UTF-8 text (byte 0xe9 at offset 50): save it as UTF-8"


def test_yaml_with_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfteacher: {name_or_path: t}\ndata: {source: d}\n")
    assert load_config(path, [], env={}).teacher.name_or_path == "t"
