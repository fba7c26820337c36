"""Benchmark: offline distillation from a teacher cache vs online KD and cross-entropy alone.

The quickstart's teacher (16.9M-parameter Llama) and student (2.95M, same random init for
every run), the quickstart's run settings (batch 16 x 256 tokens, lr 3e-3, cosine), the same
number of steps for every run:

* ``online KD``: the teacher runs in every step (forward KL, full logits: the quickstart's KD run);
* ``CE only``: no teacher, hard labels;
* ``top-k k=K (rest|renormalize)``: ``potstill cache-teacher`` with ``cache.kind=topk``, then
  ``potstill distill teacher.cache=...`` with ``loss.logits.missing_mass`` rest or renormalize;
* ``sampled n=N``: ``cache.kind=sampled`` (Sparse Logit Sampling, ACL 2025), unbiased forward KL.

To keep the teacher passes short the train split is cut to its first rows, enough for one
epoch of the run (``data.max_examples``); every run uses that same data. Columns: bytes per
cached token (file bytes / cached tokens), test-split perplexity and KL(teacher || student)
of the trained student (the quickstart's ``test_scores``), training tokens/s (median over the
run's logged windows; no evaluation or checkpoint inside the timed steps), and the cache's
capture time.

    python bench/offline.py                       # 240 steps, writes bench/results/offline.json
    python bench/offline.py --steps 20 --out /tmp/offline-smoke --runs online,topk12,sampled12
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ALL_RUNS = ("online", "ce", "topk12", "sampled12", "sampled32", "topk64", "topk12_renorm", "topk64_renorm")


def cache_spec(name: str) -> dict | None:
    """run name -> cache settings and missing-mass mode, or None for runs without a cache."""
    if name.startswith("topk"):
        k = int(name[4:].split("_")[0])
        return {"kind": "topk", "k": k, "mode": "renormalize" if name.endswith("_renorm") else "rest"}
    if name.startswith("sampled"):
        return {"kind": "sampled", "k": int(name[7:]), "mode": "rest"}
    return None


def label(name: str) -> str:
    spec = cache_spec(name)
    if spec is None:
        return {"online": "online KD (teacher every step)", "ce": "CE only (no teacher)"}[name]
    if spec["kind"] == "topk":
        return f"top-k k={spec['k']} ({spec['mode']})"
    return f"sampled n={spec['k']}"


def base_config(out: Path, run: Path, steps: int, init: Path, max_examples: int, *, ce_only: bool = False) -> dict:
    from potstill.quickstart import run_config

    cfg = run_config(run, steps, init, ce_only=ce_only).model_dump()
    cfg["data"]["max_examples"] = max_examples
    cfg["train"].update(checkpoint_every=steps, log_every=max(1, steps // 24))
    cfg["eval"] = {"every": None, "max_batches": 8}
    return cfg


def rows_for_blocks(cfg: dict, blocks: int) -> int:
    """The fewest first rows of the train split that give at least ``blocks`` training blocks."""
    from transformers import AutoTokenizer

    from potstill.config import DataConfig
    from potstill.data import build_datasets

    tok = AutoTokenizer.from_pretrained(cfg["teacher"]["name_or_path"])
    n = max(16, blocks)
    for _ in range(6):
        data = DataConfig.model_validate({**cfg["data"], "max_examples": n, "validation_split": None,
                                          "validation_fraction": 0.0})
        got = len(build_datasets(data, tok, progress=False)[0])
        if got >= blocks:
            return n
        n = int(n * blocks / max(got, 1) * 1.05) + 1
    return n


def median_tokens_per_s(run: Path) -> float:
    rates = [r["tokens_per_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_s" in r]
    return statistics.median(rates[1:] if len(rates) > 2 else rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--out", default="runs/bench-offline")
    parser.add_argument("--runs", default=",".join(ALL_RUNS), help=f"comma list of {', '.join(ALL_RUNS)}")
    parser.add_argument("--json", default="bench/results/offline.json")
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if r not in ALL_RUNS]
    if bad:
        parser.error(f"unknown runs {bad}")

    from potstill.capture import cache_teacher
    from potstill.config import validate_config
    from potstill.quickstart import demo_teacher_path, make_student_init, test_scores
    from potstill.train import distill

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init = make_student_init(out)
    teacher = demo_teacher_path()
    # One epoch of the run: the fewest first rows of the train split that fill steps x 16 blocks.
    max_examples = rows_for_blocks(base_config(out, out / "x", args.steps, init, None), args.steps * 16)
    results: dict[str, dict] = {}
    captures: dict[str, dict] = {}
    for name in runs:
        run = out / name
        spec = cache_spec(name)
        cfg = base_config(out, run, args.steps, init, max_examples, ce_only=name == "ce")
        row: dict = {"label": label(name)}
        if spec is not None:
            cache_dir = out / f"cache-{spec['kind']}{spec['k']}"
            cfg["cache"].update(dir=str(cache_dir), kind=spec["kind"], k=spec["k"], value_bits=8)
            if str(cache_dir) not in captures:  # top-k rest and renormalize share one capture
                t0 = time.perf_counter()
                manifest = cache_teacher(validate_config(cfg), progress=False)
                captures[str(cache_dir)] = {
                    "capture_s": time.perf_counter() - t0, "bytes_per_token": manifest["bytes_per_token"],
                    "payload_bytes_per_token": manifest["payload_bytes_per_token"], "cache_bytes": manifest["bytes"],
                    "cached_tokens": manifest["n_rows"]}
            row.update(captures[str(cache_dir)])
            cfg["teacher"]["cache"] = str(cache_dir)
            cfg["loss"]["logits"]["missing_mass"] = spec["mode"]
        print(f"== {name}: {row['label']}", flush=True)
        t0 = time.perf_counter()
        distill(validate_config(cfg), progress=False)
        row.update(train_wall_s=time.perf_counter() - t0, tokens_per_s=median_tokens_per_s(run))
        score = test_scores({name: run / "student"}, teacher, progress=False)[name]
        row.update(test_ppl=score["ppl"], test_kl=score.get("kl"), test_agreement=score.get("agreement"),
                   params=score["params"])
        results[name] = row
        print(f"   {json.dumps(row)}", flush=True)
        write_record(args, runs, results, max_examples)
    write_record(args, runs, results, max_examples, final=True)
    return 0


def write_record(args, runs, results, max_examples, final: bool = False) -> None:
    """The table of the runs done so far, printed (at the end) and written to the JSON file."""
    runs = [r for r in runs if r in results]

    ref = results.get("online")
    head = ["run", "bytes/token", "test ppl", "vs online", "test KL", "tokens/s", "vs online", "capture s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in runs:
        r = results[name]
        ppl_rel = f"{(r['test_ppl'] / ref['test_ppl'] - 1) * 100:+.1f}%" if ref else "-"
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        lines.append(f"| {r['label']} | {r.get('bytes_per_token', float('nan')):.1f} | {r['test_ppl']:.2f} | {ppl_rel} | "
                     f"{r['test_kl'] if r['test_kl'] is not None else float('nan'):.4f} | {r['tokens_per_s']:.0f} | "
                     f"{speed} | {r.get('capture_s', float('nan')):.0f} |")
    table = "\n".join(lines).replace("| nan |", "| - |")
    if final:
        print(table)
    record = {"command": " ".join(["python"] + sys.argv), "steps": args.steps, "max_examples": max_examples,
              "teacher_params": 16_913_280, "student_params": results[runs[0]]["params"], "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
              "results": results, "table": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    if final:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    raise SystemExit(main())
