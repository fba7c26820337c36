"""Benchmark: a ternary (BitNet b1.58) student against the same student in bf16, and quantized teachers.

On the quickstart's demo teacher (16.9M Llama) and student (2.95M, same random init for both):

* ``bf16``: the quickstart's KD run (bf16 autocast where the CPU has AMX, float32 master weights);
* ``ternary``: the same run with ``student.bitnet=true`` (linear layers ternary, 8-bit activations;
  embeddings and head full precision), same steps, data, learning rate and seed;
* test-split perplexity of both (and of the packed export, which must equal the ternary student),
  KL(teacher || student), stored sizes: linear weights packed vs bf16, and whole files;
* the teacher loaded in bf16, int8 and int4 (weight-only, head kept; int8 with torchao, int4 with
  torchao on CUDA and potstill's pure-PyTorch Int4Linear on CPU): bytes of parameters and buffers,
  RSS growth of a fresh process that loads it, test perplexity, and KL(bf16 teacher || quantized
  teacher) per token on the test split.

    python bench/bitnet.py                 # 240 steps (the quickstart's), writes bench/results/bitnet.json
    python bench/bitnet.py --steps 10      # smoke test
    python bench/bitnet.py --teachers-only --modes int4   # only those teacher rows, merged into the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def teacher_memory_child(mode: str) -> dict:
    """Load the demo teacher (bf16, quantized with ``mode`` unless 'none') in this fresh process."""
    from potstill.config import TeacherConfig
    from potstill.models.teacher_model import load_teacher
    from potstill.models.quantize import model_bytes
    from potstill.commands.quickstart import demo_teacher_path

    import transformers  # noqa: F401  (imports before the baseline, not counted)
    import torchao  # noqa: F401

    before = rss_mb()
    try:
        model, _ = load_teacher(TeacherConfig(name_or_path=str(demo_teacher_path()), quantization=mode),
                                dtype=torch.bfloat16)
    except Exception as err:  # noqa: BLE001  (reported in the table)
        return {"mode": mode, "error": str(err)}
    # Give the freed full-precision copy back to the OS before reading RSS.
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return {"mode": mode, "param_bytes": model_bytes(model), "rss_delta_mb": rss_mb() - before}


def teacher_memory(mode: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--teacher-memory", mode], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"mode": mode, "error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def file_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def quantized_teachers(modes: list[str], precision: str, device: torch.device) -> dict:
    """One row per teacher mode: bytes and RSS (fresh process), test ppl, KL and agreement vs the bf16 teacher."""
    from potstill.config import DataConfig, TeacherConfig
    from potstill.data import build_datasets
    from potstill.training.evaluation import evaluate_models
    from potstill.models.teacher_model import load_teacher
    from potstill.models.precision import autocast_context
    from potstill.commands.quickstart import MAX_LENGTH, demo_teacher_path

    teacher = demo_teacher_path()
    ref, tok = load_teacher(TeacherConfig(name_or_path=str(teacher)), dtype=torch.bfloat16)
    test, _ = build_datasets(DataConfig(source="python-docs", split="test", validation_fraction=0.0,
                                        max_length=MAX_LENGTH), tok, progress=False)
    teachers = {}
    for mode in modes:
        mem = teacher_memory(mode)
        row = dict(mem)
        if "error" not in mem:
            q = ref if mode == "none" else load_teacher(
                TeacherConfig(name_or_path=str(teacher), quantization=mode), dtype=torch.bfloat16)[0]
            scores = evaluate_models(q.to(device), test, pad_token_id=tok.pad_token_id, batch_size=16, device=device,
                                     teacher=None if mode == "none" else ref.to(device),
                                     autocast=autocast_context(precision, device))
            row.update({"ppl": scores["ppl"], "kl_vs_bf16": scores.get("kl", 0.0),
                        "agreement_vs_bf16": scores.get("agreement", 1.0)})
        teachers[mode] = row
    return teachers


def print_teachers(teachers: dict) -> None:
    print(f"\n{'teacher':<10}{'params+buffers':>16}{'RSS growth':>12}{'test ppl':>10}{'KL(bf16||q)':>13}{'agree':>8}")
    for mode, r in teachers.items():
        label = "bf16" if mode == "none" else mode
        if "error" in r:
            print(f"{label:<10} not available here: {r['error']}")
            continue
        print(f"{label:<10}{r['param_bytes'] / 1e6:>13.2f} MB{r['rss_delta_mb']:>9.1f} MB{r['ppl']:>10.3f}"
              f"{r['kl_vs_bf16']:>13.5f}{r['agreement_vs_bf16']:>8.4f}")


def teachers_only(args, modes: list[str]) -> None:
    """--teachers-only: the teacher rows of ``modes``, replacing only those rows of the existing JSON."""
    import logging

    from potstill.models.precision import resolve_precision

    logging.basicConfig(level=logging.INFO, format="potstill: %(message)s")
    precision = resolve_precision("auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teachers = quantized_teachers(modes, precision, device)
    print_teachers(teachers)
    out = Path(args.out) if args.out else HERE / "results" / "bitnet.json"
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.setdefault("teachers", {}).update(teachers)
    runs = data.setdefault("teacher_runs", [])
    runs.append({"command": " ".join([Path(sys.executable).name] + sys.argv), "modes": modes,
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "precision": precision,
                 "device": str(device)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out)
    print(f"\nwrote {out} (teacher rows {', '.join(modes)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=240, help="optimizer steps of each run (quickstart: 240)")
    p.add_argument("--work", default="runs/bench-bitnet", help="run folders")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/bitnet.json)")
    p.add_argument("--teachers-only", action="store_true",
                   help="skip the student runs: measure only the quantized teachers and replace their rows in "
                        "the existing JSON (the other rows and sections are kept)")
    p.add_argument("--modes", default="none,int8,int4", help="teacher rows to measure (comma-separated)")
    p.add_argument("--teacher-memory", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.teacher_memory:
        print("RESULT " + json.dumps(teacher_memory_child(args.teacher_memory)), flush=True)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.teachers_only:
        teachers_only(args, modes)
        return

    import logging

    logging.basicConfig(level=logging.INFO, format="potstill: %(message)s")
    from potstill.commands.export import export_packed
    from potstill.models.precision import resolve_precision
    from potstill.commands.quickstart import MAX_LENGTH, demo_teacher_path, make_student_init, run_config, test_scores
    from potstill.commands.distill import distill

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher = demo_teacher_path()
    init = make_student_init(work)
    runs, train = {}, {}
    for name, bitnet in (("bf16", False), ("ternary", True)):
        cfg = run_config(work / name, args.steps, init)
        cfg.student.bitnet = bitnet
        t0 = time.perf_counter()
        distill(cfg, progress=False)
        summary = json.loads((work / name / "summary.json").read_text())
        train[name] = {"wall_s": time.perf_counter() - t0, "tokens_per_s": summary["train"].get("tokens_per_s")}
        runs[name] = work / name

    packed = Path(export_packed(runs["ternary"], work / "ternary-packed")["out"])
    packed_bf16 = export_packed(runs["ternary"], work / "ternary-packed-bf16", dtype="bfloat16")
    manifest = json.loads((packed / "bitnet.json").read_text())
    # The bf16 student as a user would store it: every tensor in bf16.
    from transformers import AutoModelForCausalLM

    bf16_dir = work / "bf16-student-stored-bf16"
    AutoModelForCausalLM.from_pretrained(runs["bf16"] / "student", dtype=torch.bfloat16).save_pretrained(bf16_dir)

    rows = test_scores({"teacher": teacher, "student bf16": runs["bf16"] / "student",
                        "student ternary": runs["ternary"] / "student", "ternary, packed export": packed},
                       teacher, progress=False)
    sizes = {
        "fp32 safetensors (the run's student/)": {"linear_bytes": 2 * manifest["bf16_weight_bytes"],
                                                  "file_bytes": file_size(runs["bf16"] / "student")},
        "bf16 safetensors (every tensor bf16)": {"linear_bytes": manifest["bf16_weight_bytes"],
                                                 "file_bytes": file_size(bf16_dir)},
        "packed ternary, rest float32 (exact)": {"linear_bytes": manifest["packed_weight_bytes"],
                                                 "file_bytes": manifest["file_bytes"]},
        "packed ternary, rest bf16 (--dtype bfloat16)": {"linear_bytes": packed_bf16["packed_weight_bytes"],
                                                         "file_bytes": packed_bf16["file_bytes"]},
    }

    # -- quantized teachers ---------------------------------------------------------------
    precision = resolve_precision("auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teachers = quantized_teachers(modes, precision, device)

    # -- report ---------------------------------------------------------------------------
    print(f"\nstudents: {args.steps} steps of 16 x {MAX_LENGTH} tokens, KD (forward KL) from the demo teacher, "
          f"precision {precision}, test split ({int(rows['teacher']['tokens'])} tokens)")
    print(f"{'model':<24}{'test ppl':>10}{'KL(T||S)':>10}{'agree':>8}{'train tok/s':>13}")
    for name, r in rows.items():
        run = train.get(name.split()[-1]) if name.startswith("student") else None
        print(f"{name:<24}{r['ppl']:>10.2f}{r.get('kl', float('nan')):>10.4f}{r.get('agreement', float('nan')):>8.4f}"
              f"{(run or {}).get('tokens_per_s') or float('nan'):>13.0f}")
    print(f"\n{'stored as':<46}{'linear weights':>16}{'file':>12}")
    for name, r in sizes.items():
        print(f"{name:<46}{r['linear_bytes'] / 1e3:>13.0f} kB{r['file_bytes'] / 1e6:>9.2f} MB")
    print(f"packed linear weights / bf16: 1/{1 / manifest['ratio_to_bf16']:.2f}")
    print_teachers(teachers)

    out = Path(args.out) if args.out else HERE / "results" / "bitnet.json"
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "steps": args.steps,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "precision": precision,
            "device": str(device)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "students": rows, "sizes": sizes, "train": train,
                               "teachers": teachers}, indent=1))
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
