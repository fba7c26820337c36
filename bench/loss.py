"""Benchmark: forward+backward of the logit-distillation loss alone (no model).

Variants, each run in its own process so that peak memory is clean:

* ``naive``: full student and teacher logits, log_softmax, ``F.kl_div(..., log_target=True)``,
  mask, sum: the forward KL as TRL's ``GKDTrainer.generalized_jsd_loss`` (beta=0) and
  DistillKit compute it, in the logits' dtype.
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` with beta=0 (forward KL), no hard
  loss, its defaults otherwise (chunk_size=1024, compiled=True: torch.compile of its PyTorch
  chunk step, which on CPU generates C++). ``liger_eager``: the same with compiled=False.
* ``potstill``: ``potstill.losses.chunked_distill_loss`` with ``divergence="fkl"`` and the
  library's default memory budget.

Peak memory: the child's peak RSS over the timed passes (VmHWM from /proc/self/status: ru_maxrss
would start at the parent's peak after fork+exec;
the peak is reset after the warmup through /proc/self/clear_refs, so Liger's one-off
torch.compile peak does not count) minus its RSS after allocating the inputs; on CUDA,
``torch.cuda.max_memory_allocated`` over the same span. Time: the median of ``--repeats``
forward+backward passes after one warmup. Inputs: random hidden states and heads (logits of
std ~2), every target valid, KD term only (forward KL, temperature 1).

    python bench/loss.py                 # full table, writes bench/results/loss.json
    python bench/loss.py --quick         # small shapes, smoke test
    python bench/loss.py --measure-factor  # per-divergence temporaries per chunk row
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
VARIANTS = ("naive", "liger", "liger_eager", "potstill")
FULL_SHAPES = [(4096, 1024, 32000), (2048, 1024, 128256)]   # (B*T, H, V)
QUICK_SHAPES = [(512, 256, 8000)]
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------ the variants
def naive_loss(student_hidden, student_head, teacher_hidden, teacher_head, targets, temperature=1.0):
    """Full-logit forward KL, TRL GKD (beta=0) / DistillKit style."""
    student_logits = student_hidden @ student_head.T
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_head.T
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    mask = targets != -100
    return kl[mask].sum()


def make_variant(name: str, device: str):
    if name == "naive":
        return naive_loss
    if name in ("liger", "liger_eager"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                           compiled=name == "liger")

        def liger(sh, sw, th, tw, targets):
            return loss_mod(sh, sw, th, tw, targets)
        return liger
    if name == "potstill":
        sys.path.insert(0, str(HERE.parent / "src"))
        from potstill.losses import chunked_distill_loss

        def potstill(sh, sw, th, tw, targets):
            return chunked_distill_loss(sh, sw, targets, teacher_hidden=th, teacher_head=tw,
                                        divergence="fkl").weighted_sum
        return potstill
    raise ValueError(f"unknown variant {name!r}")


# ------------------------------------------------------------------ child process
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """VmHWM: unlike ru_maxrss, it does not start at the parent's peak after fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM)
        return True
    except OSError:
        return False


def run_child(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = DTYPES[args.dtype]
    n, h, v = args.n, args.hidden, args.vocab
    fn = make_variant(args.variant, device)
    g = torch.Generator().manual_seed(0)
    scale = 2.0 / h ** 0.5  # logits of std ~2
    student_hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    teacher_hidden = torch.randn(n, h, generator=g).to(device, dtype)
    student_head = (torch.randn(v, h, generator=g) * scale).to(device, dtype).requires_grad_()
    teacher_head = (torch.randn(v, h, generator=g) * scale).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    inputs = (student_hidden, student_head, teacher_hidden, teacher_head, targets)

    def step():
        student_hidden.grad = None
        student_head.grad = None
        loss = fn(*inputs)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    step()  # warmup (and Liger's torch.compile): its transient peak is not counted
    warmup_ms = 1000 * (time.perf_counter() - t0)
    student_hidden.grad = student_head.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_ok = _reset_peak_rss()
    # A pass during which this process was stopped and continued (SIGSTOP/SIGCONT, e.g. by
    # someone pausing jobs on a shared machine) is timed again.
    resumed = [0]
    if hasattr(signal, "SIGCONT"):
        signal.signal(signal.SIGCONT, lambda *_: resumed.__setitem__(0, resumed[0] + 1))
    times, discarded = [], 0
    loss = None
    while len(times) < args.repeats and discarded < 3 * args.repeats:
        seen = resumed[0]
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        if resumed[0] == seen:
            times.append(dt)
        else:
            discarded += 1
    if not times:
        raise SystemExit(f"every timed pass was interrupted by a pause ({discarded})")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    out = {
        "variant": args.variant, "n": n, "hidden": h, "vocab": v, "dtype": args.dtype,
        "device": device, "peak_mb": peak / 2**20, "ms": 1000 * statistics.median(times),
        "ms_all": [1000 * t for t in times], "loss": float(loss.detach().float()),
        "threads": torch.get_num_threads(),
    }
    out["warmup_ms"] = warmup_ms
    out["passes_discarded_after_pause"] = discarded
    if device != "cuda":
        out["peak_reset_after_warmup"] = reset_ok  # False: the warmup's peak is included
        out["rss_base_mb"] = base / 2**20
    return out


# ------------------------------------------------------------------ parent process
def run_variant(variant, n, h, v, dtype, device, repeats, timeout, threads=0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--n", str(n),
           "--hidden", str(h), "--vocab", str(v), "--dtype", dtype, "--device", device,
           "--repeats", str(repeats), "--threads", str(threads)]
    row = {"variant": variant, "n": n, "hidden": h, "vocab": v, "dtype": dtype, "device": device}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**row, "error": f"exit {proc.returncode}: {err}"}
    return json.loads(lines[-1][len("RESULT "):])


def _ratio(a, b):
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def print_table(rows):
    by_key = {(r["variant"], r["n"], r["vocab"], r["dtype"]): r for r in rows}
    header = (f"{'variant':<12} {'shape (N,H,V)':<20} {'dtype':<8} {'peak MB':>9} {'ms':>9} "
              f"{'mem/naive':>9} {'mem/liger':>9} {'t/naive':>8} {'t/liger':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = f"{r['n']},{r['hidden']},{r['vocab']}"
        if "error" in r:
            print(f"{r['variant']:<12} {shape:<20} {r['dtype']:<8} FAILED: {r['error']}")
            continue
        nv = by_key.get(("naive", r["n"], r["vocab"], r["dtype"]), {})
        lg = by_key.get(("liger", r["n"], r["vocab"], r["dtype"]), {})
        print(f"{r['variant']:<12} {shape:<20} {r['dtype']:<8} {r['peak_mb']:>9.0f} {r['ms']:>9.0f} "
              f"{_ratio(r['peak_mb'], nv.get('peak_mb')):>9} {_ratio(r['peak_mb'], lg.get('peak_mb')):>9} "
              f"{_ratio(r['ms'], nv.get('ms')):>8} {_ratio(r['ms'], lg.get('ms')):>8}")


def measure_factor(vocab=32000, hidden=256, n=512, chunks=(128, 512)):
    """The library's ROW_FACTOR: peak live bytes per chunk row of the potstill path, over the
    bytes of that row's raw student + teacher logits. Measured as the slope of the peak
    between two chunk sizes (so the per-call buffers cancel), with the torch profiler's
    allocation records, on one thread, CE on."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from potstill.losses import chunked_distill_loss
    from potstill.losses.chunked import ROW_FACTOR

    torch.set_num_threads(1)
    print(f"{'divergence':<10} {'dtype':<9} factor  (V={vocab}, chunks {chunks[0]} -> {chunks[1]} rows; "
          f"library ROW_FACTOR={ROW_FACTOR})")
    for name in ("fkl", "jsd", "skew_rkl", "mse"):
        for dtype in DTYPES.values():
            g = torch.Generator().manual_seed(0)
            sh = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
            sw = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype).requires_grad_()
            th = torch.randn(n, hidden, generator=g).to(dtype)
            tw = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype)
            tg = torch.randint(0, vocab, (n,), generator=g)
            peaks = []
            for chunk in chunks:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                            profile_memory=True) as prof:
                    out = chunked_distill_loss(sh, sw, tg, teacher_hidden=th, teacher_head=tw, divergence=name,
                                               ce_weight=1.0, chunk_size=chunk)
                    del out
                events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                                if e.name() == "[memory]")
                live = peak = 0
                for _, nbytes in events:
                    live += nbytes
                    peak = max(peak, live)
                peaks.append(peak)
            row_bytes = 2 * vocab * sh.element_size()
            factor = (peaks[1] - peaks[0]) / ((chunks[1] - chunks[0]) * row_bytes)
            print(f"{name:<10} {str(dtype).replace('torch.', ''):<9} {factor:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per variant, interleaved; the table shows their medians "
                        "(for a machine shared with other jobs)")
    p.add_argument("--shapes", default=None, help="e.g. 2048x1024x128256 (default: the two issue shapes)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per variant process")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/loss.json, "
                                               "loss_quick.json with --quick)")
    p.add_argument("--measure-factor", action="store_true")
    # child mode
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.measure_factor:
        measure_factor()
        return
    if args.variant:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    rows = []
    for n, h, v in shapes:
        for dtype in args.dtypes.split(","):
            runs = {variant: [] for variant in args.variants.split(",")}
            for _ in range(args.rounds):  # rounds interleave the variants: A B C A B C
                for variant in runs:
                    row = run_variant(variant, n, h, v, dtype, args.device, args.repeats, args.timeout,
                                      args.threads)
                    runs[variant].append(row)
                    msg = row.get("error") or f"{row['peak_mb']:.0f} MB, {row['ms']:.0f} ms"
                    print(f"  {variant} N={n} H={h} V={v} {dtype}: {msg}", file=sys.stderr, flush=True)
            for variant, results in runs.items():
                ok = [r for r in results if "error" not in r]
                if not ok:
                    rows.append(results[-1])
                    continue
                row = dict(ok[0])
                row["peak_mb"] = statistics.median(r["peak_mb"] for r in ok)
                row["ms"] = statistics.median(r["ms"] for r in ok)
                row["rounds"] = [{"peak_mb": r["peak_mb"], "ms": r["ms"]} for r in ok]
                rows.append(row)
    print()
    print_table(rows)
    out = Path(args.out) if args.out else HERE / "results" / ("loss_quick.json" if args.quick else "loss.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "torch": torch.__version__, "device": args.device,
        "threads": args.threads or torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "repeats": args.repeats,
        "rounds": args.rounds,
        "time_unix": int(time.time()),
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
