"""Benchmark: one full distillation step, end to end, against TRL's GKD trainer and a naive loop.

A step is: teacher forward (no grad), student forward, loss, backward, clip, AdamW step. All
variants use the same models (saved once to disk and loaded by each), the same token blocks in
the same order, the same batch, bf16 autocast (or float32 with ``--precision fp32``) with float32
student master weights and a bf16 teacher, forward KL at temperature 1 over the full vocabulary:

* ``potstill``: ``potstill.distill`` itself (``loss.path: auto``, i.e. the chunked fused loss).
* ``potstill_plain``: the same with ``loss.path: plain`` (full logits): what chunking buys.
* ``trl``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (no on-policy generation),
  ``beta=0`` (forward KL), ``seq_kd=False``, fed the same token blocks by a plain collator.
* ``naive``: a hand-written loop as DistillKit-style scripts do it: both models' full logits,
  ``log_softmax`` in float32, ``F.kl_div(log_target=True)``, mask, mean.

Each variant runs in its own process so that peak memory is clean: peak RSS at the end of the
last training step minus the RSS after imports (model weights, optimizer state, activations and
everything the framework holds count; on CUDA ``max_memory_allocated``). Time: the median step
time over the steps after ``--warmup``; tokens/s = tokens per step / that median. Variants run
round-robin ``--rounds`` times and the median over rounds is reported, so that drift in a shared
machine's load hits every variant alike.

FLOP/s: the matmul FLOPs of one step (student 6 x its matmul parameters per token, teacher 2 x,
plus attention scores and values: 12 x layers x T x hidden per token for the student, 4 x for the
teacher; embedding lookups excluded) over potstill's median step time, beside the rate of a large
matmul in the step's dtype measured in the same run (the compute-bound limit).

    python bench/step.py                    # the issue's shape: teacher ~39M, student ~9M, V=32000, T=512
    python bench/step.py --quick            # tiny models, a smoke test
    python bench/step.py --variants potstill,naive --rounds 1
"""

from __future__ import annotations

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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = ("potstill", "potstill_plain", "trl", "naive")
TEACHER = {"hidden_size": 384, "num_hidden_layers": 8, "num_attention_heads": 6, "num_key_value_heads": 6,
           "intermediate_size": 1024}
STUDENT = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
           "intermediate_size": 384}
QUICK = {"teacher": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "intermediate_size": 128},
         "student": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "intermediate_size": 64}}
LR = 1e-4


# ------------------------------------------------------------------ shared setup (parent)
def build_models(root: Path, vocab: int, seq: int, quick: bool) -> dict:
    """Save teacher/ and student/ (random init, fixed seed) with the demo tokenizer; return their sizes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "src"))
    from potstill.commands.quickstart import demo_teacher_path

    tok = AutoTokenizer.from_pretrained(demo_teacher_path())
    sizes = {}
    for name, shape in (("teacher", QUICK["teacher"] if quick else TEACHER),
                        ("student", QUICK["student"] if quick else STUDENT)):
        torch.manual_seed(0 if name == "teacher" else 1)
        cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(seq, 512), tie_word_embeddings=False,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **shape)
        model = LlamaForCausalLM(cfg)
        if name == "teacher":
            model = model.to(torch.bfloat16)  # a teacher is usually shipped in bf16
        model.save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
        total = sum(p.numel() for p in model.parameters())
        embed = model.get_input_embeddings().weight.numel()
        sizes[name] = {"params": total, "matmul_params": total - embed, "layers": cfg.num_hidden_layers,
                       "hidden": cfg.hidden_size, **shape}
    return sizes


def build_blocks(root: Path, seq: int, batch: int, steps: int) -> Path:
    """A jsonl of python-docs texts, its packed blocks, and the blocks in potstill's step order."""
    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "src"))
    from potstill.data.batching import StepBatcher
    from potstill.config import DataConfig
    from potstill.data import build_datasets, load_rows

    tok = AutoTokenizer.from_pretrained(root / "student")
    need = int(seq * batch * steps * 1.3) + seq
    rows, n_chars = [], 0
    for row in load_rows("python-docs", cfg=DataConfig(source="python-docs", split="train")):
        rows.append({"text": row["text"]})
        n_chars += len(row["text"])
        if n_chars > need * 5:  # ~3 characters per token here; generous
            break
    with open(root / "data.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    ds, _ = build_datasets(data_config(root, seq), tok, progress=False)
    batcher = StepBatcher(len(ds), batch_size=batch, grad_accum=1, world_size=1, rank=0, seed=0)
    if len(ds) < batch * steps:
        raise SystemExit(f"only {len(ds)} blocks of {seq} tokens for {steps} steps of {batch}")
    order = [i for step in range(steps) for idx in batcher.micro_batches(step) for i in idx]
    ids = np.stack([np.asarray(ds[i]["input_ids"], dtype=np.int64) for i in order])
    np.save(root / "blocks.npy", ids)
    return root / "blocks.npy"


def data_config(root: Path, seq: int):
    from potstill.config import DataConfig

    return DataConfig(source=str(root / "data.jsonl"), max_length=seq, packing=True, validation_fraction=0.0,
                      cache_dir=str(root / "cache"))


# ------------------------------------------------------------------ child process
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM, what ru_maxrss reports) so that import-time peaks do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    sys.path.insert(0, str(ROOT / "src"))
    from potstill.training.metrics import peak_memory_mb

    return int(peak_memory_mb(torch.device("cpu")) * 2**20)  # VmHWM (ru_maxrss starts at the parent's peak)


def run_potstill(args, root: Path, plain: bool) -> tuple[list[float], int]:
    import potstill

    cfg = {
        "teacher": {"name_or_path": str(root / "teacher")},
        "student": {"name_or_path": str(root / "student")},
        "data": data_config(root, args.seq).model_dump(),
        "loss": {"logits": {"weight": 1.0, "divergence": "fkl", "temperature": 1.0}, "ce": {"weight": 0.0},
                 "path": "plain" if plain else "auto"},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": LR, "scheduler": "constant",
                  "precision": args.precision, "max_grad_norm": 1.0, "log_every": 1, "checkpoint_every": None,
                  "seed": 0},
        "eval": {"every": None},
        "output": {"dir": str(Path(args.workdir) / f"run-{args.variant}"), "overwrite": True, "tensorboard": False},
    }
    result = potstill.distill(cfg, progress=False)
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    train = [r for r in records if "step_time_s" in r]
    times = [r["step_time_s"] for r in train]
    peak = int(train[-1]["peak_mem_mb"] * 2**20) if args.device == "cpu" else _peak_bytes(args.device)
    return times, peak


def run_trl(args, root: Path, blocks) -> tuple[list[float], int]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(root / "student")
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.bfloat16)
    dataset = Dataset.from_dict({"input_ids": blocks.tolist()})

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    times, peaks, last = [], [], [time.perf_counter()]

    class Timer(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            peaks.append(_peak_bytes(args.device))

        def on_step_begin(self, *_a, **_k):
            last[0] = time.perf_counter() if not times else last[0]

    gkd = GKDConfig(output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.batch,
                    gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=LR,
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                    lmbda=0.0, beta=0.0, seq_kd=False, bf16=args.precision == "bf16",
                    use_cpu=args.device == "cpu", report_to=[], save_strategy="no", logging_steps=10**6,
                    dataloader_num_workers=0, max_length=args.seq, seed=0, disable_tqdm=True)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=gkd, train_dataset=dataset,
                         data_collator=collate, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return times, peaks[-1]


def run_naive(args, root: Path, blocks) -> tuple[list[float], int]:
    """Full logits for both models, log_softmax in float32, F.kl_div: the loop users write by hand."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32).to(device).train()
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.bfloat16).to(device).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = torch.as_tensor(blocks[step * args.batch:(step + 1) * args.batch]).to(device)
        with torch.no_grad(), autocast():
            teacher_logits = teacher(input_ids=ids).logits
        with autocast():
            student_logits = student(input_ids=ids).logits
        mask = torch.ones_like(ids[:, 1:], dtype=torch.bool)
        student_lp = F.log_softmax(student_logits[:, :-1].float(), dim=-1)
        teacher_lp = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
        kl = F.kl_div(student_lp, teacher_lp, reduction="none", log_target=True).sum(-1)
        loss = kl[mask].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del teacher_logits, student_logits, student_lp, teacher_lp, kl, loss
    return times, _peak_bytes(args.device)


def run_matmul(args) -> dict:
    """The rate of a large square matmul in the step's dtype: the compute-bound limit here."""
    import torch

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    n = 1024 if args.quick else 2048
    a = torch.randn(n, n, dtype=dtype, device=args.device)
    b = torch.randn(n, n, dtype=dtype, device=args.device)
    rates = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if args.device == "cuda":
            torch.cuda.synchronize()
        rates.append(4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return {"variant": "matmul", "n": n, "flops_per_s": statistics.median(rates[1:]), "all": rates}


def run_child(args) -> dict:
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant == "matmul":
        return run_matmul(args)
    root = Path(args.workdir)
    blocks = np.load(root / "blocks.npy")
    # Every child imports the same libraries before the baseline is taken, so that import-time
    # memory (transformers pulls in much) counts for no variant.
    sys.path.insert(0, str(ROOT / "src"))
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import potstill  # noqa: F401
    import potstill.commands.distill  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401
    try:
        import trl.experimental.gkd  # noqa: F401
    except ImportError:
        if args.variant == "trl":
            raise
    base = torch.cuda.memory_allocated() if args.device == "cuda" else _rss_bytes()
    reset = _reset_peak_rss() if args.device == "cpu" else True
    if args.variant in ("potstill", "potstill_plain"):
        times, peak = run_potstill(args, root, plain=args.variant == "potstill_plain")
    elif args.variant == "trl":
        times, peak = run_trl(args, root, blocks)
    else:
        times, peak = run_naive(args, root, blocks)
    timed = times[args.warmup:]
    return {"variant": args.variant, "step_s": statistics.median(timed), "step_s_all": times,
            "tokens_per_step": args.batch * args.seq, "peak_mb": (peak - base) / 2**20, "base_mb": base / 2**20,
            "threads": torch.get_num_threads(), "peak_reset_after_imports": reset}


# ------------------------------------------------------------------ parent process
def child(variant: str, args, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--variant", variant, "--workdir", str(workdir),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq",
           str(args.seq), "--precision", args.precision, "--device", args.device, "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"variant": variant, "error": f"exit {proc.returncode}:\n{tail}"}
    return json.loads(lines[-1][len("RESULT "):])


def step_flops(sizes: dict, seq: int, tokens: int) -> float:
    """Matmul FLOPs of one step: student forward+backward, teacher forward."""
    s, t = sizes["student"], sizes["teacher"]
    student = 6 * s["matmul_params"] + 12 * s["layers"] * seq * s["hidden"]
    teacher = 2 * t["matmul_params"] + 4 * t["layers"] * seq * t["hidden"]
    return (student + teacher) * tokens


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"]}
    step_s = statistics.median(r["step_s"] for r in ok)
    return {"step_s": step_s, "tokens_per_s": ok[0]["tokens_per_step"] / step_s,
            "peak_mb": statistics.median(r["peak_mb"] for r in ok), "rounds": ok}


def print_table(summary: dict, flops: float, matmul: float, precision: str):
    ref = summary.get("trl", {})
    print(f"\n{'variant':<16} {'tok/s':>9} {'step s':>8} {'peak MB':>9} {'tok/s vs trl':>13} {'mem vs trl':>11}")
    for name, row in summary.items():
        if "error" in row:
            print(f"{name:<16} error: {row['error'].splitlines()[-1]}")
            continue
        speed = f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if "tokens_per_s" in ref else "-"
        mem = f"{row['peak_mb'] / ref['peak_mb']:.2f}x" if "peak_mb" in ref else "-"
        print(f"{name:<16} {row['tokens_per_s']:>9.0f} {row['step_s']:>8.3f} {row['peak_mb']:>9.0f} {speed:>13} {mem:>11}")
    if "potstill" in summary and "step_s" in summary["potstill"]:
        achieved = flops / summary["potstill"]["step_s"]
        print(f"\npotstill: {achieved / 1e9:.1f} GFLOP/s of step matmuls; {precision} matmul rate measured here "
              f"{matmul / 1e9:.1f} GFLOP/s -> {achieved / matmul:.0%} of the compute-bound limit")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=2, help="round-robin repeats of every variant")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--quick", action="store_true", help="tiny models and shapes: a smoke test")
    p.add_argument("--out", default=str(HERE / "results" / "step.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    if args.quick:
        args.steps, args.warmup, args.batch, args.seq, args.vocab, args.rounds = 4, 1, 2, 64, 8192, 1
        args.out = str(HERE / "results" / "step-quick.json")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="potstill-bench-step-") as tmp:
        workdir = Path(tmp)
        sizes = build_models(workdir, args.vocab, args.seq, args.quick)
        build_blocks(workdir, args.seq, args.batch, args.steps)
        print(f"teacher {sizes['teacher']['params'] / 1e6:.1f}M params, student {sizes['student']['params'] / 1e6:.1f}M, "
              f"V={args.vocab}, batch {args.batch} x {args.seq} tokens, {args.precision} on {args.device}", flush=True)
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        matmul = []
        for r in range(args.rounds):
            matmul.append(child("matmul", args, workdir))
            for v in variants:
                row = child(v, args, workdir)
                runs[v].append(row)
                what = row.get("error", "").splitlines()[-1:] or [f"{row['step_s']:.3f} s/step, {row['peak_mb']:.0f} MB"]
                print(f"round {r + 1}/{args.rounds} {v}: {what[0]}", flush=True)
    summary = {v: summarize(rs) for v, rs in runs.items()}
    matmul_rate = statistics.median(m["flops_per_s"] for m in matmul if "flops_per_s" in m)
    flops = step_flops(sizes, args.seq, args.batch * args.seq)
    print_table(summary, flops, matmul_rate, args.precision)
    result = {"command": "python bench/step.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "sizes": sizes, "vocab": args.vocab, "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "warmup": args.warmup, "precision": args.precision, "device": args.device,
              "step_flops": flops, "matmul_flops_per_s": matmul_rate, "summary": summary,
              "torch": _torch_version(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count()}
    if "potstill" in summary and "step_s" in summary["potstill"]:
        result["potstill_flops_per_s"] = flops / summary["potstill"]["step_s"]
        result["potstill_fraction_of_matmul_rate"] = result["potstill_flops_per_s"] / matmul_rate
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _torch_version() -> str:
    import torch
    return torch.__version__


if __name__ == "__main__":
    main()
