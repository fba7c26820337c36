"""potstill plan: parameter counts from configs, the arithmetic of each part, the CLI.

The accuracy of the totals against real runs is tests/integration/test_plan_accuracy.py
(and bench/plan.py on larger models)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import tiny
from potstill.models import memory
from potstill.models.memory import MB, Setting, estimate, largest_batch, model_shape


def llama_config(vocab=384, hidden=32, layers=2, heads=4, kv=4, intermediate=64, tied=False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                       tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True])
def test_shape_counts_match_the_real_model(tied):
    """Counted on the meta device = counted on the model built for real (tied weights once)."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(hidden=48, layers=3, heads=4, kv=2, intermediate=96, tied=tied)
    real = LlamaForCausalLM(cfg)
    shape = model_shape(cfg)
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert shape.layers == 3
    assert shape.layer_params == sum(p.numel() for p in real.model.layers[0].parameters())
    assert shape.root_params == shape.params - 3 * shape.layer_params
    assert shape.embed_params == real.model.embed_tokens.weight.numel()
    assert shape.tied is tied and shape.head_params == (0 if tied else real.lm_head.weight.numel())
    linears = [m for m in real.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert shape.linear_params == sum(m.weight.numel() for m in linears)
    assert (shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate, shape.vocab) == \
        (48, 4, 2, 12, 96, 384)
    assert shape.chunked_ok


def test_cut_from_teacher_counts_the_kept_layers():
    from transformers import LlamaForCausalLM

    from potstill.models.students import student_from_teacher

    cfg = llama_config(hidden=32, layers=5)
    teacher = LlamaForCausalLM(cfg)
    cut = student_from_teacher(teacher, [0, 2, 4])
    assert model_shape(cfg).with_layers(3).params == sum(p.numel() for p in cut.parameters())


def saved_bytes(model, ids, precision):
    """Bytes autograd keeps for backward in the decoder's forward (unique storages), without the
    weights and their autocast copies."""
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    casts = set()

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        if t.dim() == 2 and any(t.shape == p.shape for p in model.parameters()):
            casts.add(s.data_ptr())  # a weight's bf16 copy: counted with the weights, not here
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = model.model(input_ids=ids)
    del out
    return sum(n for p, n in seen.items() if p not in params and p not in casts)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kv", [8, 2])
def test_activation_formula_matches_what_autograd_saves(precision, kv):
    """The per-layer coefficients (memory.ACT_COEF) against the tensors a real Llama forward
    saves, counted by saved_tensors_hooks, at a shape they were not fitted on."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(vocab=512, hidden=192, layers=3, heads=8, kv=kv, intermediate=512)
    model = LlamaForCausalLM(cfg)
    B, T = 3, 96
    measured = saved_bytes(model, torch.randint(0, 512, (B, T)), precision)
    shape = model_shape(cfg)
    st = Setting(batch_size=B, seq_len=T, precision=precision)
    estimated = memory._activations(shape, st, checkpointing=False)
    assert abs(estimated - measured) / measured < 0.10, (estimated, measured)


def pair():
    teacher = model_shape(llama_config(vocab=8192, hidden=1024, layers=10, heads=16, kv=4, intermediate=2816))
    student = model_shape(llama_config(vocab=8192, hidden=512, layers=10, heads=8, kv=4, intermediate=1408))
    return student, teacher


def test_fsdp_divides_model_state_and_ddp_buckets_double_gradients():
    s, t = pair()
    st = Setting(batch_size=4, seq_len=256, precision="bf16", teacher_bytes=2, kd=True, ce=True)
    ddp1 = estimate(s, t, st).parts
    ddp2 = estimate(s, t, replace(st, devices=2)).parts
    fsdp2 = estimate(s, t, replace(st, devices=2, strategy="fsdp", fsdp_mixed_precision=True)).parts
    fsdp8 = estimate(s, t, replace(st, devices=8, strategy="fsdp", fsdp_mixed_precision=True)).parts
    assert ddp1["optimizer"] - 8 * s.params == ddp2["optimizer"] - 8 * s.params  # step temporaries aside
    assert ddp2["gradients"] == 2 * ddp1["gradients"] == 8 * s.params  # DDP's buckets: a second copy
    assert fsdp8["optimizer"] < fsdp2["optimizer"] < ddp2["optimizer"]
    # Model state (student weights, gradients, AdamW, teacher weights) of FSDP over 2 at most 0.6x DDP's,
    # the target, from the arithmetic alone; with more devices it keeps falling.
    state = lambda p: p["weights"] + p["gradients"] + p["optimizer"] + p["teacher"]  # noqa: E731
    assert state(fsdp2) <= 0.6 * state(ddp2)
    assert state(fsdp8) < state(fsdp2)
    # The teacher under FSDP: its shard plus what is gathered at once (root group + two layers).
    t_fsdp = memory.teacher_weight_bytes(t, replace(st, devices=8, strategy="fsdp"))
    assert t_fsdp == t.params * 2 // 8 + (t.root_params + 2 * t.layer_params) * 2


def test_quantized_teacher_stays_whole_under_fsdp():
    s, t = pair()
    st = Setting(batch_size=1, seq_len=64, precision="bf16", teacher_bytes=2)
    bf16 = memory.teacher_weight_bytes(t, st)
    int8 = memory.teacher_weight_bytes(t, replace(st, quantization="int8"))
    int4 = memory.teacher_weight_bytes(t, replace(st, quantization="int4"))
    assert int4 < int8 < bf16
    # Linear weights at 1 byte (int8) / ~0.56 byte (int4) instead of 2; embeddings and head stay.
    assert int8 == (t.params - t.linear_params) * 2 + t.linear_params + t.linear_out_features * 2
    assert memory.teacher_weight_bytes(t, replace(st, quantization="int8", strategy="fsdp", devices=8)) == int8


def test_cached_and_served_teachers_hold_no_teacher_weights():
    s, t = pair()
    st = Setting(batch_size=4, seq_len=256, precision="bf16", kd=True, top_k=12)
    local = estimate(s, t, replace(st, teacher="local")).parts["teacher"]
    cache = estimate(s, None, replace(st, teacher="cache")).parts["teacher"]
    served = estimate(s, None, replace(st, teacher="served", lookahead=2)).parts["teacher"]
    assert local > t.params * 4
    # Only the micro-batch's sparse rows (k ids and log-probs a token); a server's, for steps ahead too.
    assert 0 < cache < 2 * 4 * 256 * 12 * 20 < local
    assert served == 3 * cache


def test_checkpointing_and_batch_size_move_the_activations():
    s, t = pair()
    st = Setting(batch_size=8, seq_len=256, precision="fp32", kd=True)
    off = estimate(s, t, st, checkpointing=False)
    on = estimate(s, t, st, checkpointing=True)
    assert on.parts["activations"] < off.parts["activations"] / 3
    assert on.parts["activations (other)"] == off.parts["activations"]
    double = estimate(s, t, replace(st, batch_size=16), checkpointing=False)
    assert double.parts["activations"] == 2 * off.parts["activations"]
    assert double.total > off.total


def test_chunk_buffers_follow_the_budget_and_plain_path_holds_full_logits():
    from potstill.losses.chunked import choose_chunk_size

    s, t = pair()
    st = Setting(batch_size=8, seq_len=256, precision="bf16", kd=True, ce=True, threads=1)
    small = memory._loss_buffers(s, t, replace(st, memory_budget_mb=8))[0]
    large = memory._loss_buffers(s, t, replace(st, memory_budget_mb=512))[0]
    rows_small = choose_chunk_size(8 * 255, 8192, 8192, element_size=2, memory_budget_mb=8)
    rows_large = choose_chunk_size(8 * 255, 8192, 8192, element_size=2, memory_budget_mb=512)
    assert rows_small < rows_large
    # Per chunk row: both models' logits (bf16) and the row's hidden state cast, its gradient
    # (bf16) and that gradient in float32; nothing else depends on the chunk.
    assert large - small == (rows_large - rows_small) * (8192 * 2 * 2 + 512 * (2 + 2 + 4))
    plain = memory._loss_buffers(s, t, replace(st, loss_path="plain"))[0]
    assert plain >= 2 * 8 * 256 * 8192 * 2  # student logits and their gradient, B x T x V
    # Four times the batch: the plain path's buffers grow with it, the chunks stay 512 rows.
    big = replace(st, batch_size=32)
    chunked_big = memory._loss_buffers(s, t, big)[0]
    assert memory._loss_buffers(s, t, replace(big, loss_path="plain"))[0] > 3 * plain > chunked_big
    assert chunked_big - large < 4 * 32 * 256 * 512 * 4  # only the (N, H) hidden-state buffers grew


def test_largest_batch_is_the_boundary():
    s, t = pair()
    st = Setting(batch_size=1, seq_len=256, precision="bf16", kd=True, runtime=500 * MB)
    capacity = 4 * 2**30
    b = largest_batch(s, t, st, capacity)
    assert b > 1
    assert estimate(s, t, replace(st, batch_size=b)).total <= capacity < estimate(s, t, replace(st, batch_size=b + 1)).total
    assert largest_batch(s, t, st, capacity, checkpointing=True) > b
    assert largest_batch(s, t, st, 100 * MB) == 0  # not even one sequence next to the runtime


# ----------------------------------------------------------------------------------------
# The command


def write_config(tmp_path, teacher_dir, data, **train):
    import yaml

    cfg = tiny.run_config(tmp_path / "run", teacher_dir, data, **train)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_reads_configs_only(tmp_path, teacher_dir, text_jsonl):
    """No weight file is opened: the teacher folder's weights replaced by garbage still plans, and
    the JSON holds the table's numbers."""
    import shutil

    folder = tmp_path / "teacher"
    shutil.copytree(teacher_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not a weight file")
    cfg = write_config(tmp_path, folder, text_jsonl)
    out = tmp_path / "plan.json"
    proc = tiny.run_cli("plan", cfg, "--devices", "1,2", "--device-memory", "8", "--json", out)
    assert "ddp x1" in proc.stdout and "fsdp x2" in proc.stdout and "largest batch_size" in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["format"] == "potstill-plan" and plan["teacher_kind"] == "local"
    assert [(r["strategy"], r["devices"]) for r in plan["rows"]] == [("ddp", 1), ("ddp", 2), ("fsdp", 2)]
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert plan["teacher"]["params"] == sum(p.numel() for p in real.parameters())
    for row in plan["rows"]:
        assert row["capacity"] == 8 * 2**30
        assert row["fits"] == (row["total"] <= row["capacity"])
        assert row["total"] == max(row["estimate"]["phases"].values())
        assert row["estimate"]["parts"]["runtime"] > 100 * MB  # measured: this process after a run's imports
    # The table prints the JSON's numbers (MB).
    peak_line = next(line for line in proc.stdout.splitlines() if line.startswith("peak (checkpointing off)"))
    assert peak_line.split()[-3:] == [f"{r['total'] / MB:,.0f}" for r in plan["rows"]]
    # An earlier plan may be overwritten; another file may not.
    tiny.run_cli("plan", cfg, "--devices", "1", "--json", out)
    other = tmp_path / "mine.json"
    other.write_text('{"precious": true}')
    tiny.assert_one_line_error(tiny.run_cli("plan", cfg, "--json", other, check=False), "does not overwrite")
    assert other.read_text() == '{"precious": true}'


def test_plan_of_a_cached_teacher_and_of_no_teacher(tmp_path, teacher_dir, text_jsonl):
    """A CE-only student from config with no teacher: no teacher line; a cut from the teacher
    counts the kept layers."""
    import yaml

    cfg = tiny.run_config(tmp_path / "run", teacher_dir, text_jsonl, loss={"logits": {"weight": 0}, "ce": {"weight": 1}})
    cfg["teacher"] = {}
    cfg["student"] = {"config": {"model_type": "llama", **tiny.TINY_STUDENT}, "tokenizer": str(teacher_dir)}
    path = tmp_path / "ce.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "ce.json"
    tiny.run_cli("plan", path, "--devices", "1", "--json", out)
    plan = json.loads(out.read_text())
    assert plan["teacher_kind"] == "none" and plan["teacher"] is None
    assert plan["rows"][0]["estimate"]["parts"]["teacher"] == 0

    cfg["teacher"] = {"name_or_path": str(teacher_dir)}
    cfg["student"] = {"from_teacher": {"every": 2}}
    path.write_text(yaml.safe_dump(cfg))
    tiny.run_cli("plan", path, "--devices", "1", "--json", out)
    plan = json.loads(out.read_text())
    assert plan["student"]["layers"] == 2 and plan["teacher"]["layers"] == 4
    assert plan["student"]["params"] == plan["teacher"]["params"] - 2 * plan["teacher"]["layer_params"]


@pytest.mark.parametrize("args, fragments", [
    (["--devices", "0"], ["--devices 0", "whole number"]),
    (["--devices", "two"], ["--devices two"]),
    (["--device-memory", "-3"], ["--device-memory -3", "above 0"]),
    (["--json", "/nonexistent-folder/plan.json"], ["does not exist"]),
    (["train.batch_size=0"], ["train.batch_size"]),
])
def test_plan_mistakes_are_one_line(tmp_path, teacher_dir, text_jsonl, args, fragments):
    cfg = write_config(tmp_path, teacher_dir, text_jsonl)
    tiny.assert_one_line_error(tiny.run_cli("plan", cfg, *args, check=False), *fragments)


def test_plan_of_a_missing_teacher_folder_is_one_line(tmp_path, text_jsonl):
    cfg = write_config(tmp_path, tmp_path / "no-such-teacher", text_jsonl)
    tiny.assert_one_line_error(tiny.run_cli("plan", cfg, check=False), "no-such-teacher")


def test_llama3_70b_into_8b_on_eight_80gb_gpus():
    """The issue's case, on paper: DDP cannot hold a 70B bf16 teacher and an 8B student with AdamW
    on an 80 GB GPU; FSDP over 8 can, with room for a micro-batch of 4096-token sequences."""
    from transformers import LlamaConfig

    shapes = {name: model_shape(LlamaConfig(vocab_size=128256, hidden_size=h, num_hidden_layers=n,
                                            num_attention_heads=heads, num_key_value_heads=8, intermediate_size=i))
              for name, h, n, heads, i in (("70B", 8192, 80, 64, 28672), ("8B", 4096, 32, 32, 14336))}
    t, s = shapes["70B"], shapes["8B"]
    assert abs(t.params / 1e9 - 70.55) < 0.01 and abs(s.params / 1e9 - 8.03) < 0.01  # Llama-3's published sizes
    st = Setting(batch_size=1, seq_len=4096, precision="bf16", device_type="cuda", teacher_bytes=2, kd=True,
                 devices=8, checkpointing=True, fsdp_mixed_precision=True)
    capacity = 80 * 2**30
    ddp = estimate(s, t, st)
    fsdp = estimate(s, t, replace(st, strategy="fsdp"))
    assert ddp.parts["teacher"] > capacity  # the teacher's weights alone: 141 GB
    assert ddp.total > capacity >= fsdp.total
    assert largest_batch(s, t, replace(st, strategy="fsdp"), capacity) >= 1
    # CPU offload of the student's shards leaves the device only what is gathered and the teacher.
    offloaded = estimate(s, t, replace(st, strategy="fsdp", fsdp_offload=True))
    assert offloaded.parts["optimizer"] == 0 and offloaded.total < fsdp.total


def test_plan_for_cuda_from_a_cpu_machine(tmp_path, teacher_dir, text_jsonl):
    """--device cuda needs --device-memory where no GPU is present; the runtime line is then the
    assumed CUDA context, not this process's RSS."""
    cfg = write_config(tmp_path, teacher_dir, text_jsonl)
    if not torch.cuda.is_available():
        tiny.assert_one_line_error(tiny.run_cli("plan", cfg, "--device", "cuda", check=False), "--device-memory")
    out = tmp_path / "cuda.json"
    proc = tiny.run_cli("plan", cfg, "--device", "cuda", "--device-memory", "80", "--devices", "8", "--json", out)
    assert "runtime (CUDA context, assumed)" in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["device_type"] == "cuda" and not plan["runtime_measured"]
    assert all(r["estimate"]["parts"]["runtime"] == memory.CUDA_CONTEXT_BYTES for r in plan["rows"])
    assert [(r["strategy"], r["devices"]) for r in plan["rows"]] == [("ddp", 8), ("fsdp", 8)]


def test_onpolicy_plans_the_sampled_sequences(tmp_path, teacher_dir, chat_jsonl):
    """An on-policy run trains on prompt + max_new_tokens, num_completions per prompt: longer and more
    sequences than the data's; the largest batch_size is counted in prompts."""
    from potstill.commands.plan import build_plan as plan

    cfg = write_config(tmp_path, teacher_dir, chat_jsonl)
    base = plan(cfg, ["data.max_length=64"], devices="1", device_memory_gb=8)
    on = plan(cfg, ["data.max_length=64", "onpolicy.lmbda=1", "onpolicy.max_new_tokens=64",
                    "onpolicy.num_completions=2"], devices="1", device_memory_gb=8)
    assert (base["setting"]["seq_len"], on["setting"]["seq_len"]) == (64, 128)
    assert on["setting"]["batch_size"] == 2 * base["setting"]["batch_size"]
    assert on["rows"][0]["total"] > base["rows"][0]["total"]
    # twice the sequences, each twice as long: fewer prompts fit than data examples
    assert on["rows"][0]["largest_batch_size"] < base["rows"][0]["largest_batch_size"]


def test_lora_and_frozen_students_plan_gradients_and_adam_state_for_what_trains(tmp_path, teacher_dir, text_jsonl):
    """The trained count comes from the student built (meta) with its adapters and frozen parts, as a
    run builds it; gradients and AdamW moments scale with it, the weights with the whole model."""
    from potstill.config import as_config
    from potstill.models.memory import Setting, estimate, run_models
    from potstill.training.setup import load_models

    base = tiny.run_config(tmp_path / "run", teacher_dir, text_jsonl)
    for overrides in (["student.lora.r=4"], ["student.freeze=[embed_tokens, 'layers\\.0\\.']"]):
        cfg = as_config(base, overrides)
        plan = run_models(cfg).student
        _, real, _, _ = load_models(cfg, "fp32")
        assert plan.params == sum(p.numel() for p in real.parameters())
        assert plan.trained == sum(p.numel() for p in real.parameters() if p.requires_grad) < plan.params
        full = run_models(as_config(base)).student
        st = Setting(batch_size=2, seq_len=48, precision="fp32")
        lean, whole = estimate(plan, None, st).parts, estimate(full, None, st).parts
        assert lean["gradients"] == 4 * plan.trained and whole["gradients"] == 4 * full.params
        assert lean["optimizer"] < whole["optimizer"]


def test_eager_attention_setting_counts_the_score_matrices(tmp_path, teacher_dir, text_jsonl):
    from potstill.config import as_config
    from potstill.models.memory import Setting, estimate, run_models

    base = tiny.run_config(tmp_path / "run", teacher_dir, text_jsonl)
    st = Setting(batch_size=2, seq_len=48, precision="fp32")
    sdpa = run_models(as_config(base)).student
    eager = run_models(as_config(base, ["student.attn_implementation=eager"])).student
    assert eager.attn_implementation == "eager"
    assert estimate(eager, None, st).parts["activations"] > estimate(sdpa, None, st).parts["activations"]
