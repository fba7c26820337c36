"""Benchmark: ``potstill plan``'s estimates against the measured peak memory of real runs (issue #14).

The pair of ``bench/fsdp.py``: a Llama teacher of ~130M parameters (hidden 1024, 10 layers, 4 kv
heads) and a Llama student of ~38M (hidden 512, 10 layers), both with the demo teacher's
8192-token tokenizer, built from config with fixed seeds; the teacher saved in float32. A second,
"narrow" student (hidden 384, 6 layers, 8M parameters) checks shapes the constants were not
fitted on. Data: the bundled python-docs train split, 256 tokens a sequence.

| run | what |
| --- | --- |
| ``local_*``  | a local teacher, forward KL + 0.1 CE on the chunked path, fp32 or bf16 (teacher held in bf16), micro-batches of 4 or 16 sequences, activation checkpointing on or off |
| ``plain_*``  | the same on the plain path (``loss.path=plain``: full logits) |
| ``ce_*``     | no teacher at all: cross-entropy alone |
| ``cache_*``  | a top-12 teacher cache (``potstill cache-teacher`` first, on the first 64 examples) |
| ``ddp2_*`` / ``fsdp2_*`` | ``torchrun --nproc_per_node 2`` (gloo, one thread each): DDP and FSDP (bf16 by FSDP's policy) |

Each run is ``python -m potstill distill CFG --no-progress`` (or under ``torchrun``) for a few
steps, in its own process. Measured: the peak resident memory of each training process
(VmHWM, read from /proc by this launcher every 50 ms, and the run's own ``peak_mem_mb`` in
metrics.jsonl), the largest of them. Estimated: ``python -m potstill plan CFG --devices N
--json`` on the same config, in its own process on the same machine (its "runtime" line is that
process's measured RSS after importing what a run imports), the column of the run's strategy
and process count. The launcher imports neither torch nor potstill.

    python bench/plan.py            # the table in docs/plan.md; writes bench/results/plan.json
    python bench/plan.py --quick    # smoke run: three small runs
    python bench/plan.py --only local_fp32_b4,fsdp2_bf16_b4
"""

from __future__ import annotations

# No torch here: the children are measured.
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fsdp import PAIRS, vm_hwm_mb  # bench/fsdp.py: its model pair; a worker's peak RSS from /proc (no torch)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO_TEACHER = REPO / "src" / "potstill" / "assets" / "demo-teacher"

# The pair of bench/fsdp.py (so the FSDP rows here and there measure the same models), and a narrower student.
TEACHER = PAIRS["full"]["teacher"]
STUDENTS = {"s38m": PAIRS["full"]["student"],
            "s8m": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 6,
                    "intermediate_size": 1024}}
QUICK_TEACHER = PAIRS["quick"]["teacher"]

# name -> (processes, student, overrides). fp32 / bf16 are train.precision.
FP32, BF16 = {"train": {"precision": "fp32"}}, {"train": {"precision": "bf16"}}
NO_TEACHER = {"teacher": {"name_or_path": None}, "loss": {"logits": {"weight": 0.0}, "ce": {"weight": 1.0}}}
RUNS = {
    "local_fp32_b4": (1, "s38m", [FP32, {"train": {"batch_size": 4}}]),
    "local_bf16_b4": (1, "s38m", [BF16, {"train": {"batch_size": 4}}]),
    "local_bf16_b16": (1, "s38m", [BF16, {"train": {"batch_size": 16}}]),
    "local_fp32_b16": (1, "s38m", [FP32, {"train": {"batch_size": 16}}]),
    "local_fp32_b16_ckpt": (1, "s38m", [FP32, {"train": {"batch_size": 16}}, {"student": {"gradient_checkpointing": True}}]),
    "local_bf16_b16_ckpt": (1, "s38m", [BF16, {"train": {"batch_size": 16}}, {"student": {"gradient_checkpointing": True}}]),
    "plain_bf16_b4": (1, "s38m", [BF16, {"train": {"batch_size": 4}, "loss": {"path": "plain"}}]),
    "ce_bf16_b8": (1, "s38m", [BF16, {"train": {"batch_size": 8}}, NO_TEACHER]),
    "cache_bf16_b8": (1, "s38m", [BF16, {"train": {"batch_size": 8}}]),
    "narrow_fp32_b8": (1, "s8m", [FP32, {"train": {"batch_size": 8}}]),
    "narrow_bf16_b32": (1, "s8m", [BF16, {"train": {"batch_size": 32}}]),
    "ddp2_bf16_b4": (2, "s38m", [BF16, {"train": {"batch_size": 4, "strategy": "ddp"}}]),
    "fsdp2_bf16_b4": (2, "s38m", [BF16, {"train": {"batch_size": 4, "strategy": "fsdp"}}]),
}
QUICK_RUNS = ("local_fp32_b4", "ce_bf16_b8", "fsdp2_bf16_b4")
CACHE_EXAMPLES = 64
TOLERANCE = 0.20


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, nested sections merged (a copy)."""
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def child_prepare(out: Path, quick: bool) -> None:
    """The teacher (random, seeded, float32) saved with the demo tokenizer; parameter counts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(DEMO_TEACHER)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False,
                                         max_position_embeddings=512, **(QUICK_TEACHER if quick else TEACHER)))
    model.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    (out / "prepare.json").write_text(json.dumps({"teacher_params": sum(p.numel() for p in model.parameters()),
                                                  "torch": torch.__version__}))


def run_child(cmd: list[str], log: Path, env: dict, *, workers: bool) -> tuple[float, list[float]]:
    """Run ``cmd``; (wall seconds, peak RSS in MB of each training process: the command itself, or
    with ``workers`` its children, i.e. torchrun's workers), sampled every 50 ms until they exit."""
    started = time.perf_counter()
    peaks: dict[int, float] = {}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while proc.poll() is None:
            pids = [proc.pid]
            if workers:
                pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                       text=True).stdout.split()]
            for pid in pids:
                peak = vm_hwm_mb(pid)
                if peak is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), peak)
            time.sleep(0.05)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; {tail[0]}; see {log}")
    return time.perf_counter() - started, [peaks[p] for p in sorted(peaks)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, three runs")
    parser.add_argument("--only", help="comma-separated run names")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child == "prepare":
        child_prepare(args.out, args.quick)
        return 0

    names = list(RUNS) if not args.quick else list(QUICK_RUNS)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in RUNS]
        if unknown:
            raise SystemExit(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="potstill-bench-plan-"))
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print(f"working in {out}; loadavg {load_before[0]:.2f}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    run_child([sys.executable, __file__, "--child", "prepare", "--out", str(out)] + (["--quick"] if args.quick else []),
              out / "prepare.log", env, workers=False)
    prepared = json.loads((out / "prepare.json").read_text())
    teacher = str(out / "teacher")
    base = {
        "teacher": {"name_or_path": teacher},
        "data": {"source": "python-docs", "split": "train", "max_length": 256, "validation_fraction": 0.0,
                 "validation_split": None},
        "loss": {"ce": {"weight": 0.1}},
        "train": {"max_steps": args.steps, "lr": 1e-3, "log_every": 1, "checkpoint_every": None},
        "output": {"tensorboard": False},
    }
    results = {}
    for name in names:
        procs, student, extras = RUNS[name]
        shape = STUDENTS[student] if not args.quick else {k: max(1, v // 4) if k != "num_hidden_layers" else v
                                                          for k, v in STUDENTS[student].items()}
        cfg = merge(base, {"student": {"config": {"model_type": "llama", **shape, "max_position_embeddings": 512,
                                                  "tie_word_embeddings": False},
                                       "tokenizer": teacher}})
        for extra in extras:
            cfg = merge(cfg, extra)
        cfg["output"]["dir"] = str(out / name)
        if name.startswith("cache"):
            cfg["data"]["max_examples"] = CACHE_EXAMPLES
            cfg["cache"] = {"dir": str(out / f"{name}-cache"), "k": 12, "value_bits": 8}
            cfg_path = out / f"{name}-capture.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            run_child([sys.executable, "-m", "potstill", "cache-teacher", str(cfg_path), "--no-progress"],
                      out / f"{name}-capture.log", env, workers=False)
            cfg["teacher"]["cache"] = cfg["cache"]["dir"]
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if procs == 1:
            cmd = [sys.executable, "-m", "potstill", "distill", str(path), "--no-progress"]
            run_env = env
        else:
            cmd = ["torchrun", "--nproc_per_node", str(procs), "-m", "potstill", "distill", str(path), "--no-progress"]
            run_env = {**env, "OMP_NUM_THREADS": "1"}
        load = os.getloadavg()[0]
        wall, peaks = run_child(cmd, out / f"{name}.log", run_env, workers=procs > 1)
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
        logged = max(r.get("peak_mem_mb", 0.0) for r in records)
        started = time.perf_counter()
        plan_json = out / f"{name}.plan.json"
        run_child([sys.executable, "-m", "potstill", "plan", str(path), "--devices", str(procs), "--json",
                   str(plan_json)], out / f"{name}.plan.log", env, workers=False)
        plan_s = time.perf_counter() - started
        plan = json.loads(plan_json.read_text())
        strategy = cfg["train"].get("strategy", "ddp")
        row = next(r for r in plan["rows"] if r["strategy"] == strategy and r["devices"] == procs)
        measured = max(peaks + [logged])
        estimate = row["total"] / 2**20
        results[name] = {
            "processes": procs, "strategy": strategy, "precision": plan["setting"]["precision"],
            "batch_size": cfg["train"]["batch_size"], "checkpointing": plan["setting"]["checkpointing"],
            "teacher": plan["teacher_kind"], "loss_path": plan["setting"]["loss_path"],
            "student_params": plan["student"]["params"],
            "measured_peak_mb": round(measured, 1), "process_peaks_mb": [round(p, 1) for p in peaks],
            "logged_peak_mb": round(logged, 1), "estimate_mb": round(estimate, 1),
            "error": round((estimate - measured) / measured, 4),
            "phases_mb": {k: round(v / 2**20, 1) for k, v in row["estimate"]["phases"].items()},
            "parts_mb": {k: round(v / 2**20, 1) for k, v in row["estimate"]["parts"].items()},
            "run_wall_s": round(wall, 1), "plan_wall_s": round(plan_s, 1), "loadavg_1m": round(load, 2),
        }
        r = results[name]
        print(f"{name}: measured {r['measured_peak_mb']:.0f} MB, estimate {r['estimate_mb']:.0f} MB "
              f"({100 * r['error']:+.1f}%), run {wall:.0f} s, plan {plan_s:.1f} s", flush=True)

    print()
    print("| run | processes | precision | micro-batch | checkpointing | teacher | loss path | measured peak MB "
          "| estimate MB | error |")
    print("| --- | ---: | --- | ---: | --- | --- | --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['processes']} {r['strategy']} | {r['precision']} | {r['batch_size']} x 256 | "
              f"{'on' if r['checkpointing'] else 'off'} | {r['teacher']} | {r['loss_path']} | "
              f"{r['measured_peak_mb']:.0f} | {r['estimate_mb']:.0f} | {100 * r['error']:+.1f}% |")
    worst = max(abs(r["error"]) for r in results.values())
    print(f"\nlargest error {100 * worst:.1f}% (target: within {100 * TOLERANCE:.0f}%)")
    record = {
        "command": "python bench/plan.py" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else ""),
        "steps": args.steps, "teacher_params": prepared["teacher_params"], "results": results,
        "largest_error": worst, "target": f"|estimate - measured| / measured <= {TOLERANCE}",
        "within_target": worst <= TOLERANCE,
        "machine": {"cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "python": platform.python_version(), "torch": prepared.get("torch")},
    }
    if not args.quick and not args.only:
        results_dir = HERE / "results"
        results_dir.mkdir(exist_ok=True)
        (results_dir / "plan.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {results_dir / 'plan.json'}")
    else:
        (out / "plan-bench.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out / 'plan-bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
