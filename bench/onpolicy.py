"""Benchmark: on-policy distillation (GKD, issue #15): potstill against TRL, and on-policy against off-policy KD.

The pair is the quickstart's: the bundled demo teacher (Llama, 17M parameters, 8192-token
byte-level BPE, trained on the python-docs corpus; not a chat model) and the quickstart's
random-init student (``make_student_init``: 4 layers, width 128). The data are prompt/completion
pairs cut from the python-docs corpus (built in the work folder): for each text, the prompt is its
first ~100 characters (cut before a space), the completion the next ~240 (train split: training;
validation split: the held-out prompts). Both systems render them as plain text with the chat
template ``{% for m in messages %}{{ m['content'] }}{% endfor %}`` (potstill: ``data.chat_template``,
prompt_completion format, loss on the completion only; TRL: the tokenizer's ``chat_template``), so
both generate from the same prompt tokens (checked when the data are built: the prompt's tokens
are a prefix of the prompt+completion tokens, else the example is dropped).

1. Speed and memory (``--only speed``): ``lmbda=1`` (every completion sampled from the current
   student at temperature 1, no top-k / top-p, at most ``max_new_tokens``; scored by the teacher),
   generalized JSD with beta 0.5, bf16 (autocast, float32 student weights, bf16 teacher), the same
   batch of prompts, steps, learning rate (constant, no warmup), clipping at 1.0 and seed:

   | run        | what |
   | ---        | --- |
   | ``potstill``   | ``python -m potstill distill`` with ``onpolicy.lmbda=1``, ``loss.logits.divergence=jsd`` |
   | ``trl``        | ``trl.DistillationTrainer`` (TRL's on-policy distillation trainer; always samples from the student, i.e. ``lmbda=1``; chunked JSD loss), ``gradient_checkpointing=False`` (its default is True: slower) |
   | ``trl_gkd``    | ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=1``, ``beta=0.5`` (full logits) |

   TRL is fed the prompts in potstill's step order (``shuffle_dataset=False``), so step k of every
   run starts from the same prompts. Each run is its own process, launched by this script (which
   imports no torch): peak RSS = the child's VmHWM (read from /proc every 50 ms; ``ru_maxrss``
   from ``wait4`` is recorded beside it), everything included (imports, both models, optimizer,
   generation cache, activations). Tokens/s, the same definition for every run: the real
   (non-pad) tokens of the trained sequences, prompt + sampled completion up to and including its
   EOS, summed over the steps after ``--warmup``, divided by those steps' wall seconds (step end to
   step end). potstill: its metrics.jsonl (``log_every=1``: ``tokens_per_s`` x ``step_time_s`` is
   the step's ``attention_mask`` sum; ``time/generate_s`` and ``time/train_s`` the split of the
   step). TRL: a callback times the steps, a wrapper around the trainer's batch builder counts
   ``prompt_mask + completion_mask`` (GKD: the new ``attention_mask``), and a wrapper around the
   student's ``generate`` times generation; training = step - generation.
   Targets (printed, not asserted): potstill >= 1.5x TRL's tokens/s, <= 0.6x its peak RSS.

2. Quality (``--only quality``), potstill only, both from the same student init, lr 3e-3
   constant after 10 warmup steps, batch as above:

   * ``on-policy``:  ``onpolicy.lmbda=1``, jsd beta 0.5, ``--quality-steps`` steps;
   * ``off-policy``: ``lmbda=0`` (the data's completions), forward KL; it runs until it has
     trained for as many seconds as the on-policy run (then it is stopped with SIGTERM and
     checkpoints), with checkpoints every ``--ckpt-every`` steps.

   Compared: the on-policy student at its end against the off-policy checkpoint (a) nearest the
   same number of training tokens (real tokens of the trained sequences, as above) and (b) at the
   same training seconds (sum of step times; the step after a checkpoint write, whose time holds
   the write, counts as the run's median step). Metric, with plain transformers, float32, on
   ``--heldout`` validation prompts: the student generates a completion (greedy, and sampled at
   T=1 with a fixed seed; ``max_new_tokens`` as in training; cut after the first EOS), the teacher
   scores prompt + completion, and the mean per-token NLL of the completion tokens under the
   teacher is reported (lower: the student writes what the teacher would); plus the student's
   perplexity on the held-out data completions (their tokens, no EOS: they are cut from longer texts) given their prompts (it may rise under
   on-policy training). The teacher's own completions and the untrained student are scored as
   references.

    python bench/onpolicy.py            # full: batch 8, 64 new tokens, 30 speed steps, 200 quality steps (~20-25 min on 2 idle cores)
    python bench/onpolicy.py --quick    # smoke run: batch 4, 16 new tokens, a few steps (~3 min)
    python bench/onpolicy.py --only speed --runs potstill,trl
    python bench/onpolicy.py --work /tmp/op --keep     # keep the work folder (data, runs, logs)

Writes ``bench/results/onpolicy.json`` (``onpolicy-quick.json``) with the command, versions, load
averages before and after each run, and every number printed.
"""

from __future__ import annotations

# No torch in the launcher: the children are measured.
import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))
from fsdp import vm_hwm_mb  # noqa: E402  bench/fsdp.py: a process's peak RSS from /proc (no torch)
DEMO_TEACHER = REPO / "src" / "potstill" / "assets" / "demo-teacher"
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
RUNS = ("potstill", "trl", "trl_gkd")

SIZES = {
    "full": {"batch": 8, "max_new_tokens": 64, "speed_steps": 30, "warmup": 3, "quality_steps": 200,
             "ckpt_every": 10, "heldout": 64, "prompt_chars": 100, "completion_chars": 240, "train_examples": 4000},
    "quick": {"batch": 4, "max_new_tokens": 16, "speed_steps": 6, "warmup": 2, "quality_steps": 12,
              "ckpt_every": 4, "heldout": 8, "prompt_chars": 100, "completion_chars": 60, "train_examples": 400},
}
SPEED_LR = 1e-3
QUALITY_LR = 3e-3
QUALITY_WARMUP = 10
SEED = 0


# ------------------------------------------------------------------ children
def child_prepare(work: Path, p: dict) -> None:
    """Student init, prompt/completion jsonl (train, held-out), potstill's step order for TRL."""
    from transformers import AutoTokenizer

    from potstill.commands.quickstart import make_student_init
    from potstill.data.batching import StepBatcher
    from potstill.data.corpus import python_docs_split_path

    make_student_init(work)
    tok = AutoTokenizer.from_pretrained(DEMO_TEACHER)
    counts = {}
    for split, name, limit in (("train", "train.jsonl", p["train_examples"]), ("validation", "heldout.jsonl", p["heldout"])):
        texts = [json.loads(line)["text"] for line in python_docs_split_path(split).open()]
        random.Random(SEED).shuffle(texts)
        rows, dropped = [], 0
        for text in texts:
            pair = split_text(text, p["prompt_chars"], p["completion_chars"])
            if pair is None:
                continue
            prompt, completion = pair
            ids_p = tok(prompt, add_special_tokens=False)["input_ids"]
            ids_full = tok(prompt + completion, add_special_tokens=False)["input_ids"]
            if ids_full[:len(ids_p)] != ids_p:
                dropped += 1
                continue
            rows.append({"prompt": prompt, "completion": completion, "prompt_tokens": len(ids_p),
                         "completion_tokens": len(ids_full) - len(ids_p)})
            if len(rows) == limit:
                break
        with open(work / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        counts[split] = {"examples": len(rows), "dropped_tokenization": dropped,
                         "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rows),
                         "mean_completion_tokens": statistics.mean(r["completion_tokens"] for r in rows)}
    n = counts["train"]["examples"]
    batcher = StepBatcher(n, batch_size=p["batch"], grad_accum=1, world_size=1, rank=0, seed=SEED)
    order = [i for step in range(p["speed_steps"]) for idx in batcher.micro_batches(step) for i in idx]
    (work / "order.json").write_text(json.dumps(order))
    (work / "prepare.json").write_text(json.dumps(counts, indent=2))


def split_text(text: str, prompt_chars: int, completion_chars: int) -> tuple[str, str] | None:
    """(prompt, completion): the prompt ends before a single space at or after ``prompt_chars``
    (non-space on both sides), the completion starts with that space and ends before the first
    whitespace at or after ``completion_chars`` more characters."""
    n = len(text)
    k = next((i for i in range(prompt_chars, min(n - 1, prompt_chars + 60))
              if text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace()), None)
    if k is None or n < k + completion_chars + 1:
        return None
    j = next((i for i in range(k + completion_chars, n) if text[i].isspace()), n)
    return text[:k], text[k:j]


class StepProbe:
    """Step times, tokens and generation seconds of a TRL run (see the module docstring)."""

    def __init__(self):
        self.step_s, self.tokens, self.gen_s = [], [], []
        self._tokens, self._gen = 0, 0.0
        self._last = None

    def wrap_generate(self, model):
        inner = model.generate

        def generate(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self._gen += time.perf_counter() - t0

        model.generate = generate

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class Timer(TrainerCallback):
            def on_step_begin(self, *_a, **_k):
                if probe._last is None:
                    probe._last = time.perf_counter()

            def on_step_end(self, *_a, **_k):
                now = time.perf_counter()
                probe.step_s.append(now - probe._last)
                probe._last = now
                probe.tokens.append(probe._tokens)
                probe.gen_s.append(probe._gen)
                probe._tokens, probe._gen = 0, 0.0

        return Timer()


def child_trl(work: Path, p: dict, gkd: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    rows = [json.loads(line) for line in (work / "train.jsonl").open()]
    order = json.loads((work / "order.json").read_text())
    rows = [rows[i] for i in order]
    tok = AutoTokenizer.from_pretrained(work / "student-init")
    tok.chat_template = PLAIN_TEMPLATE
    student = AutoModelForCausalLM.from_pretrained(work / "student-init", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER, dtype=torch.bfloat16)
    probe = StepProbe()
    probe.wrap_generate(student)
    common = dict(output_dir=str(work / ("trl_gkd" if gkd else "trl")), per_device_train_batch_size=p["batch"],
                  gradient_accumulation_steps=1, max_steps=p["speed_steps"], learning_rate=SPEED_LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.5,
                  temperature=1.0, bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                  logging_steps=10**6, dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
                  gradient_checkpointing=False)
    if gkd:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class Counting(GKDTrainer):
            @staticmethod
            def generate_on_policy_outputs(model, inputs, generation_config):
                ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
                probe._tokens += int(mask.sum())
                return ids, mask, labels

        dataset = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                                   {"role": "assistant", "content": r["completion"]}]} for r in rows])
        args = GKDConfig(lmbda=1.0, seq_kd=False, max_new_tokens=p["max_new_tokens"], max_length=1024, **common)
        trainer = Counting(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                           processing_class=tok, callbacks=[probe.callback()])
        trainer.generation_config.top_k = 0
    else:
        from trl import DistillationConfig, DistillationTrainer

        class Counting(DistillationTrainer):
            def _generate_and_score_completions(self, inputs):
                out = super()._generate_and_score_completions(inputs)
                probe._tokens += int(out["prompt_mask"].sum()) + int(out["completion_mask"].sum())
                return out

        dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
        args = DistillationConfig(max_completion_length=p["max_new_tokens"], top_p=1.0, top_k=0,
                                  shuffle_dataset=False, **common)
        trainer = Counting(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                           processing_class=tok, callbacks=[probe.callback()])
    trainer.train()
    w = p["warmup"]
    return {"step_s": probe.step_s, "tokens": probe.tokens, "generate_s": probe.gen_s,
            "tokens_per_s": sum(probe.tokens[w:]) / sum(probe.step_s[w:]),
            "threads": torch.get_num_threads(), "generation_config": trainer.generation_config.to_diff_dict()}


def child_evaluate(work: Path, p: dict, models: dict) -> dict:
    """Teacher-scored NLL of each model's own completions (greedy, sampled T=1) and its perplexity
    on the held-out data completions; float32, plain transformers."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(DEMO_TEACHER)
    eos = tok.eos_token_id
    rows = [json.loads(line) for line in (work / "heldout.jsonl").open()]
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    data_completions = [tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"][len(ids):]
                        for r, ids in zip(rows, prompts)]
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER, dtype=torch.float32).eval()
    bs = 16

    def nll(model, pairs) -> tuple[float, int]:
        """Sum of -log p(completion token) over all pairs, and the token count."""
        total, count = 0.0, 0
        for s in range(0, len(pairs), bs):
            chunk = pairs[s:s + bs]
            width = max(len(a) + len(b) for a, b in chunk)
            ids = torch.full((len(chunk), width), eos, dtype=torch.long)
            mask = torch.zeros_like(ids)
            target = torch.zeros_like(ids, dtype=torch.bool)
            for i, (a, b) in enumerate(chunk):
                ids[i, :len(a) + len(b)] = torch.tensor(a + b)
                mask[i, :len(a) + len(b)] = 1
                target[i, len(a):len(a) + len(b)] = True
            with torch.no_grad():
                logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            tok_lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
            sel = target[:, 1:]
            total -= float(tok_lp[sel].sum())
            count += int(sel.sum())
        return total, count

    def generate(model, sample: bool) -> list[list[int]]:
        out = []
        torch.manual_seed(SEED)
        for s in range(0, len(prompts), bs):
            chunk = prompts[s:s + bs]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), eos, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, a in enumerate(chunk):
                ids[i, width - len(a):] = torch.tensor(a)
                mask[i, width - len(a):] = 1
            kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
            with torch.no_grad():
                seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=p["max_new_tokens"],
                                     pad_token_id=eos, eos_token_id=eos, **kw)
            for row in seq[:, width:].tolist():
                out.append(row[:row.index(eos) + 1] if eos in row else row)
        return out

    results = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        model = teacher if path == str(DEMO_TEACHER) else \
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        r = {"path": path}
        total, count = nll(model, list(zip(prompts, data_completions)))
        r["heldout_ppl"] = math.exp(total / count)
        for mode in ("greedy", "sampled"):
            comps = generate(model, sample=mode == "sampled")
            total, count = nll(teacher, [(a, b) for a, b in zip(prompts, comps) if b])
            r[f"teacher_nll_{mode}"] = total / max(count, 1)
            r[f"completion_len_{mode}"] = statistics.mean(len(c) for c in comps)
            r[f"eos_fraction_{mode}"] = sum(1 for c in comps if c and c[-1] == eos) / len(comps)
            distinct = [len(set(zip(c, c[1:], c[2:]))) / max(len(c) - 2, 1) for c in comps if len(c) > 2]
            r[f"distinct_3grams_{mode}"] = statistics.mean(distinct) if distinct else 0.0
            r[f"example_{mode}"] = tok.decode(comps[0])
        r["eval_s"] = time.perf_counter() - t0
        results[name] = r
        print(f"evaluated {name}: {json.dumps({k: v for k, v in r.items() if not k.startswith('example')})}",
              flush=True)
    results["_example_prompt"] = rows[0]["prompt"]
    return results


def child_main(args) -> None:
    work = Path(args.work)
    p = json.loads(args.params)
    if args.child == "prepare":
        child_prepare(work, p)
        return
    if args.child in ("trl", "trl_gkd"):
        result = child_trl(work, p, gkd=args.child == "trl_gkd")
    elif args.child == "evaluate":
        result = child_evaluate(work, p, json.loads(args.models))
    else:
        raise SystemExit(f"unknown child {args.child}")
    (work / f"{args.child}-result.json").write_text(json.dumps(result, indent=2))


# ------------------------------------------------------------------ launcher
def launch(cmd: list[str], log: Path, *, stop_when=None, timeout: float = 3600) -> dict:
    """Run ``cmd`` in its own process; its wall seconds, exit code, peak RSS (VmHWM polled every
    50 ms, and ``ru_maxrss`` from wait4) and the load averages around it. ``stop_when()``, polled
    every second, sends SIGTERM once it returns True (potstill then checkpoints and stops)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    load_before = os.getloadavg()
    started = time.perf_counter()
    peak, stopped, last_check = 0.0, False, 0.0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            hwm = vm_hwm_mb(proc.pid)
            if hwm is not None:
                peak = max(peak, hwm)
            now = time.perf_counter()
            if stop_when is not None and not stopped and now - last_check > 1.0:
                last_check = now
                if stop_when():
                    proc.send_signal(signal.SIGTERM)
                    stopped = True
            if now - started > timeout:
                proc.kill()
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - started, "rc": proc.returncode, "peak_rss_mb": peak,
            "ru_maxrss_mb": usage.ru_maxrss / 1024, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "stopped_by_signal": stopped, "log": str(log)}


def child_cmd(mode: str, work: Path, p: dict, **extra) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--work", str(work), "--params",
           json.dumps(p)]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    return cmd


def fail(what: str, run: dict) -> str:
    tail = Path(run["log"]).read_text(errors="replace").strip().splitlines()[-25:]
    return f"{what} failed (exit {run['rc']}); last lines of {run['log']}:\n" + "\n".join(tail)


def potstill_config(work: Path, p: dict, out: Path, *, onpolicy: bool, steps: int, lr: float, warmup: int,
                    ckpt_every: int | None) -> Path:
    import yaml

    cfg = {
        "teacher": {"name_or_path": str(DEMO_TEACHER)},
        "student": {"name_or_path": str(work / "student-init")},
        "data": {"source": str(work / "train.jsonl"), "format": "prompt_completion", "chat_template": PLAIN_TEMPLATE,
                 "packing": False, "max_length": 512, "validation_fraction": 0.0, "validation_split": None,
                 "cache_dir": str(work / "data-cache")},
        "loss": {"logits": {"weight": 1.0, "divergence": "jsd" if onpolicy else "fkl", "beta": 0.5,
                            "temperature": 1.0},
                 "ce": {"weight": 0.0}},
        "train": {"max_steps": steps, "batch_size": p["batch"], "grad_accum": 1, "lr": lr,
                  "scheduler": "constant_with_warmup" if warmup else "constant", "warmup_steps": warmup,
                  "max_grad_norm": 1.0, "precision": "bf16", "seed": SEED, "log_every": 1,
                  "checkpoint_every": ckpt_every, "keep_checkpoints": 10**6},
        "eval": {"every": None},
        "output": {"dir": str(out), "overwrite": True, "tensorboard": False},
    }
    if onpolicy:
        cfg["onpolicy"] = {"lmbda": 1.0, "max_new_tokens": p["max_new_tokens"], "temperature": 1.0, "top_p": 1.0,
                           "top_k": None, "num_completions": 1, "per": "step"}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def potstill_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "step_time_s" in r:
            out.append(r)
    return out


def run_potstill(work: Path, p: dict, name: str, **kw) -> tuple[dict, list[dict]]:
    out = work / name
    stop_when = kw.pop("stop_when", None)
    cfg = potstill_config(work, p, out, **kw)
    run = launch([sys.executable, "-m", "potstill", "distill", str(cfg), "--no-progress"], work / f"{name}.log",
                 stop_when=(lambda: stop_when(potstill_records(out))) if stop_when else None)
    return run, potstill_records(out)


def summarize_speed(steps: list[dict], warmup: int) -> dict:
    """steps: [{"step_s", "tokens", "generate_s", "train_s"}] -> steady-state numbers."""
    timed = steps[warmup:]
    secs = sum(s["step_s"] for s in timed)
    return {"steps": len(steps), "timed_steps": len(timed), "tokens_per_s": sum(s["tokens"] for s in timed) / secs,
            "step_s_median": statistics.median(s["step_s"] for s in timed),
            "generate_s_per_step": statistics.mean(s["generate_s"] for s in timed),
            "train_s_per_step": statistics.mean(s["train_s"] for s in timed),
            "tokens_per_step": statistics.mean(s["tokens"] for s in timed)}


def speed(work: Path, p: dict, runs: list[str]) -> dict:
    results = {}
    for name in runs:
        print(f"speed: {name} ...", flush=True)
        if name == "potstill":
            run, records = run_potstill(work, p, "speed-potstill", onpolicy=True, steps=p["speed_steps"], lr=SPEED_LR,
                                        warmup=0, ckpt_every=None)
            if run["rc"] != 0 or len(records) < p["speed_steps"]:
                results[name] = {"error": fail("potstill on-policy", run), "run": run}
                print(results[name]["error"], flush=True)
                continue
            steps = [{"step_s": r["step_time_s"], "tokens": r["tokens_per_s"] * r["step_time_s"],
                      "generate_s": r.get("time/generate_s", float("nan")),
                      "train_s": r.get("time/train_s", float("nan"))} for r in records]
            extra = {"completion_len": statistics.mean(r.get("onpolicy/completion_len", float("nan"))
                                                       for r in records[p["warmup"]:]),
                     "onpolicy_fraction": statistics.mean(r.get("onpolicy/fraction", float("nan")) for r in records),
                     "teacher_nll": records[-1].get("onpolicy/teacher_nll"),
                     "peak_mem_mb_logged": max(r.get("peak_mem_mb", 0) for r in records)}
        else:
            run = launch(child_cmd(name, work, p), work / f"speed-{name}.log")
            result_path = work / f"{name}-result.json"
            if run["rc"] != 0 or not result_path.is_file():
                results[name] = {"error": fail(name, run), "run": run}
                print(results[name]["error"], flush=True)
                continue
            r = json.loads(result_path.read_text())
            steps = [{"step_s": s, "tokens": t, "generate_s": g, "train_s": s - g}
                     for s, t, g in zip(r["step_s"], r["tokens"], r["generate_s"])]
            extra = {"threads": r["threads"], "generation_config": r["generation_config"]}
        results[name] = {**summarize_speed(steps, p["warmup"]), **extra, "run": run, "per_step": steps}
        s = results[name]
        print(f"  {s['tokens_per_s']:.0f} tokens/s, {s['step_s_median']:.2f} s/step (generate "
              f"{s['generate_s_per_step']:.2f} + train {s['train_s_per_step']:.2f}), peak RSS "
              f"{run['peak_rss_mb']:.0f} MB, loadavg {run['loadavg_before'][0]:.2f}", flush=True)
    return results


def cumulative(records: list[dict], ckpt_every: int | None) -> list[dict]:
    """Per step: cumulative tokens and training seconds (the step after a checkpoint write counts
    as the median step: its window holds the write)."""
    med = statistics.median(r["step_time_s"] for r in records) if records else 0.0
    tokens = secs = 0.0
    out = []
    for r in records:
        step = r["step"] if "step" in r else len(out) + 1
        dt = r["step_time_s"]
        if ckpt_every and step > 1 and (step - 1) % ckpt_every == 0:
            dt = med
        tokens += r["tokens_per_s"] * r["step_time_s"]
        secs += dt
        out.append({"step": step, "tokens": tokens, "train_s": secs})
    return out


def checkpoints(run_dir: Path) -> dict[int, Path]:
    return {int(d.name.split("-")[1]): d / "student" for d in (run_dir / "checkpoints").glob("step-*")
            if (d / "student" / "config.json").is_file()}


def quality(work: Path, p: dict) -> dict:
    ck = p["ckpt_every"]
    print(f"quality: on-policy, {p['quality_steps']} steps ...", flush=True)
    on_run, on_records = run_potstill(work, p, "quality-onpolicy", onpolicy=True, steps=p["quality_steps"],
                                      lr=QUALITY_LR, warmup=QUALITY_WARMUP, ckpt_every=ck)
    if on_run["rc"] != 0:
        return {"error": fail("potstill on-policy (quality)", on_run), "onpolicy_run": on_run}
    on_cum = cumulative(on_records, ck)
    target_s, target_tokens = on_cum[-1]["train_s"], on_cum[-1]["tokens"]
    print(f"  {len(on_records)} steps, {target_tokens:.0f} tokens, {target_s:.1f} training seconds", flush=True)

    def enough(records):
        c = cumulative(records, ck)
        return bool(c) and c[-1]["train_s"] >= target_s and c[-1]["tokens"] >= target_tokens

    print("quality: off-policy until the same training seconds ...", flush=True)
    off_run, off_records = run_potstill(work, p, "quality-offpolicy", onpolicy=False, steps=20 * p["quality_steps"],
                                        lr=QUALITY_LR, warmup=QUALITY_WARMUP, ckpt_every=ck, stop_when=enough)
    if off_run["rc"] != 0 and not off_run["stopped_by_signal"]:
        return {"error": fail("potstill off-policy (quality)", off_run), "offpolicy_run": off_run}
    off_cum = cumulative(off_records, ck)
    off_ckpts = checkpoints(work / "quality-offpolicy")
    on_ckpts = checkpoints(work / "quality-onpolicy")
    by_step = {c["step"]: c for c in off_cum}
    usable = [s for s in off_ckpts if s in by_step]
    same_tokens = min(usable, key=lambda s: abs(by_step[s]["tokens"] - target_tokens))
    same_time = min(usable, key=lambda s: abs(by_step[s]["train_s"] - target_s))
    on_final = work / "quality-onpolicy" / "student"
    if not (on_final / "config.json").is_file():
        on_final = on_ckpts[max(on_ckpts)]
    print(f"  off-policy: {len(off_records)} steps; same tokens -> step {same_tokens} "
          f"({by_step[same_tokens]['tokens']:.0f}), same seconds -> step {same_time} "
          f"({by_step[same_time]['train_s']:.1f} s)", flush=True)
    models = {"teacher": str(DEMO_TEACHER), "student init": str(work / "student-init"),
              "on-policy (jsd)": str(on_final),
              f"off-policy (fkl), same tokens (step {same_tokens})": str(off_ckpts[same_tokens]),
              f"off-policy (fkl), same seconds (step {same_time})": str(off_ckpts[same_time])}
    print("quality: evaluating ...", flush=True)
    ev_run = launch(child_cmd("evaluate", work, p, models=json.dumps(models)), work / "evaluate.log")
    if ev_run["rc"] != 0:
        return {"error": fail("evaluation", ev_run), "evaluate_run": ev_run}
    scores = json.loads((work / "evaluate-result.json").read_text())
    rows = {}
    for name, path in models.items():
        row = dict(scores[name])
        if name.startswith("on-policy"):
            row.update(steps=len(on_records), tokens=target_tokens, train_s=target_s)
        elif name.startswith("off-policy"):
            s = same_tokens if "same tokens" in name else same_time
            row.update(steps=s, tokens=by_step[s]["tokens"], train_s=by_step[s]["train_s"])
        rows[name] = row
    gen_s = [r.get("time/generate_s") for r in on_records if r.get("time/generate_s") is not None]
    return {"rows": rows, "example_prompt": scores.get("_example_prompt"),
            "onpolicy": {"run": on_run, "steps": len(on_records), "tokens": target_tokens, "train_s": target_s,
                         "generate_s_total": sum(gen_s) if gen_s else None,
                         "completion_len_mean": statistics.mean(r.get("onpolicy/completion_len", float("nan"))
                                                                for r in on_records),
                         "loss_first_last": [on_records[0].get("loss"), on_records[-1].get("loss")]},
            "offpolicy": {"run": off_run, "steps": len(off_records), "tokens": off_cum[-1]["tokens"] if off_cum else None,
                          "train_s": off_cum[-1]["train_s"] if off_cum else None,
                          "loss_first_last": [off_records[0].get("loss"), off_records[-1].get("loss")]
                          if off_records else None},
            "evaluate_run": ev_run}


def print_speed(res: dict) -> dict:
    print("\n| run | tokens/s | s / step (median) | generate s / step | train s / step | tokens / step | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in res.items():
        if "error" in r:
            print(f"| {name} | error: {r['error'].splitlines()[0]} | | | | | |")
            continue
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['step_s_median']:.3f} | {r['generate_s_per_step']:.3f} | "
              f"{r['train_s_per_step']:.3f} | {r['tokens_per_step']:.0f} | {r['run']['peak_rss_mb']:.0f} |")
    ratios = {}
    pot = res.get("potstill", {})
    for base in ("trl", "trl_gkd"):
        b = res.get(base, {})
        if "tokens_per_s" in pot and "tokens_per_s" in b:
            ratios[base] = {"tokens_per_s": pot["tokens_per_s"] / b["tokens_per_s"],
                            "peak_rss": pot["run"]["peak_rss_mb"] / b["run"]["peak_rss_mb"],
                            "generate_s": pot["generate_s_per_step"] / b["generate_s_per_step"],
                            "train_s": pot["train_s_per_step"] / b["train_s_per_step"]}
            q = ratios[base]
            print(f"potstill / {base}: tokens/s {q['tokens_per_s']:.2f}x (target >= 1.5), peak RSS "
                  f"{q['peak_rss']:.2f}x (target <= 0.6); generation s/step {q['generate_s']:.2f}x, "
                  f"training s/step {q['train_s']:.2f}x")
    return ratios


def print_quality(res: dict) -> None:
    if "error" in res:
        print("\nquality: " + res["error"])
        return
    print("\n| model | steps | train tokens | train s | teacher NLL greedy | teacher NLL sampled | held-out ppl | "
          "len greedy / sampled | EOS greedy / sampled | distinct 3-grams greedy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in res["rows"].items():
        steps = r.get("steps", "")
        tokens = f"{r['tokens']:.0f}" if "tokens" in r else ""
        secs = f"{r['train_s']:.0f}" if "train_s" in r else ""
        print(f"| {name} | {steps} | {tokens} | {secs} | {r['teacher_nll_greedy']:.3f} | {r['teacher_nll_sampled']:.3f} | "
              f"{r['heldout_ppl']:.2f} | {r['completion_len_greedy']:.1f} / {r['completion_len_sampled']:.1f} | "
              f"{r['eos_fraction_greedy']:.2f} / {r['eos_fraction_sampled']:.2f} | {r['distinct_3grams_greedy']:.2f} |")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("potstill", "torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small batch, short generations, few steps")
    ap.add_argument("--only", choices=("speed", "quality"), default=None)
    ap.add_argument("--runs", default=",".join(RUNS), help="speed runs, of " + ", ".join(RUNS))
    ap.add_argument("--speed-steps", type=int, default=None)
    ap.add_argument("--quality-steps", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--params", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return 0

    p = dict(SIZES["quick" if args.quick else "full"])
    for key in ("speed_steps", "quality_steps", "max_new_tokens", "batch"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if set(runs) - set(RUNS):
        raise SystemExit(f"unknown runs {sorted(set(runs) - set(RUNS))}; choose from {', '.join(RUNS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="potstill-bench-onpolicy-"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or HERE / "results" / ("onpolicy-quick.json" if args.quick else "onpolicy.json")
    started = time.perf_counter()
    load_start = os.getloadavg()
    print(f"working in {work}; loadavg {load_start}; {json.dumps(p)}", flush=True)
    prep = launch(child_cmd("prepare", work, p), work / "prepare.log")
    if prep["rc"] != 0:
        raise SystemExit(fail("prepare", prep))
    data = json.loads((work / "prepare.json").read_text())
    print(f"data: {json.dumps(data)}", flush=True)

    record = {"command": "python bench/onpolicy.py " + " ".join(sys.argv[1:]), "params": p, "data": data,
              "speed_lr": SPEED_LR, "quality_lr": QUALITY_LR, "versions": versions(),
              "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "loadavg_start": load_start}}
    if args.only in (None, "speed"):
        sp = speed(work, p, runs)
        record["speed"] = sp
        record["speed_ratios"] = print_speed(sp)
    if args.only in (None, "quality"):
        q = quality(work, p)
        record["quality"] = q
        print_quality(q)
    record["machine"]["loadavg_end"] = os.getloadavg()
    record["wall_s"] = time.perf_counter() - started
    loads = [r["run"]["loadavg_before"][0] for r in record.get("speed", {}).values() if "run" in r]
    record["machine"]["note"] = ("1-minute load average before each speed run: " + ", ".join(f"{x:.2f}" for x in loads)
                                 + f" on {os.cpu_count()} CPUs (above ~0.5 means other work was running)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {out} ({record['wall_s']:.0f} s)")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
