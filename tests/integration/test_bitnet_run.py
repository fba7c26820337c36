"""BitNet students and quantized teachers in real runs: train -> export -> load -> evaluate."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import potstill
import potstill.training.checkpoint
import tiny
from potstill.commands.export import export_packed
from potstill.models.bitnet import BitLinear, convert_to_bitnet
from potstill.config import TeacherConfig
from potstill.errors import ConfigError, ModelError, RunDirError
from potstill.ownership import mark_owned, owner_kind
from potstill.models.loading import load_causal_lm
from potstill.models.teacher_model import load_teacher
from potstill.models.quantize import model_bytes

from test_cli import assert_one_line_error, base_config, run_cli, write_config
from mounts import read_only_folder, small_disk
from test_teacher_cache import tree


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
                           train__checkpoint_every=2, eval__every=None, eval__at_start=False)  # no teacher calls but training's

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


# ----------------------------------------------------------------------------------------
# export never destroys a folder it did not write, nor its own input


def _bitnet_run(path, tokenizer):
    """A run directory whose student/ is a BitNet student (untrained: export only packs it)."""
    model = tiny.build_llama(None, len(tokenizer), hidden_size=32, layers=2, intermediate=64, seed=3)
    convert_to_bitnet(model)
    model.save_pretrained(path / "student")
    tokenizer.save_pretrained(path / "student")
    mark_owned(path, "run")
    return path


def test_export_replaces_only_an_earlier_export(tmp_path, tokenizer):
    run = _bitnet_run(tmp_path / "run", tokenizer)
    packed = run / "bitnet"
    assert export_packed(run)["out"] == str(packed) and owner_kind(packed) == "export"
    export_packed(run, dtype="bfloat16")  # an earlier export: replaced
    assert json.loads((packed / "bitnet.json").read_text())["other_tensors_dtype"] == "bfloat16"
    assert sorted(p.name for p in run.iterdir()) == [".potstill-owned", "bitnet", "student"]  # no temporaries
    (packed / "README.md").write_text("my model card")
    before = tree(tmp_path)
    with pytest.raises(RunDirError, match=r"--out .*bitnet is an earlier export but also holds README\.md, which "
                                          "potstill export did not write"):
        export_packed(run)
    assert tree(tmp_path) == before
    # An export written before exports carried the mark is known by its bitnet.json; an empty folder holds nothing.
    (packed / "README.md").unlink()
    (packed / ".potstill-owned").unlink()
    export_packed(run)
    (tmp_path / "empty").mkdir()
    export_packed(run, tmp_path / "empty")
    assert owner_kind(packed) == owner_kind(tmp_path / "empty") == "export"


@pytest.mark.parametrize("case", ["user-folder", "potstill-cache", "file", "parent-is-file", "run", "student",
                                  "contains-run", "inside-student", "inside-checkpoint"])
def test_export_refuses_a_folder_it_does_not_own_and_its_own_input(tmp_path, tokenizer, case):
    run = _bitnet_run(tmp_path / "run", tokenizer)
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "model.safetensors").write_bytes(b"weights")
    mine = tmp_path / "mine"
    if case in ("file", "parent-is-file"):
        mine.write_text("a file of mine")
    elif case in ("user-folder", "potstill-cache"):
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
        if case == "potstill-cache":
            mark_owned(mine, "cache")
    out, says = {
        "user-folder": (mine, "already exists and was not written by potstill export"),
        "potstill-cache": (mine, "already exists and holds a potstill cache"),
        "file": (mine, "is a file, not a folder"),
        "parent-is-file": (mine / "packed", f"{mine} is a file, not a folder"),
        "run": (run, "is or contains the run directory"),
        "student": (run / "student", "is or contains the student folder"),
        "contains-run": (tmp_path, "is or contains the run directory"),
        "inside-student": (run / "student" / "bitnet", "lies inside the student folder"),
        "inside-checkpoint": (run / "checkpoints" / "bitnet", "lies inside the run directory"),
    }[case]
    before = tree(tmp_path)
    with pytest.raises(RunDirError, match=f"--out {re.escape(str(out))}.*{re.escape(says)}"):
        export_packed(run, out)
    assert tree(tmp_path) == before
    # The student folder exported directly: the same rules, with the student as the input.
    if case in ("student", "inside-student"):
        with pytest.raises(RunDirError, match="the student folder"):
            export_packed(run / "student", out)
        assert tree(tmp_path) == before


def test_export_to_a_full_disk_is_one_line_and_leaves_no_temporary_folder(tmp_path, tokenizer):
    run = _bitnet_run(tmp_path / "run", tokenizer)
    disk = tmp_path / "disk"
    with small_disk(disk, 48) as resize:
        with pytest.raises(RunDirError, match=f"potstill export: writing {re.escape(str(disk / 'packed'))}: no space "
                                              r"left on the device( \(.*\))?; free space or choose another --out"):
            export_packed(run, disk / "packed")
        assert list(disk.iterdir()) == []
        resize(4096)
        export_packed(run, disk / "packed")
        assert owner_kind(disk / "packed") == "export" and sorted(p.name for p in disk.iterdir()) == ["packed"]


def test_export_errors_about_the_output_folder_are_one_line(tmp_path, tokenizer):
    run = _bitnet_run(tmp_path / "run", tokenizer)
    before = tree(tmp_path)
    assert_one_line_error(run_cli("export", str(run), "--bitnet", "--out", str(run / "student")),
                          f"--out {run / 'student'} is or contains the student folder")
    with read_only_folder(tmp_path / "ro") as ro:
        assert_one_line_error(run_cli("export", str(run), "--bitnet", "--out", str(ro / "packed")),
                              f"cannot write in {ro} (read-only or no permission)")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("damage, says", [
    (lambda m: [m], "bitnet.json is damaged (not a JSON object)"),
    (lambda m: {**m, "modules": None}, "bitnet.json is damaged (its modules and their shapes are missing"),
    (lambda m: {**m, "modules": {k: {"shape": "32x32"} for k in m["modules"]}}, "bitnet.json is damaged"),
    (lambda m: {**m, "modules": {k: {**v, "shape": [v["shape"][1], v["shape"][0] * 2]} for k, v in
                                 m["modules"].items()}}, "does not fit its shape"),
])
def test_damaged_packed_folder_is_one_line(tmp_path, tokenizer, damage, says):
    from potstill.models.bitnet import load_packed

    run = _bitnet_run(tmp_path / "run", tokenizer)
    packed = run / "bitnet"
    export_packed(run)
    manifest = json.loads((packed / "bitnet.json").read_text())
    (packed / "bitnet.json").write_text(json.dumps(damage(manifest)))
    with pytest.raises(ModelError, match=re.escape(says)):
        load_packed(packed)


def test_damaged_packed_weights_are_one_line_in_evaluate(tmp_path, tokenizer, text_jsonl):
    run = _bitnet_run(tmp_path / "run", tokenizer)
    packed = run / "bitnet"
    export_packed(run)
    data = (packed / "model.safetensors").read_bytes()
    (packed / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = run_cli("evaluate", str(packed), "--data", str(text_jsonl), "--max-batches", "1", "--no-progress")
    assert_one_line_error(proc, str(packed), "model.safetensors")
