"""Benchmark: FSDP against DDP over 2 CPU processes (gloo), on a pair where weights dominate (issue #14).

The pair: a Llama teacher of ~130M parameters (GQA) (hidden 1024, 10 layers) and a Llama student of
~38M (hidden 512, 10 layers), both with the demo teacher's 8192-token tokenizer, built from
config with fixed seeds (random weights: memory and speed do not depend on what they learned).
Data: the bundled python-docs train split, 256 tokens a sequence, 4 sequences per process a
step, no evaluation. Precision: ``auto`` (bf16 autocast where the CPU has AMX; the teacher is
then held in bf16).

| run | what |
| --- | --- |
| ``ddp``            | ``train.strategy=ddp``: every process holds both models, all-reduces gradients |
| ``fsdp``           | ``train.strategy=fsdp``: student (and its gradients and AdamW state) and teacher sharded per layer; bf16 by FSDP's mixed-precision policy (``train.fsdp.mixed_precision=auto``) |
| ``fsdp_autocast``  | the same with ``train.fsdp.mixed_precision=false``: autocast, as DDP computes |
| ``fsdp_noreshard`` | ``fsdp`` with ``train.fsdp.reshard_after_forward=false`` (student layers stay gathered until backward) |

Each run is ``torchrun --nproc_per_node 2 -m potstill distill`` with ``OMP_NUM_THREADS=1``
(one core each). Measured, from the main process's ``metrics.jsonl``: ``model_state_mb`` (the
bytes it holds for the student's parameters, gradients and AdamW state and the teacher's
weights: ``Run.model_state_bytes``), tokens/s (median of the per-step records after the
first two); and each worker's peak RSS (VmHWM, read from /proc by this launcher every 50 ms),
which also holds the runtime, the data, the activations and, while loading, the whole models
(under FSDP only the main process reads them; the others receive their shards). Communication per step and process is computed from the parameter counts (ring
all-reduce / all-gather / reduce-scatter volumes), not measured.

It ends with the projection of per-GPU memory for Llama-3-70B -> Llama-3-8B on 8 x 80 GB, from
the measured bytes per parameter of each part (their configs built on the meta device; no
download).

    python bench/fsdp.py            # the numbers in README / bench/README.md (idle machine)
    python bench/fsdp.py --quick    # smoke run: tiny pair, 3 steps
"""

from __future__ import annotations

# No torch here: the children are measured, and the launcher stays small.
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO_TEACHER = REPO / "src" / "potstill" / "assets" / "demo-teacher"

PAIRS = {
    "full": {"teacher": {"hidden_size": 1024, "num_hidden_layers": 10, "num_attention_heads": 16,
                         "num_key_value_heads": 4, "intermediate_size": 2816},
             "student": {"hidden_size": 512, "num_hidden_layers": 10, "num_attention_heads": 8,
                         "num_key_value_heads": 4, "intermediate_size": 1408}},
    "quick": {"teacher": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
                          "num_key_value_heads": 4, "intermediate_size": 704},
              "student": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "intermediate_size": 352}},
}
# Llama-3 shapes (their published config.json values) for the projection.
LLAMA3 = {"70B": {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                  "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False},
          "8B": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}}


def child_prepare(out: Path, pair: str) -> None:
    """Save the teacher (random, seeded) with the demo tokenizer; parameter counts -> out/prepare.json."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(DEMO_TEACHER)
    counts = {}
    for role, shape in PAIRS[pair].items():
        torch.manual_seed(1 if role == "teacher" else 2)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False,
                                             max_position_embeddings=512, **shape))
        layers = model.model.layers
        counts[role] = {"total": sum(p.numel() for p in model.parameters()),
                        "layer": sum(p.numel() for p in layers[0].parameters()),
                        "layers": len(layers)}
        if role == "teacher":
            model.save_pretrained(out / "teacher")
            tokenizer.save_pretrained(out / "teacher")
    counts["torch"] = torch.__version__
    (out / "prepare.json").write_text(json.dumps(counts, indent=2))


def child_project(out: Path, per_param: dict) -> None:
    """Per-GPU memory of Llama-3-70B -> 8B under DDP and FSDP over 8, from measured bytes per parameter."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {}
    for name, shape in LLAMA3.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape))
        layer = sum(p.numel() for p in model.model.layers[0].parameters())
        total = sum(p.numel() for p in model.parameters())
        sizes[name] = {"total": total, "layer": layer, "root": total - layer * shape["num_hidden_layers"]}
    gb = 1e9
    n = 8
    t, s = sizes["70B"], sizes["8B"]
    teacher_b, student_b = per_param["teacher"], per_param["student"]  # bytes / parameter at rest, DDP
    ddp = (t["total"] * teacher_b + s["total"] * student_b) / gb
    # FSDP: everything / n, plus what is gathered at once: each model's root group (FSDP2 keeps the
    # root gathered after forward) and two decoder layers in flight (this one and the prefetched next),
    # at the gathered dtype (teacher: its storage dtype; student: fp32 master weights).
    gathered_t = (t["root"] + 2 * t["layer"]) * teacher_b
    gathered_s = (s["root"] + 2 * s["layer"]) * 4
    fsdp = ((t["total"] * teacher_b + s["total"] * student_b) / n + gathered_t + gathered_s) / gb
    record = {"sizes": sizes, "bytes_per_param": per_param, "devices": n, "ddp_gb": ddp, "fsdp_gb": fsdp,
              "fsdp_gathered_gb": (gathered_t + gathered_s) / gb}
    (out / "projection.json").write_text(json.dumps(record, indent=2))


def run_child(cmd: list[str], log: Path, env: dict) -> tuple[float, list[float]]:
    """Run ``cmd``; (wall seconds, peak RSS in MB of each of its child processes, i.e. torchrun's
    workers, sampled from /proc every 50 ms until they exit)."""
    started = time.perf_counter()
    peaks: dict[int, float] = {}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while proc.poll() is None:
            for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                      text=True).stdout.split():
                peak = vm_hwm_mb(int(pid))
                if peak is not None:
                    peaks[int(pid)] = max(peaks.get(int(pid), 0.0), peak)
            time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - started, [peaks[pid] for pid in sorted(peaks)]


def vm_hwm_mb(pid: int) -> float | None:
    """A process's peak resident memory (VmHWM), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def helper(mode: str, out: Path, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    run_child([sys.executable, __file__, "--child", mode, "--out", str(out), *args], out / f"{mode}.log", env)


def train_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def communication_mb(counts: dict, strategy: str, reshard: bool, teacher_bytes: float, gather_bytes: float) -> float:
    """Bytes each of 2 processes sends per optimizer step (one micro-batch), in MB: ring collectives
    over 2 processes send half the buffer (all-gather, reduce-scatter) or all of it (all-reduce).
    ``gather_bytes``: bytes per student parameter gathered (4: fp32; 2: the bf16 policy)."""
    share = 0.5
    grads = counts["student"]["total"] * 4  # fp32 gradients
    if strategy == "ddp":
        return 2 * share * grads / 1e6
    layers = counts["student"]["layer"] * counts["student"]["layers"] * gather_bytes
    gathers = counts["student"]["total"] * gather_bytes + (layers if reshard else 0)  # forward; layers again in backward
    teacher = counts["teacher"]["total"] * teacher_bytes
    return share * (gathers + grads + teacher) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None)
    parser.add_argument("--per-param", default=None)
    args = parser.parse_args()
    if args.child == "prepare":
        child_prepare(args.out, "quick" if args.quick else "full")
        return 0
    if args.child == "project":
        child_project(args.out, json.loads(args.per_param))
        return 0

    pair = "quick" if args.quick else "full"
    steps = args.steps or (3 if args.quick else 12)
    out = args.out or Path(tempfile.mkdtemp(prefix="potstill-bench-fsdp-"))
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print(f"working in {out}; loadavg {load_before[0]:.2f}", flush=True)
    helper("prepare", out, *(["--quick"] if args.quick else []))
    counts = json.loads((out / "prepare.json").read_text())
    base = {
        "teacher": {"name_or_path": str(out / "teacher")},
        "student": {"config": {**PAIRS[pair]["student"], "max_position_embeddings": 512,
                               "tie_word_embeddings": False}},
        "data": {"source": "python-docs", "split": "train", "max_length": 256, "validation_fraction": 0.0,
                 "validation_split": None},
        "loss": {"ce": {"weight": 0.1}},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-3, "log_every": 1, "checkpoint_every": None},
        "output": {"tensorboard": False},
    }
    runs = {"ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"},
            "fsdp_autocast": {"strategy": "fsdp", "fsdp": {"mixed_precision": False}},
            "fsdp_noreshard": {"strategy": "fsdp", "fsdp": {"reshard_after_forward": False}}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    results = {}
    for name, train in runs.items():
        cfg = json.loads(json.dumps(base))
        cfg["train"].update(train)
        cfg["output"]["dir"] = str(out / name)
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        wall, process_peaks = run_child(["torchrun", "--nproc_per_node", "2", "-m", "potstill", "distill", str(path),
                                         "--no-progress"], out / f"{name}.log", env)
        records = train_records(out / name)
        warm = records[2:] or records
        results[name] = {
            "model_state_mb": records[-1]["model_state_mb"],
            "peak_mem_mb": max(r["peak_mem_mb"] for r in records),
            "process_peak_rss_mb": process_peaks,  # the two workers (first: usually rank 0)
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in warm),
            "step_time_s": statistics.median(r["step_time_s"] for r in warm),
            "wall_s": wall,
        }
        print(f"{name}: {results[name]}", flush=True)
    teacher_bytes = 2.0 if "bf16" in (out / "ddp.log").read_text() else 4.0
    for name, train in runs.items():
        options = train.get("fsdp", {})
        policy = teacher_bytes == 2.0 and options.get("mixed_precision", "auto") == "auto"
        results[name]["communication_mb_per_step"] = communication_mb(
            counts, train["strategy"], options.get("reshard_after_forward", True), teacher_bytes, 2.0 if policy else 4.0)
    ddp, fsdp = results["ddp"], results["fsdp"]
    ratios = {"model_state": fsdp["model_state_mb"] / ddp["model_state_mb"],
              "peak_rss_max": max(fsdp["process_peak_rss_mb"]) / max(ddp["process_peak_rss_mb"]),
              "peak_rss_min": min(fsdp["process_peak_rss_mb"]) / min(ddp["process_peak_rss_mb"]),
              "tokens_per_s": fsdp["tokens_per_s"] / ddp["tokens_per_s"]}
    # Bytes per parameter at rest under DDP, from this run: the student's (weights, gradients, AdamW)
    # and the teacher's (its storage dtype).
    teacher_mb = counts["teacher"]["total"] * teacher_bytes / 2**20
    student_per_param = (ddp["model_state_mb"] - teacher_mb) * 2**20 / counts["student"]["total"]
    per_param = {"teacher": teacher_bytes, "student": round(student_per_param, 2)}
    helper("project", out, "--per-param", json.dumps(per_param))
    projection = json.loads((out / "projection.json").read_text())
    record = {
        "command": "python bench/fsdp.py" + (" --quick" if args.quick else ""),
        "pair": {k: counts[k] for k in ("teacher", "student")}, "steps": steps, "processes": 2,
        "precision": "bf16" if teacher_bytes == 2 else "fp32",
        "results": results, "ratios": ratios,
        "targets": {"model_state <= 0.6": ratios["model_state"] <= 0.6,
                    "tokens_per_s >= 0.7": ratios["tokens_per_s"] >= 0.7},
        "projection_llama3_70b_to_8b": projection,
        "machine": {"cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "python": platform.python_version(), "torch": counts.get("torch")},
    }
    print()
    print("| run | model state MB / process | peak RSS MB of each process | tokens/s | s / step | "
          "comm. MB / step / process |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        peaks = " / ".join(f"{p:.0f}" for p in r["process_peak_rss_mb"])
        print(f"| {name} | {r['model_state_mb']:.0f} | {peaks} | {r['tokens_per_s']:.0f} | "
              f"{r['step_time_s']:.2f} | {r['communication_mb_per_step']:.0f} |")
    print(f"\nFSDP / DDP: model state {ratios['model_state']:.2f}x (target <= 0.6), peak RSS of the main process "
          f"{ratios['peak_rss_max']:.2f}x and of the other {ratios['peak_rss_min']:.2f}x, "
          f"tokens/s {ratios['tokens_per_s']:.2f}x (target >= 0.7)")
    print(f"Llama-3-70B -> 8B on 8 GPUs: DDP {projection['ddp_gb']:.0f} GB per GPU, FSDP {projection['fsdp_gb']:.0f} GB "
          f"(of which {projection['fsdp_gathered_gb']:.1f} GB gathered at once), before activations")
    if not args.quick:
        results_dir = HERE / "results"
        results_dir.mkdir(exist_ok=True)
        (results_dir / "fsdp.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {results_dir / 'fsdp.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
