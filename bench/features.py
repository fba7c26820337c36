"""Benchmark: does feature distillation help? The quickstart's teacher and student, three objectives.

Runs, all from the same student initialization, on the same data, for the same steps
(the quickstart's run: 16 x 256 tokens a step, lr 3e-3, cosine schedule, bf16 where fast):

* ``logits``              forward KL on the logits (the quickstart's objective)
* ``logits + hidden``     plus hidden-state KD: cosine loss, ``uniform_last`` mapping
                          (6 teacher layers -> 4 student layers: 6 pairs), linear projectors 128 -> 384
* ``logits + attention``  plus MiniLMv2 attention relations (q-q, k-k, v-v KL) of the last layer
                          of each, 4 relation heads

then prints test-split perplexity, cross-entropy, KL to the teacher, top-1 agreement and
training throughput for each, and writes ``bench/results/features.json``.

    python bench/features.py                       # 240 steps per run (about 3 x 4 min on an idle 2-core CPU)
    python bench/features.py --steps 10            # smoke test
    python bench/features.py --hidden-weight 0.5 --attention-weight 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from potstill.config import apply_overrides  # noqa: E402
from potstill.training.metrics import read_metrics  # noqa: E402
from potstill.commands.quickstart import DEFAULT_STEPS, demo_teacher_path, make_student_init, run_config, test_scores  # noqa: E402
from potstill.commands.report import results_table  # noqa: E402
from potstill.commands.distill import distill  # noqa: E402


def variants(hidden_weight: float, attention_weight: float) -> dict[str, list[str]]:
    """Name -> config overrides on top of the quickstart's KD run."""
    return {
        "logits": [],
        "logits + hidden": [f"loss.hidden.weight={hidden_weight}", "loss.hidden.mapping=uniform_last",
                            "loss.hidden.loss=cosine"],
        "logits + attention": [f"loss.attention.weight={attention_weight}", "loss.attention.mapping=last"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--out", default="runs/bench-features", help="run directories (re-running continues them)")
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--attention-weight", type=float, default=1.0)
    ap.add_argument("--only", default=None, help="comma-separated variant names to run")
    ap.add_argument("--json", default=str(HERE / "results" / "features.json"))
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init = make_student_init(out)
    teacher = demo_teacher_path()
    chosen = variants(args.hidden_weight, args.attention_weight)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    runs, train = {}, {}
    for name, overrides in chosen.items():
        run_dir = out / name.replace(" + ", "-")
        cfg = apply_overrides(run_config(run_dir, args.steps, init), overrides)
        start = time.perf_counter()
        distill(cfg, progress=False)
        wall = time.perf_counter() - start
        records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r]
        train[name] = {"wall_s": wall, "tokens_per_s": sum(r["tokens_per_s"] for r in records) / max(1, len(records)),
                       "overrides": overrides}
        runs[name] = run_dir / "student"
        print(f"{name}: {wall:.0f} s, {train[name]['tokens_per_s']:.0f} tokens/s", flush=True)
    rows = test_scores(runs, teacher, progress=False)
    for name, row in rows.items():
        row.update(train[name])

    print()
    print(f"test split of python-docs, {args.steps} steps of 16 x 256 tokens, same student init:")
    print(results_table(rows))
    print()
    print("| objective | test ppl | test CE | KL(teacher‖student) | top-1 agree | train tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ppl']:.2f} | {r['ce']:.4f} | {r['kl']:.4f} | {r['agreement']:.3f} | "
              f"{r['tokens_per_s']:,.0f} |")
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "steps": args.steps,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
            "time_unix": int(time.time())}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    os.replace(tmp, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
