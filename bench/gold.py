"""Benchmark: potstill's cross-tokenizer distillation against TRL's GOLD trainer (ULD).

The pair of ``bench/xtok_common.py``: the demo teacher (byte-level BPE, 8192 tokens, 16.9M
parameters, stored in bf16) and a seeded random-init student of the quickstart's size with a
Unigram tokenizer of 8192 tokens. Both trainers run off-policy (no student generation) on the
same texts, the same number of steps, batch, sequence length, learning rate and schedule:

* ``potstill``: ``python -m potstill distill <config.yaml>`` (cross-tokenizer run: character-span
  alignment, ``loss.cross_tokenizer.mode=hybrid``: forward KL on exact pairs over the mapped
  vocabulary, ULD on the other aligned pairs), ``train.precision=auto`` (bf16 autocast on a CPU
  with AVX512-BF16/AMX; the teacher then in bf16).
* ``gold``: ``trl.experimental.gold.GOLDTrainer`` in its own process (this file with
  ``--child-gold``): ``lmbda=0`` (every batch off-policy: the dataset's completions, no
  generation), ``use_uld_loss=True`` with ``uld_use_hybrid_loss=True`` (``beta=0``: forward KL on
  the matched vocabulary, ULD on the rest, fixed weights 1 / 1 as potstill's), extended ULD
  (byte-offset alignment), ``bf16=True`` (bf16 autocast on CPU), teacher loaded in bf16 and the
  student in float32 as in potstill.

Data: the python-docs train split thinned to every m-th row (``bench/offline.py``'s
``thin_train_split``), one jsonl that potstill packs into blocks of ``--length`` student tokens.
GOLD refuses packing with cross-tokenizer ULD, so its rows are the same texts joined and cut
at the student tokenizer's character offsets into pieces of ``--length - 1`` student tokens (GOLD
appends EOS): full rows, almost no padding, about the same tokens per step.

Measured, each trainer in its own child process: training tokens/s over the steps after
``--warmup`` (potstill: its metrics.jsonl windows, ``log_every=1``, eval and checkpoint time
excluded; GOLD: a callback timing step end to step end, tokens = the student's attention-mask
sum), the child's peak RSS (``os.wait4``: whole process, model loading and data preparation
included), and bits per byte of each trained student on the python-docs test split with
``potstill evaluate <student> --data <test.jsonl>`` (the same metric and text for both).

    python bench/gold.py                          # 5 warmup + 25 timed steps, 8 x 256
    python bench/gold.py --steps 8 --warmup 2 --out /tmp/gold-smoke --json /tmp/gold.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_child(cmd: list[str], log: Path, env: dict) -> tuple[int, float, float]:
    """Run ``cmd``; its exit code, wall seconds and peak RSS in MB (VmHWM of the child, by wait4)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024  # ru_maxrss: KB on Linux


BASELINE = {  # what each child imports before any model or data: its RSS is the "imports" baseline
    "potstill": "import torch, transformers, potstill.commands.cli, potstill.commands.distill, potstill.training.loop",
    "gold": "import torch, transformers, datasets; from trl.experimental.gold import GOLDConfig, GOLDTrainer",
}


def import_rss(name: str, env: dict, out: Path) -> float:
    """Peak RSS (MB) of a child that only imports what the variant's trainer imports."""
    code = BASELINE["potstill" if name == "potstill" else "gold"]
    rc, _, peak = run_child([sys.executable, "-c", code], out / f"{name}-imports.log", env)
    return peak if rc == 0 else float("nan")


def gold_rows(subset: Path, tokenizer_dir: Path, length: int, out: Path) -> Path:
    """The subset's texts joined by a blank line and cut into pieces of ``length - 1`` student tokens,
    each a prompt (its first token) and a completion (the rest)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [json.loads(line)["text"] for line in subset.read_text(encoding="utf-8").splitlines()]
    big = "\n\n".join(texts)
    offs = tok(big, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = length - 1

    def encode(text):
        return tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    rows, i = [], 0
    while i + n <= len(offs):
        # GOLD's collator needs at least one prompt token per row (it raises "An example has no prompt
        # tokens left" for plain text): the prompt is the piece's first student token (two when the
        # first is blank), the rest the completion, on which the loss is taken. Re-encoded, the piece
        # may come out a token or two longer: it is shortened until prompt + completion + EOS fit in
        # ``length`` (else GOLD's left truncation would drop the prompt).
        first = 1 if big[offs[i][0]:offs[i][1]].strip() else 2
        end = i + n
        while True:
            start, cut, stop = offs[i][0], offs[i + first - 1][1], offs[end - 1][1]
            full = encode(big[start:stop])
            prompt_tokens = next((j for j, (_, e) in enumerate(full) if e > cut - start), len(full))
            if prompt_tokens < 1:
                first += 1
            elif len(full) > n:
                end -= len(full) - n
            else:
                break
        rows.append({"prompt": big[start:cut], "completion": big[cut:stop]})
        i += n
    path = out / "gold-rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def potstill_config(args, pair: dict, subset: Path, run: Path) -> Path:
    import yaml

    from potstill.commands.quickstart import demo_teacher_path
    from potstill.data.corpus import python_docs_split_path

    cfg = {
        "teacher": {"name_or_path": str(demo_teacher_path())},
        "student": {"name_or_path": str(pair["init"])},
        "data": {"source": str(subset), "max_length": args.length, "packing": True,
                 "validation_source": str(python_docs_split_path("validation"))},
        "loss": {"logits": {"weight": 1.0, "divergence": "fkl", "temperature": 1.0}, "ce": {"weight": 0.0},
                 "cross_tokenizer": {"mode": "hybrid", "exact_weight": 1.0, "uld_weight": 1.0}},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "grad_accum": 1, "lr": args.lr,
                  "warmup_steps": 1, "scheduler": "cosine", "precision": "auto", "seed": 0,
                  "max_grad_norm": 1.0, "checkpoint_every": args.steps, "keep_checkpoints": 1, "log_every": 1},
        "eval": {"every": None, "at_start": False, "max_batches": 1},
        "output": {"dir": str(run), "overwrite": True, "tensorboard": False, "report": False},
    }
    path = run.parent / "potstill.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def potstill_speed(run: Path, warmup: int) -> dict:
    recs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "tokens_per_s" in r]
    timed = [r for r in recs if r["step"] > warmup]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    secs = sum(r["step_time_s"] for r in timed)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return {"tokens_per_s": tokens / secs, "timed_steps": len(timed), "timed_tokens": round(tokens),
            "timed_s": secs, "step_time_s": [round(r["step_time_s"], 4) for r in recs],
            "loss": [round(r["loss"], 4) for r in recs], "own_peak_mem_mb": recs[-1].get("peak_mem_mb"),
            "tokens_per_s_all_steps": summary.get("train_overall", {}).get("tokens_per_s"),
            "hardware": summary.get("hardware")}


def bpb(model: Path, data: Path, out: Path, env: dict, length: int) -> dict:
    cmd = [sys.executable, "-m", "potstill", "evaluate", str(model), "--data", str(data), "--max-length", str(length),
           "--json", str(out), "--no-progress"]
    rc, wall, _ = run_child(cmd, out.with_suffix(".log"), env)
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}; see {out.with_suffix('.log')}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------- GOLD child


def child_gold(args) -> int:
    import torch
    import trl
    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    rows = [json.loads(line) for line in Path(args.rows).read_text(encoding="utf-8").splitlines()]
    ds = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(args.student)
    marks: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    class CountingGOLD(GOLDTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    cfg = GOLDConfig(
        output_dir=args.child_out, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=1,
        weight_decay=0.0, max_grad_norm=1.0, seed=0, bf16=args.gold_bf16, use_cpu=True,
        lmbda=0.0, beta=0.0, seq_kd=False,
        use_uld_loss=True, use_extended_uld=args.gold_extended_uld, uld_use_hybrid_loss=True,
        uld_hybrid_matched_weight=1.0, uld_hybrid_unmatched_weight=1.0,
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0,
        teacher_tokenizer_name_or_path=args.teacher,
        teacher_model_init_kwargs={"dtype": "bfloat16"}, model_init_kwargs={"dtype": "float32"},
        max_length=args.length, max_completion_length=min(128, args.length - 1), packing=False,
        dataset_text_field="text", save_strategy="no", eval_strategy="no", report_to=[],
        logging_steps=max(1, args.steps // 6), disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=args.gold_gc,  # TRL's SFTConfig default is on; potstill's is off (the gold row)
    )
    trainer = CountingGOLD(model=args.student, teacher_model=args.teacher, args=cfg, train_dataset=ds,
                           processing_class=tok, callbacks=[Timer()])
    print("student dtype", next(trainer.model.parameters()).dtype, "teacher dtype",
          next(trainer.teacher_model.parameters()).dtype, "threads", torch.get_num_threads(), flush=True)
    trainer.train()
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    w = args.warmup
    timed_tokens, timed_s = sum(tokens[w:]), sum(step_s[w:])
    trainer.save_model(args.child_out + "/student")
    tok.save_pretrained(args.child_out + "/student")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(args.child_json).write_text(json.dumps({
        "tokens_per_s": timed_tokens / timed_s, "timed_steps": len(step_s[w:]), "timed_tokens": timed_tokens,
        "timed_s": timed_s, "step_time_s": [round(s, 4) for s in step_s], "tokens_per_step": tokens,
        "loss": losses, "threads": torch.get_num_threads(), "bf16": cfg.bf16, "use_extended_uld": cfg.use_extended_uld,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "student_dtype": str(next(trainer.model.parameters()).dtype),
        "teacher_dtype": str(next(trainer.teacher_model.parameters()).dtype),
        "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
    }, indent=2))
    return 0


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps in all (warmup included)")
    p.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256, help="student tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="runs/bench-gold")
    p.add_argument("--json", default="bench/results/gold.json")
    p.add_argument("--variants", default="potstill,gold,gold_gc",
                   help="potstill, gold (settings matched to potstill's), gold_gc (the same with TRL's default "
                        "gradient checkpointing)")
    p.add_argument("--no-gold-bf16", dest="gold_bf16", action="store_false", help="GOLD in float32 (no autocast)")
    p.add_argument("--gold-extended-uld", action="store_true",
                   help="GOLD's byte-offset alignment (TRL 1.16 refuses it for a non-ByteLevel student tokenizer)")
    p.add_argument("--rounds", type=int, default=1, help="round-robin repeats; tokens/s: the median")
    p.add_argument("--max-load", type=float, default=1.5, help="wait until the 1-min load average is below this")
    p.add_argument("--max-wait", type=float, default=900, help="seconds to wait for --max-load at most")
    # child mode
    p.add_argument("--child-gold", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gold-gc", action="store_true", help=argparse.SUPPRESS)
    for a in ("rows", "student", "teacher", "child_out", "child_json"):
        p.add_argument("--" + a.replace("_", "-"), dest=a, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_gold:
        return child_gold(args)

    import torch
    import trl
    import transformers

    import potstill
    from offline import thin_train_split
    from potstill.commands.quickstart import demo_teacher_path
    from potstill.data.corpus import python_docs_split_path
    from xtok_common import prepare

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pair = prepare(out)
    teacher = demo_teacher_path()
    subset, stride = thin_train_split(out, args.steps * args.batch)
    rows = gold_rows(subset, pair["tokenizer"], args.length, out)
    heldout = python_docs_split_path("test")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(torch.get_num_threads()))

    waited = 0.0
    while os.getloadavg()[0] > args.max_load and waited < args.max_wait:
        print(f"load {load()} > {args.max_load}: waiting", flush=True)
        time.sleep(30)
        waited += 30
    record = {"command": " ".join(["python"] + sys.argv), "load_before": load(), "waited_s": waited,
              "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "batch": args.batch, "length": args.length, "lr": args.lr,
              "train_row_stride": stride, "heldout": "python-docs test split", "potstill": potstill.__version__,
              "torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
              "results": {}}
    names = [v for v in args.variants.split(",") if v]
    for rnd in range(args.rounds):  # round-robin: load from other jobs hits every variant alike
        for name in names:
            run = out / name
            l0 = load()
            if name == "potstill":
                cfg = potstill_config(args, pair, subset, run)
                cmd = [sys.executable, "-m", "potstill", "distill", str(cfg), "--no-progress"]
            else:
                run.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child-gold", "--rows", str(rows),
                       "--student", str(pair["init"]), "--teacher", str(teacher), "--child-out", str(run),
                       "--child-json", str(run / "timing.json"), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch", str(args.batch), "--length", str(args.length),
                       "--lr", str(args.lr)]
                if not args.gold_bf16:
                    cmd.append("--no-gold-bf16")
                if args.gold_extended_uld:
                    cmd.append("--gold-extended-uld")
                if name == "gold_gc":
                    cmd.append("--gold-gc")
            print(f"== round {rnd + 1} {name}: {' '.join(cmd)}", flush=True)
            rc, wall, peak = run_child(cmd, out / f"{name}.log", env)
            if rc != 0:
                print(f"   {name} failed ({rc}); log: {out / f'{name}.log'}", flush=True)
                record["results"][name] = {"failed": rc, "command": " ".join(cmd), "log": str(out / f"{name}.log")}
                continue
            row = potstill_speed(run, args.warmup) if name == "potstill" else json.loads((run / "timing.json").read_text())
            row.update(command=" ".join(cmd), wall_s=wall, peak_rss_mb=peak, load_before=l0, load_after=load(),
                       imports_rss_mb=import_rss(name, env, out))
            if rnd == 0:  # the trained student is the same every round (seeded): scored once
                row["eval"] = bpb(run / "student", heldout, out / f"{name}-eval.json", env, args.length)
            print(f"   {name}: {row['tokens_per_s']:.0f} tokens/s, peak RSS {peak:.0f} MB, load {l0} -> "
                  f"{row['load_after']}", flush=True)
            agg = record["results"].setdefault(name, {"rounds": []})
            if "failed" in agg:
                continue
            agg["rounds"].append(row)
            agg.update(tokens_per_s=statistics.median(r["tokens_per_s"] for r in agg["rounds"]),
                       peak_rss_mb=max(r["peak_rss_mb"] for r in agg["rounds"]),
                       imports_rss_mb=statistics.median(r["imports_rss_mb"] for r in agg["rounds"]),
                       load_before=min((r["load_before"] for r in agg["rounds"]), key=lambda x: x[0]),
                       load_after=max((r["load_after"] for r in agg["rounds"]), key=lambda x: x[0]),
                       eval=agg["rounds"][0]["eval"], command=row["command"])
    record["load_after"] = load()
    record["table"] = table(record["results"])
    print(record["table"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")
    return 0


def bits_per_byte(score: dict) -> float | None:
    for k in ("bpb", "bits_per_byte", "eval/bpb"):
        if k in score:
            return score[k]
    for v in score.values():
        if isinstance(v, dict):
            b = bits_per_byte(v)
            if b is not None:
                return b
    return None


LABELS = {"potstill": "potstill (hybrid: KL on exact pairs + ULD)",
          "gold": "GOLD (ULD hybrid, positional alignment)",
          "gold_gc": "GOLD, + gradient checkpointing (TRL default)"}


def table(results: dict) -> str:
    ok = {k: v for k, v in results.items() if "failed" not in v}
    head = ["trainer", "tokens/s", "peak RSS MB", "above imports MB", "held-out bpb", "load before -> after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in ok.items():
        lines.append(f"| {LABELS.get(name, name)} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - r['imports_rss_mb']:.0f} | "
                     f"{bits_per_byte(r['eval']) or float('nan'):.3f} | {r['load_before'][0]} -> {r['load_after'][0]} |")
    for other in ("gold", "gold_gc"):
        if "potstill" in ok and other in ok:
            a, b = ok["potstill"], ok[other]
            lines.append(f"| potstill / {other} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
                         f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x | "
                         f"{(a['peak_rss_mb'] - a['imports_rss_mb']) / (b['peak_rss_mb'] - b['imports_rss_mb']):.2f}x | "
                         f"{bits_per_byte(a['eval']) - bits_per_byte(b['eval']):+.3f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
