"""Benchmark: every logit divergence, the default objective, and balanced terms (issue #20).

The pair is the quickstart's: the bundled demo teacher (Llama, 6 blocks, width 384, 17M
parameters, trained on python-docs) and its student shape (4 blocks, width 128). Every run is
``python -m potstill distill`` in its own process with the quickstart's settings (lr 3e-3 cosine,
sequences of 256 tokens, bf16 autocast where the CPU has it, seed 0) at ``--steps`` steps of
``--batch`` sequences; only the ``loss`` section (and for part 2 the start and the data) differ.
Test metrics come from a held-out split the runs never see (its first 8 batches of 16 x 256
tokens, the same for every model): perplexity, KL(teacher || student)
and top-1 agreement with the teacher (potstill.training.evaluation.evaluate_models).

1. ``--only divergences``: every ``loss.logits.divergence`` at its defaults (cakld measures its
   confidence), T = 1, no CE, random-init student, python-docs. Reported besides the test
   metrics: median tokens/s of the steps, the training peak (``peak_mem_mb``) and the process's
   peak RSS.
2. ``--only defaults``: the objective (forward KL alone; CE alone; KD + CE 0.5; forward KL at
   T = 2 with T^2 scaling) x the start (random init; ``from_teacher.every: 2``,
   3 of the teacher's blocks at its width) x the data: the teacher's own domain (python-docs) or
   another (Python source: transformers' modeling files, split by file name, scored on files
   the run never saw).
3. ``--only balance``: logits + hidden states + attention relations on python-docs, from the
   layer-dropped start (widths match: no projector to learn), with fixed weights (1, 1, 1),
   fixed (1, 0.1, 0.1), fixed logits alone, ``gradnorm`` (target shares 1/1/1 and 1/0.1/0.1) and
   ``pcgrad``. The fixed runs log the
   per-term gradients too (``loss.log_term_gradients``) so their conflict is measured.
4. ``--only speed``: the loss alone (forward + backward of the chunked path) per divergence on
   one shape, relative to fkl: the cost of each divergence without the model around it.

    python bench/objectives.py --steps 40                 # all three (~40 min on 2 idle cores)
    python bench/objectives.py --only divergences --steps 40
    python bench/objectives.py --only speed                # the loss alone per divergence (~2 min)

Results: ``bench/results/objectives.json`` (tables, every run's numbers, the machine's load).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gold import load, run_child  # noqa: E402
from offline import median_tokens_per_s  # noqa: E402

from potstill.training.metrics import read_metrics  # noqa: E402

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "mse", "token_rkl", "soft_ce", "soft_mse", "cos",
               "logsum", "cakld", "akl", "hinge", "logistic_ranking", "sinkhorn")
OBJECTIVES = {
    "fkl": {"logits": {"weight": 1.0, "divergence": "fkl"}, "ce": {"weight": 0.0}},
    "ce": {"logits": {"weight": 0.0}, "ce": {"weight": 1.0}},
    "fkl+ce0.5": {"logits": {"weight": 1.0, "divergence": "fkl"}, "ce": {"weight": 0.5}},
    "fkl T2": {"logits": {"weight": 1.0, "divergence": "fkl", "temperature": 2.0, "t2_scaling": True},
               "ce": {"weight": 0.0}},
}
FEATURES = {"hidden": {"mapping": "uniform_last", "loss": "cosine"},
            "attention": {"mapping": "last"}}
TEST_BATCHES = 8  # 8 x 16 sequences of 256 tokens of the test split (the same ones for every model)
BALANCE_RUNS = {
    "logits only": ({"logits": 1.0, "hidden": 0.0, "attention": 0.0}, "fixed"),
    "fixed 1/1/1": ({"logits": 1.0, "hidden": 1.0, "attention": 1.0}, "fixed"),
    "fixed 1/0.1/0.1": ({"logits": 1.0, "hidden": 0.1, "attention": 0.1}, "fixed"),
    "gradnorm": ({"logits": 1.0, "hidden": 1.0, "attention": 1.0}, "gradnorm"),
    "gradnorm 1/0.1/0.1": ({"logits": 1.0, "hidden": 0.1, "attention": 0.1}, "gradnorm"),
    "pcgrad": ({"logits": 1.0, "hidden": 1.0, "attention": 1.0}, "pcgrad"),
}


def code_corpus(out: Path) -> dict[str, Path]:
    """Python source as text the teacher has not seen: transformers' modeling files, cut into
    ~2000-character rows; files of models named a-m train, n-z test (at most ~250 KB)."""
    paths = {"train": out / "code-train.jsonl", "test": out / "code-test.jsonl"}
    if all(p.is_file() for p in paths.values()):
        return paths
    import transformers

    files = sorted(glob.glob(str(Path(transformers.__file__).parent / "models" / "*" / "modeling_*.py")))
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for f in files:
        split = "train" if Path(f).parent.name[0] <= "m" else "test"
        text = Path(f).read_text(errors="ignore")
        rows[split] += [text[i:i + 2000] for i in range(0, len(text), 2000) if len(text[i:i + 2000]) > 200]
    budget = {"train": 8_000_000, "test": 250_000}
    for split, path in paths.items():
        kept, size = [], 0
        for r in rows[split]:
            if size > budget[split]:
                break
            kept.append(json.dumps({"text": r}))
            size += len(r)
        path.write_text("\n".join(kept) + "\n")
    return paths


def run_config(out: Path, steps: int, batch: int, student: dict, loss: dict, data: dict) -> dict:
    """The quickstart's run with ``student``, ``loss`` and ``data`` sections."""
    from potstill.commands.quickstart import run_config as quickstart_config

    cfg = quickstart_config(out, steps, Path("unused")).model_dump(mode="json")
    cfg["student"], cfg["data"] = student, {**cfg["data"], **data}
    base = cfg["loss"]
    cfg["loss"] = {**base, **json.loads(json.dumps(loss))}
    cfg["train"].update(batch_size=batch, checkpoint_every=steps, log_every=max(1, steps // 20))
    cfg["eval"].update(every=None, max_batches=4)
    cfg["output"].update(report=False, tensorboard=False)
    return cfg


def train(name: str, cfg: dict, out: Path, env: dict) -> dict:
    """One distillation in its own process: wall time, peak RSS, tokens/s, the logged gradients."""
    run_dir = Path(cfg["output"]["dir"])
    summary_path = run_dir / "summary.json"
    safe = name.replace(" ", "_").replace("/", "-")
    if not summary_path.is_file():
        config_path = out / f"{safe}.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        before = load()
        print(f"-- {name} (load {before})", flush=True)
        rc, wall, peak = run_child([sys.executable, "-m", "potstill", "distill", str(config_path), "--no-progress"],
                                   out / f"{safe}.log", env)
        if rc:
            raise SystemExit(f"{name} failed ({rc}): see {out / f'{safe}.log'}")
        (run_dir / "bench.json").write_text(json.dumps({"wall_s": wall, "peak_rss_mb": peak, "load_before": before,
                                                        "load_after": load()}))
    summary = json.loads(summary_path.read_text())
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    grads = {}
    for key in sorted({k for r in records for k in r if k.startswith(("grad_cos/", "grad_norm/", "balance/"))}):
        values = [r[key] for r in records if key in r]
        grads[key] = statistics.mean(values)
        if key.startswith("grad_cos/"):
            grads[key.replace("grad_cos/", "conflict_share/")] = sum(v < 0 for v in values) / len(values)
    return {**json.loads((run_dir / "bench.json").read_text()), "train_peak_mb": records[-1].get("peak_mem_mb"),
            "tokens_per_s": median_tokens_per_s(run_dir), "student_dir": str(run_dir / "student"),
            "measured": summary.get("measured", {}), **grads}


def scores(models: dict[str, Path], data: dict, *, teacher: Path) -> dict[str, dict]:
    """Test metrics of each student folder against the teacher on ``data`` (a DataConfig dict)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.config import DataConfig
    from potstill.data import build_datasets
    from potstill.models.loading import freeze
    from potstill.models.precision import autocast_context, resolve_precision
    from potstill.training.evaluation import evaluate_models

    tok = AutoTokenizer.from_pretrained(teacher)
    test, _ = build_datasets(DataConfig(**data, validation_fraction=0.0, max_length=256), tok, progress=False,
                             label="test")
    device = torch.device("cpu")
    autocast = autocast_context(resolve_precision("auto"), device)
    teacher_model = freeze(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32))
    common = dict(pad_token_id=tok.pad_token_id, batch_size=16, device=device, autocast=autocast, progress=False,
                  tokenizer=tok, max_batches=TEST_BATCHES)
    rows = {"teacher": evaluate_models(teacher_model, test, **common)}
    for name, path in models.items():
        model = freeze(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        rows[name] = evaluate_models(model, test, teacher=teacher_model, **common)
    return rows


def student_init(out: Path) -> Path:
    from potstill.commands.quickstart import make_student_init

    return make_student_init(out)


def divergences(args, out: Path, env: dict, record: dict) -> None:
    from potstill.commands.quickstart import demo_teacher_path

    init = student_init(out)
    results = record.setdefault("divergences", {})
    for name in DIVERGENCES:
        loss = {"logits": {"weight": 1.0, "divergence": name}, "ce": {"weight": 0.0}}
        cfg = run_config(out / f"div-{name}", args.steps, args.batch, {"name_or_path": str(init)}, loss, {})
        results[name] = train(f"divergence {name}", cfg, out, env)
    test = scores({n: Path(r["student_dir"]) for n, r in results.items()},
                  {"source": "python-docs", "split": "test"}, teacher=demo_teacher_path())
    record["teacher_test_ppl"] = test["teacher"]["ppl"]
    for name, r in results.items():
        r.update(test_ppl=test[name]["ppl"], test_kl=test[name]["kl"], agreement=test[name]["agreement"])
    head = ["divergence", "test ppl", "test KL", "agreement", "tokens/s", "train peak MB", "process peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in DIVERGENCES:
        r = results[name]
        extra = f" (γ={r['measured']['cakld_confidence']:.3f})" if r["measured"].get("cakld_confidence") else ""
        lines.append(f"| {name}{extra} | {r['test_ppl']:.2f} | {r['test_kl']:.4f} | {r['agreement']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['train_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    record["divergences_table"] = "\n".join(lines)
    print(record["divergences_table"], flush=True)


def defaults(args, out: Path, env: dict, record: dict) -> None:
    from potstill.commands.quickstart import demo_teacher_path

    init = student_init(out)
    code = code_corpus(out)
    datasets = {"python-docs": ({"source": "python-docs", "split": "train"}, {"source": "python-docs", "split": "test"}),
                "code": ({"source": str(code["train"]), "split": "train", "validation_split": None,
                          "validation_fraction": 0.02}, {"source": str(code["test"]), "split": "train"})}
    starts = {"random": {"name_or_path": str(init)}, "from_teacher": {"from_teacher": {"every": 2}}}
    results = record.setdefault("defaults", {})
    for data_name, (train_data, test_data) in datasets.items():
        runs = {}
        for start_name, student in starts.items():
            for obj_name, loss in OBJECTIVES.items():
                key = f"{data_name} | {start_name} | {obj_name}"
                cfg = run_config(out / f"def-{data_name}-{start_name}-{obj_name}".replace(" ", "_"), args.steps,
                                 args.batch, student, loss, train_data)
                results[key] = train(key, cfg, out, env)
                runs[key] = Path(results[key]["student_dir"])
        test = scores(runs, test_data, teacher=demo_teacher_path())
        record.setdefault("teacher_ppl_by_data", {})[data_name] = test["teacher"]["ppl"]
        for key in runs:
            results[key].update(test_ppl=test[key]["ppl"], test_kl=test[key]["kl"], agreement=test[key]["agreement"])
    head = ["data", "start", "objective", "test ppl", "test KL", "agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in results.items():
        lines.append("| " + " | ".join(key.split(" | ")) + f" | {r['test_ppl']:.2f} | {r['test_kl']:.4f} | "
                     f"{r['agreement']:.3f} |")
    record["defaults_table"] = "\n".join(lines)
    print(record["defaults_table"], flush=True)


def balance(args, out: Path, env: dict, record: dict) -> None:
    from potstill.commands.quickstart import demo_teacher_path

    results = record.setdefault("balance", {})
    for name, (weights, mode) in BALANCE_RUNS.items():
        loss = {"logits": {"weight": weights["logits"], "divergence": "fkl"}, "ce": {"weight": 0.0},
                "hidden": {**FEATURES["hidden"], "weight": weights["hidden"]},
                "attention": {**FEATURES["attention"], "weight": weights["attention"]}, "balance": mode,
                "log_term_gradients": mode == "fixed" and weights["hidden"] > 0}
        cfg = run_config(out / f"bal-{name}".replace(" ", "_").replace("/", "-"), args.steps, args.batch,
                         {"from_teacher": {"every": 2}}, loss, {})
        results[name] = train(f"balance {name}", cfg, out, env)
    test = scores({n: Path(r["student_dir"]) for n, r in results.items()},
                  {"source": "python-docs", "split": "test"}, teacher=demo_teacher_path())
    for name, r in results.items():
        r.update(test_ppl=test[name]["ppl"], test_kl=test[name]["kl"], agreement=test[name]["agreement"])
    head = ["run", "test ppl", "test KL", "agreement", "cos(logits, hidden)", "cos(logits, attention)",
            "steps in conflict (logits vs hidden)", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        def fmt(key, spec=".3f"):
            return format(r[key], spec) if key in r else "-"
        lines.append(f"| {name} | {r['test_ppl']:.2f} | {r['test_kl']:.4f} | {r['agreement']:.3f} | "
                     f"{fmt('grad_cos/logits_hidden')} | {fmt('grad_cos/logits_attention')} | "
                     f"{fmt('conflict_share/logits_hidden', '.0%')} | {r['tokens_per_s']:.0f} |")
    record["balance_table"] = "\n".join(lines)
    print(record["balance_table"], flush=True)


def loss_speed(args, out: Path, env: dict, record: dict) -> None:
    """The loss alone, per divergence: forward + backward of ``chunked_distill_loss`` on one shape
    (the quickstart pair's: 2048 rows, student width 128, teacher 384, vocabulary 8192, bf16
    autocast), median of 5 passes after a warmup, relative to fkl. Peak memory above the inputs:
    ``loss.py --measure-factor`` measures the chunk rows; here only time."""
    import torch

    from potstill.losses import chunked_distill_loss
    from potstill.models.precision import autocast_context, resolve_precision

    torch.manual_seed(0)
    n, hs, ht, v = 2048, 128, 384, 8192
    h = torch.randn(n, hs, requires_grad=True)
    w = (torch.randn(v, hs) / hs ** 0.5).requires_grad_()
    th, tw = torch.randn(n, ht), torch.randn(v, ht) / ht ** 0.5 * 2
    targets = torch.randint(0, v, (n,))
    autocast = autocast_context(resolve_precision("auto"), torch.device("cpu"))
    rows = {}
    for name in DIVERGENCES:
        params = {"cakld_confidence": 0.3} if name == "cakld" else None
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            with autocast():
                loss = chunked_distill_loss(h, w, targets, teacher_hidden=th, teacher_head=tw, divergence=name,
                                            params=params).weighted_sum
            loss.backward()
            times.append(time.perf_counter() - t0)
            h.grad = w.grad = None
        rows[name] = statistics.median(times[1:])
        print(f"-- loss {name}: {rows[name] * 1000:.0f} ms (load {load()})", flush=True)
    record["loss_speed"] = {name: {"seconds": t, "vs_fkl": t / rows["fkl"]} for name, t in rows.items()}
    lines = ["| divergence | loss forward + backward (ms) | vs fkl |", "|---|---|---|"]
    lines += [f"| {name} | {t * 1000:.0f} | {t / rows['fkl']:.2f}x |" for name, t in rows.items()]
    record["loss_speed_table"] = "\n".join(lines)
    print(record["loss_speed_table"], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--only", choices=("divergences", "defaults", "balance", "speed"), action="append")
    parser.add_argument("--out", default="/tmp/objectives-bench")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "objectives.json"))
    args = parser.parse_args()
    out = Path(args.out) / f"steps-{args.steps}-batch-{args.batch}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    record: dict = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    record.update({"cpus": os.cpu_count(), "machine": platform.machine()})
    parts = args.only or ["divergences", "defaults", "balance"]
    for part in parts:
        t0, start_load = time.time(), load()
        {"divergences": divergences, "defaults": defaults, "balance": balance, "speed": loss_speed}[part](
            args, out, env, record)
        record.setdefault("runs", {})[part] = {"command": " ".join(["python"] + sys.argv), "wall_s": time.time() - t0,
                                               "steps": args.steps, "batch": f"{args.batch} x 256",
                                               "load_start": start_load, "load_end": load()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
