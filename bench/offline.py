"""Benchmark: offline distillation from a teacher cache vs online KD and cross-entropy alone.

The quickstart's teacher (16.9M-parameter Llama) and student (2.95M, same random init for
every run), the quickstart's run settings (batch 16 x 256 tokens, lr 3e-3, cosine), the same
number of steps for every run:

* ``online KD``: the teacher runs in every step (forward KL, full logits: the quickstart's KD run);
* ``CE only``: no teacher, hard labels;
* ``top-k k=K (rest|renormalize)``: ``potstill cache-teacher`` with ``cache.kind=topk``, then
  ``potstill distill teacher.cache=...`` with ``loss.logits.missing_mass`` rest or renormalize;
* ``sampled n=N``: ``cache.kind=sampled`` (Sparse Logit Sampling, ACL 2025), unbiased forward KL.

To keep the teacher passes short the train split is thinned to every m-th row, enough for
about one epoch of the run (written to ``<out>/train-subset.jsonl``; the validation split is
the corpus's own); every run uses that same data. Columns: bytes per
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
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ALL_RUNS = ("online", "ce", "topk12", "sampled12", "sampled32", "topk64", "topk12_renorm", "topk64_renorm")
TRAIN_BLOCKS = 20044  # blocks of 256 tokens in the whole python-docs train split


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


def base_config(out: Path, run: Path, steps: int, init: Path, subset: Path, *, ce_only: bool = False) -> dict:
    from potstill.data.corpus import python_docs_split_path
    from potstill.commands.quickstart import run_config

    cfg = run_config(run, steps, init, ce_only=ce_only).model_dump()
    cfg["data"].update(source=str(subset), validation_split=None,
                       validation_source=str(python_docs_split_path("validation")))
    cfg["train"].update(checkpoint_every=steps, log_every=max(1, steps // 24))
    cfg["eval"] = {"every": None, "max_batches": 8}
    return cfg


def thin_train_split(out: Path, blocks: int) -> tuple[Path, int]:
    """Every m-th row of the python-docs train split, m chosen for about ``blocks`` blocks of 256."""
    from potstill.data.corpus import python_docs_split_path

    lines = python_docs_split_path("train").read_text(encoding="utf-8").splitlines()
    stride = max(1, int(TRAIN_BLOCKS / (blocks * 1.1)))
    path = out / "train-subset.jsonl"
    text = "".join(line + "\n" for line in lines[::stride])
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path, stride


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
    parser.add_argument("--timing-steps", type=int, default=0,
                        help="then time each run again for this many steps, back to back (tokens/s column)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the timing pass, over the finished runs recorded in --json")
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if r not in ALL_RUNS]
    if bad:
        parser.error(f"unknown runs {bad}")

    from potstill.teachers.capture import cache_teacher
    from potstill.config import validate_config
    from potstill.commands.quickstart import demo_teacher_path, make_student_init, test_scores
    from potstill.commands.distill import distill

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init = make_student_init(out)
    teacher = demo_teacher_path()
    # About one epoch of the run, spread over the whole train split.
    subset, stride = thin_train_split(out, args.steps * 16)
    results: dict[str, dict] = {}
    captures: dict[str, dict] = {}
    if args.timing_only:
        results = json.loads(Path(args.json).read_text())["results"]
        runs = [r for r in runs if r in results]
    for name in (runs if not args.timing_only else []):
        run = out / name
        spec = cache_spec(name)
        cfg = base_config(out, run, args.steps, init, subset, ce_only=name == "ce")
        row: dict = {"label": label(name)}
        if spec is not None:
            cache_dir = out / f"cache-{spec['kind']}{spec['k']}"
            cfg["cache"].update(dir=str(cache_dir), kind=spec["kind"], k=spec["k"], value_bits=8)
            if str(cache_dir) not in captures:  # top-k rest and renormalize share one capture
                manifest = cache_teacher(validate_config(cfg), progress=False)
                captures[str(cache_dir)] = {  # teacher passes over the shards (model and data loading not counted)
                    "capture_s": manifest["capture_seconds"], "bytes_per_token": manifest["bytes_per_token"],
                    "payload_bytes_per_token": manifest["payload_bytes_per_token"], "cache_bytes": manifest["bytes"],
                    "cached_tokens": manifest["n_rows"]}
            row.update(captures[str(cache_dir)])
            cfg["teacher"]["cache"] = str(cache_dir)
            cfg["loss"]["logits"]["missing_mass"] = spec["mode"]
        print(f"== {name}: {row['label']}", flush=True)
        t0 = time.perf_counter()
        if not (run / "summary.json").is_file():  # a finished run (from an earlier call) is only scored again
            distill(validate_config(cfg), progress=False)
            row["train_wall_s"] = time.perf_counter() - t0
        row["tokens_per_s"] = median_tokens_per_s(run)
        score = test_scores({name: run / "student"}, teacher, progress=False)[name]
        row.update(test_ppl=score["ppl"], test_kl=score.get("kl"), test_agreement=score.get("agreement"),
                   params=score["params"])
        results[name] = row
        print(f"   {json.dumps(row)}", flush=True)
        write_record(args, runs, results, stride)
    if args.timing_steps:
        # Training speed again, every run for the same few steps back to back (online KD first and
        # last), so that load from other jobs on the machine hits all of them alike.
        for name in runs:  # a new timing pass replaces an earlier one's figures
            results[name]["tokens_per_s_timing"] = []
        for name in runs + (["online"] if "online" in runs else []):
            spec = cache_spec(name)
            run = out / f"timing-{args.timing_steps}" / name
            shutil.rmtree(run, ignore_errors=True)
            cfg = base_config(out, run, args.timing_steps, init, subset, ce_only=name == "ce")
            cfg["train"]["log_every"] = 2
            if spec is not None:
                cfg["teacher"]["cache"] = str(out / f"cache-{spec['kind']}{spec['k']}")
                cfg["loss"]["logits"]["missing_mass"] = spec["mode"]
            distill(validate_config(cfg), progress=False)
            results[name].setdefault("tokens_per_s_timing", []).append(median_tokens_per_s(run))
            print(f"   timing {name}: {results[name]['tokens_per_s_timing'][-1]:.0f} tokens/s", flush=True)
        for name in runs:
            results[name]["tokens_per_s_full_run"] = results[name].get("tokens_per_s_full_run",
                                                                       results[name]["tokens_per_s"])
            results[name]["tokens_per_s"] = statistics.median(results[name]["tokens_per_s_timing"])
    write_record(args, runs, results, stride, final=True)
    return 0


def write_record(args, runs, results, stride, final: bool = False) -> None:
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
    record = {"command": " ".join(["python"] + sys.argv), "steps": args.steps, "train_row_stride": stride,
              "teacher_params": 16_913_280, "student_params": results[runs[0]]["params"], "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
              "results": results, "table": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    if final:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    raise SystemExit(main())
