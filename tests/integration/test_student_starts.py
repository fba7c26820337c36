"""How the student starts and what of it trains, end to end: LoRA adapters, frozen parts, pruned
and embedding-initialized students, and the attention kernel, through the CLI and the Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import potstill
from potstill.training.metrics import read_metrics
from tiny import assert_one_line_error, kill_at_checkpoint, run_cli, run_config, run_torchrun_distill

LORA = {"r": 4, "alpha": 8}


def _write(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _lora_config(out, teacher_dir, student_dir, data, **train) -> dict:
    cfg = run_config(out, teacher_dir, data, loss={"logits": {"temperature": 1.5}, "ce": {"weight": 0.2}}, **train)
    cfg["student"] = {"name_or_path": str(student_dir), "lora": dict(LORA)}
    return cfg


@pytest.mark.parametrize("path", ["chunked", "plain"])
def test_lora_run_writes_adapter_and_merged_student(tmp_path, teacher_dir, student_dir, text_jsonl, path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    proc = run_cli("distill", _write(tmp_path, _lora_config(out, teacher_dir, student_dir, text_jsonl)),
                   f"loss.path={path}", "--no-progress")
    assert f"loss path: {path}" in proc.stderr
    assert "student.lora: r=4" in proc.stderr

    summary = json.loads((out / "summary.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(student_dir)
    n_base = sum(p.numel() for p in base.parameters())
    assert 0 < summary["trained_parameters"] < n_base / 5  # the adapters only
    # The merged student is a plain model folder: no LoRA keys, the student's own shapes.
    merged_state = load_file(str(out / "student" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in merged_state)
    assert set(merged_state) == set(base.state_dict())
    merged = AutoModelForCausalLM.from_pretrained(out / "student")
    # It differs from the base only where adapters were (every linear layer but the head).
    changed = {k for k in merged_state if not torch.equal(merged_state[k], base.state_dict()[k])}
    assert changed and all(any(m in k for m in ("_proj",)) for k in changed), changed
    # The adapter, loaded by PEFT onto the base student, gives the merged student's logits.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(student_dir)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), out / "adapter")
    x = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(with_adapter(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-5)
    # evaluate reads the merged folder like any student.
    run_cli("evaluate", out / "student", "--data", text_jsonl, "--max-batches", "1", "--json", tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())


def test_lora_optimizer_holds_adapters_only_and_base_stays_bit_identical(tmp_path, teacher_dir, student_dir,
                                                                          text_jsonl):
    out = tmp_path / "run"
    potstill.distill(_lora_config(out, teacher_dir, student_dir, text_jsonl, max_steps=3, checkpoint_every=3),
                     progress=False)
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    state = load_file(str(ckpt / "student" / "model.safetensors"))
    base = load_file(str(Path(student_dir) / "model.safetensors"))
    for key, value in state.items():
        if "lora_" in key:
            continue
        assert torch.equal(value, base[key.replace(".base_layer", "")]), key  # frozen: bit for bit
    optim = torch.load(ckpt / "optimizer.pt", weights_only=False)
    n_state = sum(s["exp_avg"].numel() for s in optim["state"].values())
    n_lora = sum(v.numel() for k, v in state.items() if "lora_" in k)
    assert n_state == n_lora  # Adam moments for the adapters, nothing for the base


def test_lora_run_resumes_after_kill_9_exactly(tmp_path, teacher_dir, student_dir, text_jsonl):
    straight = tmp_path / "straight"
    potstill.distill(_lora_config(straight, teacher_dir, student_dir, text_jsonl, max_steps=8, checkpoint_every=4,
                                  grad_accum=2), progress=False)
    killed = tmp_path / "killed"
    cfg = _write(tmp_path, _lora_config(killed, teacher_dir, student_dir, text_jsonl, max_steps=8, checkpoint_every=4,
                                        grad_accum=2, log_every=1))
    kill_at_checkpoint(cfg, killed, "step-000004")
    assert not (killed / "student").exists()
    run_cli("distill", cfg, "train.resume=auto", "--no-progress")
    a, b = load_file(str(straight / "student" / "model.safetensors")), load_file(str(killed / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(str(straight / "adapter" / "adapter_model.safetensors")).keys() == \
        load_file(str(killed / "adapter" / "adapter_model.safetensors")).keys()
    assert dict(_losses(straight)) == dict(_losses(killed))


@pytest.mark.slow
def test_lora_two_processes_equal_one(tmp_path, teacher_dir, student_dir, text_jsonl):
    one = tmp_path / "one"
    potstill.distill(_lora_config(one, teacher_dir, student_dir, text_jsonl, max_steps=3, grad_accum=2, batch_size=2),
                     progress=False)
    two = tmp_path / "two"
    cfg = _write(tmp_path, _lora_config(two, teacher_dir, student_dir, text_jsonl, max_steps=3, grad_accum=1,
                                        batch_size=2))
    proc = run_torchrun_distill(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(one / "student" / "model.safetensors")), load_file(str(two / "student" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    for (s1, l1), (s2, l2) in zip(_losses(one), _losses(two)):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)


def test_lora_with_feature_terms(tmp_path, teacher_dir, student_dir, text_jsonl):
    out = tmp_path / "run"
    cfg = _lora_config(out, teacher_dir, student_dir, text_jsonl, max_steps=2)
    cfg["loss"] = {"hidden": {"weight": 1.0}, "attention": {"weight": 1.0}, "ce": {"weight": 0.2}}
    potstill.distill(cfg, progress=False)
    last = [r for r in read_metrics(out / "metrics.jsonl") if "loss/hidden" in r][-1]
    assert last["loss/hidden"] > 0 and last["loss/attention"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_bad_inputs_are_one_line(tmp_path, teacher_dir, student_dir, text_jsonl):
    cfg = _write(tmp_path, _lora_config(tmp_path / "run", teacher_dir, student_dir, text_jsonl))
    proc = run_cli("distill", cfg, "student.lora.target_modules=[nothing_proj]", check=False)
    assert_one_line_error(proc, "student.lora.target_modules", "q_proj")
    proc = run_cli("distill", cfg, "student.lora.r=0", check=False)
    assert_one_line_error(proc, "student.lora.r")
    # peft not importable: a real interpreter in which the import fails.
    code = ("import sys; sys.modules['peft'] = None; from potstill.commands.cli import main; "
            f"sys.argv = ['potstill', 'distill', {str(cfg)!r}]; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert_one_line_error(proc, "peft", "pip install")
    assert not (tmp_path / "run" / "student").exists()


def test_attn_implementation_reaches_both_models(tmp_path, teacher_dir, text_jsonl):
    from potstill.training.setup import load_models

    cfg = potstill.config.as_config(run_config(tmp_path / "run", teacher_dir, text_jsonl),
                                      ["teacher.attn_implementation=eager", "student.attn_implementation=eager"])
    teacher, student, _, _ = load_models(cfg, "fp32")
    assert teacher.config._attn_implementation == "eager" and student.config._attn_implementation == "eager"
    # eager and sdpa compute the same attention: the same run's first loss agrees.
    eager = potstill.distill(run_config(tmp_path / "eager", teacher_dir, text_jsonl, max_steps=1), progress=False,
                             overrides=["teacher.attn_implementation=eager", "student.attn_implementation=eager"])
    sdpa = potstill.distill(run_config(tmp_path / "sdpa", teacher_dir, text_jsonl, max_steps=1), progress=False,
                            overrides=["teacher.attn_implementation=sdpa", "student.attn_implementation=sdpa"])
    assert eager.train_metrics["loss"] == pytest.approx(sdpa.train_metrics["loss"], rel=1e-4)
    proc = run_cli("distill", _write(tmp_path, run_config(tmp_path / "fa", teacher_dir, text_jsonl)),
                   "student.attn_implementation=flash_attention_2", check=False)
    assert_one_line_error(proc, "student.attn_implementation=flash_attention_2", "sdpa or eager")
    proc = run_cli("distill", _write(tmp_path, run_config(tmp_path / "typo", teacher_dir, text_jsonl), "typo.yaml"),
                   "teacher.attn_implementation=fast", check=False)
    assert_one_line_error(proc, "teacher.attn_implementation")


def test_frozen_parameters_stay_bit_identical_and_hold_no_optimizer_state(tmp_path, teacher_dir, student_dir,
                                                                         text_jsonl):
    spectrum = tmp_path / "snr.yaml"
    spectrum.write_text("unfrozen_parameters:\n- ^lm_head.weight$\n- model.layers.1.mlp.down_proj\n"
                        "- model.layers.1.self_attn\n", encoding="utf-8")
    base = load_file(str(Path(student_dir) / "model.safetensors"))
    for name, overrides, trains in (
            ("freeze", ["student.freeze=[embed_tokens, 'layers\\.0\\.']"],
             lambda k: "embed_tokens" not in k and "layers.0." not in k),
            ("spectrum", [f"student.spectrum={spectrum}"],
             lambda k: k == "lm_head.weight" or "layers.1.mlp.down_proj" in k or "layers.1.self_attn" in k)):
        out = tmp_path / name
        cfg = run_config(out, teacher_dir, text_jsonl, max_steps=3, checkpoint_every=3, weight_decay=0.1)
        cfg["student"] = {"name_or_path": str(student_dir)}
        proc = run_cli("distill", _write(tmp_path, cfg, f"{name}.yaml"), *overrides, "--no-progress")
        assert "tensors frozen" in proc.stderr
        final = load_file(str(out / "student" / "model.safetensors"))
        assert final.keys() == base.keys()
        for key in base:
            if trains(key):
                assert not torch.equal(final[key], base[key]), key
            else:
                assert torch.equal(final[key], base[key]), key  # frozen: bit for bit, weight decay included
        ckpt = sorted((out / "checkpoints").iterdir())[-1]
        optim = torch.load(ckpt / "optimizer.pt", weights_only=False)
        assert sum(s["exp_avg"].numel() for s in optim["state"].values()) == \
            sum(v.numel() for k, v in base.items() if trains(k))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["trained_parameters"] == sum(v.numel() for k, v in base.items() if trains(k))


def test_freezing_bad_inputs_are_one_line(tmp_path, teacher_dir, student_dir, text_jsonl):
    cfg = run_config(tmp_path / "run", teacher_dir, text_jsonl)
    cfg["student"] = {"name_or_path": str(student_dir)}
    path = _write(tmp_path, cfg)
    assert_one_line_error(run_cli("distill", path, "student.freeze=[q_projj]", check=False),
                          "student.freeze", "matches no parameter", "q_proj")
    assert_one_line_error(run_cli("distill", path, "student.train_only=['(']", check=False),
                          "student.train_only", "not a valid regular expression")
    assert_one_line_error(run_cli("distill", path, "student.freeze=[.]", check=False), "nothing left to train")
    assert_one_line_error(run_cli("distill", path, f"student.spectrum={tmp_path / 'none.yaml'}", check=False),
                          "student.spectrum", "no file")
    assert_one_line_error(run_cli("distill", path, "student.train_only=[lm_head]",
                                  f"student.spectrum={tmp_path / 'none.yaml'}", check=False),
                          "student.train_only or student.spectrum")
    assert not (tmp_path / "run" / "student").exists()


def test_embeddings_from_teacher_copied_projected_and_frozen(tmp_path, teacher_dir, text_jsonl):
    from transformers import AutoModelForCausalLM

    from potstill.training.setup import load_models

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    t_embed, t_head = teacher.get_input_embeddings().weight, teacher.get_output_embeddings().weight
    base = run_config(tmp_path / "run", teacher_dir, text_jsonl)
    # copy: a student of the teacher's width (48) gets its rows exactly.
    cfg = potstill.config.as_config(base, ["student.config.hidden_size=48", "student.embeddings_from_teacher.mode=copy"])
    _, student, _, _ = load_models(cfg, "fp32")
    assert torch.equal(student.get_input_embeddings().weight, t_embed)
    assert torch.equal(student.get_output_embeddings().weight, t_head)
    # project: the tiny student (width 32) gets the rows on the teacher's top 32 principal directions.
    cfg = potstill.config.as_config(base, ["student.embeddings_from_teacher.mode=project"])
    _, student, _, _ = load_models(cfg, "fp32")
    e = student.get_input_embeddings().weight
    assert e.shape == (t_embed.shape[0], 32)
    gram_t = (t_embed - t_embed.mean(0)).double()
    kept = (e.double() - e.double().mean(0)).pow(2).sum() / gram_t.pow(2).sum()
    assert 0.67 < kept <= 1.0  # 32 of 48 directions, the widest ones: more than their 2/3 share of the variance
    # frozen through a run: the embeddings and head stay the teacher's, bit for bit.
    out = tmp_path / "frozen"
    cfg = run_config(out, teacher_dir, text_jsonl, max_steps=2)
    cfg["student"]["config"]["hidden_size"] = 48
    cfg["student"]["embeddings_from_teacher"] = {"mode": "copy", "freeze": True}
    potstill.distill(cfg, progress=False)
    final = load_file(str(out / "student" / "model.safetensors"))
    assert torch.equal(final["model.embed_tokens.weight"], t_embed) and torch.equal(final["lm_head.weight"], t_head)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trained_parameters"] == summary["student_parameters"] - t_embed.numel() - t_head.numel()
    proc = run_cli("distill", _write(tmp_path, run_config(tmp_path / "bad", teacher_dir, text_jsonl)),
                   "student.embeddings_from_teacher.mode=copy", check=False)
    assert_one_line_error(proc, "student.embeddings_from_teacher", "mode: project")


def test_pruned_student_from_the_cli_has_the_asked_shape_and_loads_plainly(tmp_path, teacher_dir, text_jsonl):
    """The conftest teacher (4 blocks, width 48, 4 heads, MLP 96) pruned in width and depth; the
    student folder is a plain Llama of that shape, and potstill plan counted it the same."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from potstill.models.memory import run_models
    from potstill.models.pruning import count_parameters

    out = tmp_path / "run"
    cfg = run_config(out, teacher_dir, text_jsonl, max_steps=2)
    cfg["student"] = {"from_teacher": {"prune": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                                 "num_layers": 3, "calibration_batches": 2}}}
    path = _write(tmp_path, cfg)
    proc = run_cli("distill", path, "--no-progress")
    assert "pruned the teacher" in proc.stderr
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert type(student) is LlamaForCausalLM
    c = student.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers,
            c.head_dim) == (32, 64, 2, 2, 3, 12)
    n = sum(p.numel() for p in student.parameters())
    assert n == count_parameters(c) == json.loads((out / "summary.json").read_text())["student_parameters"]
    assert run_models(potstill.config.as_config(cfg)).student.params == n
    card = (out / "student" / "README.md").read_text() if (out / "student" / "README.md").exists() else ""
    assert card == "" or "pruned from the teacher" in card

    # A parameter count: the widths shrink together to fit it.
    target = n + 2000
    out2 = tmp_path / "params"
    cfg2 = run_config(out2, teacher_dir, text_jsonl, max_steps=1)
    cfg2["student"] = {"from_teacher": {"prune": {"params": target, "round_to": 4}}}
    potstill.distill(cfg2, progress=False)
    m = AutoModelForCausalLM.from_pretrained(out2 / "student")
    assert sum(p.numel() for p in m.parameters()) <= target
    assert m.config.num_hidden_layers == 4 and m.config.hidden_size < 48

    for override, fragments in (
            ("student.from_teacher.prune.hidden_size=96", ("hidden_size 96 is larger than the teacher's 48",)),
            ("student.from_teacher.prune.num_attention_heads=3", ("not a multiple of 3 query heads",)),
            ("student.from_teacher.prune.num_key_value_heads=4", ("heads that do not divide",)),
            ("student.from_teacher.prune.params=10", ("params 10",))):
        assert_one_line_error(run_cli("distill", path, override, f"output.dir={tmp_path / 'bad'}", check=False),
                              *fragments)
    assert_one_line_error(run_cli("distill", path, "student.from_teacher.every=2", check=False),
                          "exactly one of 'layers'")
    assert not (tmp_path / "bad" / "checkpoints").exists() and not (tmp_path / "bad" / "student").exists()


@pytest.mark.slow
def test_fsdp_with_a_pruned_partly_frozen_student_equals_one_process(tmp_path, teacher_dir, text_jsonl):
    """Under FSDP the other process builds the pruned shape from the config alone (meta) and gets
    its shards from the main one; frozen parameters stay frozen in the shards."""
    cfg = run_config(tmp_path / "two", teacher_dir, text_jsonl, max_steps=3, strategy="fsdp")
    cfg["student"] = {"from_teacher": {"prune": {"hidden_size": 32, "num_layers": 3, "calibration_batches": 2}},
                      "freeze": ["embed_tokens", "layers\\.0\\."]}
    path = _write(tmp_path, cfg)
    two = run_torchrun_distill(path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli("distill", path, "train.strategy=ddp", "train.grad_accum=2", f"output.dir={tmp_path / 'one'}",
                  "--no-progress")
    assert one.returncode == 0
    a, b = load_file(str(tmp_path / "two" / "student" / "model.safetensors")), \
        load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), k
    for (s1, l1), (s2, l2) in zip(_losses(tmp_path / "two"), _losses(tmp_path / "one")):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)


def test_pruned_from_an_int8_teacher(tmp_path, teacher_dir, text_jsonl):
    """A quantized teacher (torchao int8 weights) is pruned from its dequantized weights: the student
    is a plain float model, close to the one pruned from the float teacher (same importance order)."""
    from transformers import AutoModelForCausalLM

    runs = {}
    for name, quant in (("float", "none"), ("int8", "int8")):
        out = tmp_path / name
        cfg = run_config(out, teacher_dir, text_jsonl, max_steps=1, lr=1e-9)
        cfg["teacher"]["quantization"] = quant
        cfg["student"] = {"from_teacher": {"prune": {"intermediate_size": 64, "num_layers": 3,
                                                     "calibration_batches": 2}}}
        potstill.distill(cfg, progress=False)
        runs[name] = AutoModelForCausalLM.from_pretrained(out / "student")
    a, b = runs["float"].state_dict(), runs["int8"].state_dict()
    assert a.keys() == b.keys() and all(b[k].dtype == torch.float32 for k in b)
    up = "model.layers.0.mlp.up_proj.weight"
    assert a[up].shape == b[up].shape == (64, 48)
    assert torch.allclose(a[up], b[up], atol=0.02)  # int8 rounding, the same channels kept
