"""A/B: the same benchmark on two versions of potstill, interleaved in one run.

A refactor must not cost speed or memory. This runs ``bench/step.py`` (a whole distillation
step through ``potstill.distill``) and ``bench/loss.py`` (the loss alone) from the working tree
(B) and from a git revision (A, checked out into a temporary worktree, removed afterwards),
alternating A and B every round so that drift in the machine's load hits both alike, and
prints B / A ratios of the medians over rounds. Each script runs its own tree's code (its
children put their tree's ``src`` first on ``sys.path``).

    python bench/ab.py --base main~1                 # step and loss, 3 rounds each
    python bench/ab.py --base v0.1.0 --only step --rounds 5

Results go to ``bench/results/ab.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Each benchmark: its arguments for one round, and how to read (key -> value) pairs from its JSON.
STEP_ARGS = ["--variants", "potstill,potstill_plain", "--rounds", "1"]
LOSS_ARGS = ["--variants", "potstill", "--repeats", "3"]


def step_figures(result: dict) -> dict[str, float]:
    out = {}
    for variant, row in result["summary"].items():
        if "error" in row:
            raise RuntimeError(f"step.py {variant}: {row['error']}")
        out[f"step {variant} tokens/s"] = row["tokens_per_s"]
        out[f"step {variant} peak MB"] = row["peak_mb"]
    return out


def loss_figures(result: dict) -> dict[str, float]:
    out = {}
    for row in result["rows"]:
        if "error" in row:
            raise RuntimeError(f"loss.py {row['variant']}: {row['error']}")
        shape = f"{row['n']}x{row['hidden']}x{row['vocab']} {row['dtype']}"
        out[f"loss {shape} ms"] = row["ms"]
        out[f"loss {shape} peak MB"] = row["peak_mb"]
    return out


BENCHES = {"step": ("step.py", STEP_ARGS, step_figures), "loss": ("loss.py", LOSS_ARGS, loss_figures)}


def run_once(tree: Path, bench: str, out: Path) -> dict[str, float]:
    script, args, read = BENCHES[bench]
    cmd = [sys.executable, str(tree / "bench" / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
    return read(json.loads(out.read_text()))


def worktree(rev: str, where: Path) -> Path:
    path = where / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True, text=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare against (A); B is the working tree")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only this benchmark (repeatable)")
    p.add_argument("--out", default=str(HERE / "results" / "ab.json"))
    args = p.parse_args(argv)
    benches = args.only or list(BENCHES)
    figures: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    with tempfile.TemporaryDirectory(prefix="potstill-ab-") as tmp:
        tmp = Path(tmp)
        base = worktree(args.base, tmp)
        try:
            for r in range(args.rounds):
                for bench in benches:
                    # Alternate which version goes first, so neither always runs on a warmer machine.
                    order = [("A", base), ("B", ROOT)] if r % 2 == 0 else [("B", ROOT), ("A", base)]
                    for label, tree in order:
                        t0 = time.perf_counter()
                        got = run_once(tree, bench, tmp / f"{label}-{bench}.json")
                        for k, v in got.items():
                            figures[label].setdefault(k, []).append(v)
                        print(f"round {r + 1}/{args.rounds} {bench} {label}: {time.perf_counter() - t0:.0f} s",
                              flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    rows = []
    print(f"\n{'figure':<52} {'A (' + args.base + ')':>16} {'B (tree)':>12} {'B / A':>8}")
    for key in figures["B"]:
        a, b = statistics.median(figures["A"][key]), statistics.median(figures["B"][key])
        rows.append({"figure": key, "A": a, "B": b, "ratio": b / a, "A_all": figures["A"][key],
                     "B_all": figures["B"][key]})
        print(f"{key:<52} {a:>16.1f} {b:>12.1f} {b / a:>8.3f}")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.base], capture_output=True, text=True)
    Path(args.out).write_text(json.dumps({"command": "python bench/ab.py " + " ".join(argv or sys.argv[1:]),
                                          "base": args.base, "base_commit": commit.stdout.strip(),
                                          "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
