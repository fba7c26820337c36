"""BitNet students and quantized teachers in real runs: train -> export -> load -> evaluate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import potstill
import potstill.training.checkpoint
from potstill.models.bitnet import BitLinear
from potstill.config import TeacherConfig
from potstill.errors import ConfigError, ModelError
from potstill.models.loading import load_causal_lm
from potstill.models.teacher_model import load_teacher
from potstill.models.quantize import model_bytes

from test_cli import assert_one_line_error, base_config, run_cli, write_config


@pytest.fixture(autouse=True)
def _fresh_accelerator():
    """In-process runs here use both fp32 and bf16: Accelerate keeps its state per process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _load(path) -> torch.nn.Module:
    return load_causal_lm(str(path), revision=None, dtype=torch.float32, trust_remote_code=False, role="model")


def test_cli_train_export_evaluate_round_trip(tmp_path, teacher_dir, text_jsonl):
    cfg = base_config(tmp_path, teacher_dir, text_jsonl, student__bitnet=True, loss__path="chunked")
    proc = run_cli("distill", str(write_config(tmp_path / "run.yaml", **cfg)), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert json.loads((run / "student" / "config.json").read_text())["potstill_bitnet"] == \
        {"head": False, "embeddings": False}

    proc = run_cli("export", str(run), "--bitnet")
    assert proc.returncode == 0, proc.stderr
    assert "packed BitNet model written to" in proc.stdout
    packed = run / "bitnet"
    assert (packed / "bitnet.json").is_file() and (packed / "tokenizer.json").is_file()

    # The packed folder and the run's master weights give the same metrics on the same data, exactly.
    scores = {}
    for name, target in (("packed", packed), ("student", run / "student")):
        out = tmp_path / f"{name}.json"
        proc = run_cli("evaluate", str(target), "--data", str(text_jsonl), "--max-length", "64",
                       "--precision", "bf16", "--max-batches", "3", "--no-progress", "--json", str(out),
                       "--teacher", str(teacher_dir))
        assert proc.returncode == 0, proc.stderr
        scores[name] = json.loads(out.read_text())
    assert scores["packed"] == scores["student"]
    assert scores["packed"]["tokens"] > 0

    # Evaluating the run directory re-creates the quantized forward from the config marker.
    proc = run_cli("evaluate", str(run), "--no-progress", "--precision", "fp32", "--max-batches", "2",
                   "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())["final_eval"]
    assert json.loads((tmp_path / "r.json").read_text())["ce"] == pytest.approx(summary["ce"], rel=1e-6)


def test_export_errors_are_one_line(tmp_path, teacher_dir, text_jsonl):
    cfg = base_config(tmp_path, teacher_dir, text_jsonl, train__max_steps=1, eval__every=None)
    assert run_cli("distill", str(write_config(tmp_path / "run.yaml", **cfg)), "--no-progress").returncode == 0
    assert_one_line_error(run_cli("export", str(tmp_path / "run"), "--bitnet"), "not a BitNet student",
                          "student.bitnet=true")
    assert_one_line_error(run_cli("export", str(tmp_path / "run")), "--bitnet")
    assert_one_line_error(run_cli("export", str(tmp_path / "nowhere"), "--bitnet"), "neither a run directory")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bitnet_from_pretrained_student_trains_and_differs(tmp_path, teacher_dir, student_dir, text_jsonl, precision):
    common = {"student": {"name_or_path": str(student_dir)}, "train__precision": precision,
              "train__max_steps": 3, "eval__every": None}
    runs = {}
    for bitnet in (False, True):
        cfg = base_config(tmp_path / str(bitnet), teacher_dir, text_jsonl, **common)
        cfg["student"]["bitnet"] = bitnet
        runs[bitnet] = potstill.distill(cfg, progress=False)
    w = {k: load_file(str(r.student_dir / "model.safetensors")) for k, r in runs.items()}
    key = "model.layers.0.self_attn.q_proj.weight"
    assert w[True][key].dtype == torch.float32  # full-precision master weights are saved
    assert not torch.equal(w[True][key], w[False][key])  # the ternary forward changed the training
    assert runs[True].final_eval["ppl"] != runs[False].final_eval["ppl"]
    assert any(isinstance(m, BitLinear) for m in _load(runs[True].student_dir).modules())


def test_bitnet_head_uses_plain_path_and_chunked_is_refused(tmp_path, teacher_dir, text_jsonl):
    cfg = base_config(tmp_path, teacher_dir, text_jsonl, student__bitnet=True, student__bitnet_head=True,
                      loss__path="chunked", train__max_steps=1)
    with pytest.raises(ConfigError, match="loss.path=chunked is not possible"):
        potstill.distill(cfg, progress=False)
    cfg["loss"]["path"] = "auto"
    result = potstill.distill(cfg, progress=False)
    assert isinstance(_load(result.student_dir).lm_head, BitLinear)


def test_bitnet_resume_equals_uninterrupted(tmp_path, teacher_dir, text_jsonl):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_resume import _interrupt, patch_decoder

    def cfg(out):
        return base_config(out, teacher_dir, text_jsonl, student__bitnet=True, train__max_steps=4,
                           train__checkpoint_every=2, eval__every=None)

    straight = potstill.distill(cfg(tmp_path / "a"), progress=False)
    interrupted = cfg(tmp_path / "b")
    # 2 micro-batches a step: the teacher's 6th call is in step 3, after the step-2 checkpoint.
    interrupted["teacher"] = {"name_or_path": patch_decoder(AutoModelForCausalLM.from_pretrained(teacher_dir), 5,
                                                            _interrupt),
                              "tokenizer": AutoTokenizer.from_pretrained(teacher_dir)}
    with pytest.raises(KeyboardInterrupt):
        potstill.distill(interrupted, progress=False)
    assert potstill.training.checkpoint.latest_checkpoint(tmp_path / "b" / "run").name == "step-000002"
    resumed = potstill.distill(cfg(tmp_path / "b"), overrides=["train.resume=auto"], progress=False)
    a = load_file(str(straight.student_dir / "model.safetensors"))
    b = load_file(str(resumed.student_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_config_errors_for_bitnet_and_quantization(tmp_path, teacher_dir, text_jsonl):
    cfg = base_config(tmp_path, teacher_dir, text_jsonl, student__bitnet_head=True)
    proc = run_cli("distill", str(write_config(tmp_path / "a.yaml", **cfg)))
    assert_one_line_error(proc, "bitnet_head", "student.bitnet=true")
    cfg = base_config(tmp_path, teacher_dir, text_jsonl, teacher__quantization="int3")
    proc = run_cli("distill", str(write_config(tmp_path / "b.yaml", **cfg)))
    assert_one_line_error(proc, "teacher.quantization")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_int4_and_bitsandbytes_refused_on_cpu(teacher_dir):
    # int4 runs on CPU (potstill's Int4Linear, tests/unit/test_int4.py); this teacher (width 48) has no
    # layer whose input width is a multiple of the group size, which is refused in one line.
    with pytest.raises(ModelError, match="int4 needs input widths that are multiples of 128"):
        load_teacher(TeacherConfig(name_or_path=str(teacher_dir), quantization="int4"), dtype=torch.bfloat16)
    with pytest.raises(ModelError, match="bitsandbytes needs a CUDA GPU"):
        load_teacher(TeacherConfig(name_or_path=str(teacher_dir), quantization="int8",
                                   quantization_backend="bitsandbytes"), dtype=torch.bfloat16)


def test_int8_teacher_is_smaller_and_close(teacher_dir):
    ref, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir)), dtype=torch.bfloat16)
    q, _ = load_teacher(TeacherConfig(name_or_path=str(teacher_dir), quantization="int8"), dtype=torch.bfloat16)
    assert type(q.lm_head.weight) in (torch.Tensor, torch.nn.Parameter)  # head kept ...
    from potstill.models.hidden import supports_chunked

    assert supports_chunked(q)[0] is not None  # ... so the chunked loss path still applies
    assert type(q.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    linear = sum(m.weight.numel() for n, m in ref.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    # int8 saves one byte per linear weight, minus per-row scales.
    saved = model_bytes(ref) - model_bytes(q)
    assert 0.9 * linear < saved < linear
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits.float(), q(input_ids=ids).logits.float()
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.1 * a.abs().max().item())


@pytest.mark.parametrize("student", ["config", "from_teacher"])
def test_int8_teacher_run_distills(tmp_path, teacher_dir, text_jsonl, student):
    cfg = base_config(tmp_path, teacher_dir, text_jsonl, teacher__quantization="int8", train__precision="bf16",
                      train__max_steps=6, train__lr=3e-3, eval__every=None)
    if student == "from_teacher":
        cfg["student"] = {"from_teacher": {"every": 2}, "bitnet": True}
    result = potstill.distill(cfg, progress=False)
    losses = [r["loss"] for r in map(json.loads, result.metrics_path.read_text().splitlines()) if "loss" in r]
    assert len(losses) == 6 and all(l == l for l in losses) and losses[-1] < losses[0]
    assert result.final_eval["kl"] > 0 and result.final_eval["teacher_ppl"] > 1
