"""Benchmark: how the student starts (issue #18): pruned, layer-dropped or random; LoRA against full.

The pair is the quickstart's teacher (the bundled demo teacher: Llama, 6 blocks, width 384, 6
heads, MLP 1024, 17M parameters, 8192-token vocabulary, trained on python-docs) and the
python-docs corpus (train split for training, validation for the runs' own evaluation, test for
the table). Every run is ``python -m potstill distill`` in its own process with the quickstart's
KD settings (forward KL, T=1, no CE, lr 3e-3 cosine, batch 16 x 256, bf16 autocast where the CPU
has it), the same steps, data order and seed; only ``student`` differs.

1. Starts (``--only starts``), all students of the same size: the layer-dropped one's, 3 of the
   teacher's 6 blocks at full width (11.6M parameters):

   | run | student |
   | --- | --- |
   | ``random``       | ``student.config``: the layer-dropped shape, random init (seed 0) |
   | ``layer_dropped``| ``student.from_teacher.every: 2`` (blocks 0, 2, 4) |
   | ``depth_pruned`` | ``student.from_teacher.prune.num_layers: 3``: the 3 blocks that change the hidden state most (Block Influence) |
   | ``width_pruned`` | ``student.from_teacher.prune.params: <the layer-dropped count>``: all 6 blocks, hidden and MLP widths shrunk by one ratio, heads and channels by activation importance (Minitron) |

   Target (printed, not asserted): a pruned start + KD ends below layer-dropped + KD and below
   random + KD in test perplexity. The students before training are scored too.

2. LoRA (``--only lora``): the width-pruned student (pruned once here and saved, as a run
   prunes it) trained whole (``full``) and through LoRA r=16, alpha 32 on every linear layer but
   the head (``lora16``, lr 1e-3, a usual adapter rate; everything else the same). Reported: the
   model state the run holds (weights, gradients, AdamW state: ``model_state_mb``), its peak RSS
   during training (``peak_mem_mb`` of metrics.jsonl) and over the whole process (VmHWM, by
   ``wait4``: loading and the final evaluation too), median tokens/s of its steps, test
   perplexity and KL to the teacher after the same steps.

    python bench/students.py                 # both parts, 240 steps (~45 min on 2 idle cores)
    python bench/students.py --only starts --steps 120
    python bench/students.py --quick         # 10 steps each: a smoke run (~4 min)

Results: ``bench/results/students.json`` (the table, every run's numbers, the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gold import load, run_child  # noqa: E402
from offline import median_tokens_per_s  # noqa: E402

from potstill.training.metrics import read_metrics  # noqa: E402

STARTS = ("random", "layer_dropped", "depth_pruned", "width_pruned")
LORA_RUNS = ("full", "lora16")
LABELS = {"random": "random init + KD", "layer_dropped": "layer-dropped (every 2nd block) + KD",
          "depth_pruned": "depth-pruned (3 blocks by importance) + KD",
          "width_pruned": "width-pruned (Minitron, same params) + KD",
          "full": "width-pruned student, full training", "lora16": "width-pruned student, LoRA r=16"}
TEACHER_LAYERS = 6


def run_config(out: Path, steps: int, student: dict) -> dict:
    """The quickstart's KD run with ``student`` as the student section."""
    from potstill.commands.quickstart import run_config as quickstart_config

    cfg = quickstart_config(out, steps, Path("unused")).model_dump(mode="json")
    cfg["student"] = student
    cfg["train"].update(checkpoint_every=steps, log_every=max(1, steps // 24))
    cfg["eval"].update(every=None, max_batches=8)
    cfg["output"].update(report=False, tensorboard=False)
    return cfg


def layer_dropped_params() -> tuple[int, dict]:
    """The parameter count and config fields of the layer-dropped student (3 of 6 blocks)."""
    from transformers import AutoConfig

    from potstill.commands.quickstart import demo_teacher_path
    from potstill.models.pruning import count_parameters

    config = AutoConfig.from_pretrained(demo_teacher_path())
    config.num_hidden_layers = TEACHER_LAYERS // 2
    fields = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "max_position_embeddings",
                                              "rms_norm_eps", "tie_word_embeddings")}
    fields["num_hidden_layers"] = TEACHER_LAYERS // 2
    return count_parameters(config), fields


def student_section(name: str, params: int, fields: dict, pruned_init: Path | None) -> dict:
    if name == "random":
        return {"config": {"model_type": "llama", **fields}}
    if name == "layer_dropped":
        return {"from_teacher": {"every": 2}}
    if name == "depth_pruned":
        return {"from_teacher": {"prune": {"num_layers": TEACHER_LAYERS // 2}}}
    if name == "width_pruned":
        return {"from_teacher": {"prune": {"params": params}}}
    section = {"name_or_path": str(pruned_init)}
    if name == "lora16":
        section["lora"] = {"r": 16, "alpha": 32}
    return section


def train(name: str, cfg: dict, out: Path, env: dict) -> dict:
    """Run one distillation in its own process; its wall time, peak RSS, tokens/s and summary."""
    run_dir = Path(cfg["output"]["dir"])
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        config_path = out / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        before = load()
        print(f"-- {name}: {LABELS[name]} (load {before})", flush=True)
        rc, wall, peak = run_child([sys.executable, "-m", "potstill", "distill", str(config_path), "--no-progress"],
                                   out / f"{name}.log", env)
        if rc:
            raise SystemExit(f"{name} failed ({rc}): see {out / f'{name}.log'}")
        (run_dir / "bench.json").write_text(json.dumps({"wall_s": wall, "peak_rss_mb": peak, "load_before": before,
                                                        "load_after": load()}))
    summary = json.loads(summary_path.read_text())
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r][-1]
    return {**json.loads((run_dir / "bench.json").read_text()), "label": LABELS[name],
            "train_peak_mb": last.get("peak_mem_mb"), "model_state_mb": last.get("model_state_mb"),
            "tokens_per_s": median_tokens_per_s(run_dir), "params": summary["student_parameters"],
            "trained_params": summary.get("trained_parameters"), "student_dir": str(run_dir / "student")}


def initial_students(out: Path, cfgs: dict[str, dict]) -> dict[str, Path]:
    """Each start's student before training, saved (built as its run builds it) for the table."""
    import torch

    from potstill.config import as_config
    from potstill.data import build_datasets
    from potstill.models.preflight import preflight
    from potstill.training.setup import calibration_batches, load_models

    paths = {}
    for name, raw in cfgs.items():
        path = out / f"init-{name}"
        paths[name] = path
        if (path / "config.json").is_file():
            continue
        cfg = as_config(raw)
        checked = preflight(cfg, role="distill", check_data=False)
        train_ds, _ = build_datasets(cfg.data, checked.tokenizer, seed=cfg.train.seed, progress=False)
        torch.manual_seed(cfg.train.seed)  # as a run seeds before building its models
        _, student, tokenizer, _ = load_models(cfg, "fp32", checked, calibration=calibration_batches(
            train_ds, cfg.train.batch_size, checked.tokenizer.pad_token_id, torch.device("cpu")))
        student.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return paths


def table(rows: dict[str, dict], names: tuple[str, ...], ref: str) -> str:
    head = ["run", "params", "trained", "test ppl before", "test ppl", "vs " + ref, "test KL", "agreement",
            "tokens/s", "model state MB", "train peak MB", "process peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows.get(ref)
    for name in names:
        r = rows.get(name)
        if r is None:
            continue
        rel = f"{(r['test_ppl'] / base['test_ppl'] - 1) * 100:+.2f}%" if base else "-"
        before = f"{r['test_ppl_before']:.1f}" if r.get("test_ppl_before") else "-"
        trained = f"{r['trained_params'] / 1e6:.2f}M" if r.get("trained_params") else "-"
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f}M | {trained} | {before} | {r['test_ppl']:.3f} | {rel} "
                     f"| {r['test_kl']:.4f} | {r['agreement']:.3f} | {r['tokens_per_s']:.0f} | {r['model_state_mb']:.0f} "
                     f"| {r['train_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--only", choices=("starts", "lora"))
    parser.add_argument("--quick", action="store_true", help="10 steps per run: a smoke test")
    parser.add_argument("--out", default="/tmp/students-bench")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "students.json"))
    args = parser.parse_args()
    steps = 10 if args.quick else args.steps
    out = Path(args.out) / f"steps-{steps}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    from potstill.commands.quickstart import demo_teacher_path, test_scores

    params, fields = layer_dropped_params()
    t0 = time.time()
    record: dict = {"command": " ".join(["python"] + sys.argv), "steps": steps, "batch": "16 x 256",
                    "target_params": params, "load_start": load(), "cpus": os.cpu_count(),
                    "machine": platform.machine(), "results": {}}
    results = record["results"]
    parts = (args.only,) if args.only else ("starts", "lora")
    if args.only and Path(args.json).is_file():  # keep the other part's figures from an earlier run
        earlier = json.loads(Path(args.json).read_text())
        other = LORA_RUNS if args.only == "starts" else STARTS
        results.update({k: v for k, v in earlier.get("results", {}).items() if k in other})
        for key in ("starts_table", "lora_table", "lora_ratios", "teacher_test_ppl"):
            if key in earlier and (key.startswith("lora") == (args.only == "starts") or key == "teacher_test_ppl"):
                record[key] = earlier[key]
        record["earlier_part"] = {"command": earlier.get("command"), "load_start": earlier.get("load_start"),
                                  "load_end": earlier.get("load_end"), "wall_s": earlier.get("wall_s")}
    if "starts" in parts:
        cfgs = {name: run_config(out / name, steps, student_section(name, params, fields, None)) for name in STARTS}
        inits = initial_students(out, cfgs)
        for name in STARTS:
            results[name] = train(name, cfgs[name], out, env)
        scores = test_scores({**{f"{n} before": p for n, p in inits.items()},
                              **{n: Path(results[n]["student_dir"]) for n in STARTS}}, demo_teacher_path(),
                             progress=False)
        record["teacher_test_ppl"] = scores["layer_dropped"].get("teacher_ppl")
        for name in STARTS:
            results[name].update(test_ppl=scores[name]["ppl"], test_kl=scores[name]["kl"],
                                 agreement=scores[name]["agreement"], test_ppl_before=scores[f"{name} before"]["ppl"])
        record["starts_table"] = table(results, STARTS, "layer_dropped")
        print(record["starts_table"], flush=True)
    if "lora" in parts:
        init = initial_students(out, {"width_pruned": run_config(
            out / "width_pruned", steps, student_section("width_pruned", params, fields, None))})["width_pruned"]
        for name in LORA_RUNS:
            cfg = run_config(out / name, steps, student_section(name, params, fields, init))
            if name == "lora16":
                cfg["train"]["lr"] = 1e-3
            results[name] = train(name, cfg, out, env)
        scores = test_scores({"base": init, **{n: Path(results[n]["student_dir"]) for n in LORA_RUNS}},
                             demo_teacher_path(), progress=False)
        record["teacher_test_ppl"] = scores["full"].get("teacher_ppl")
        for name in LORA_RUNS:
            results[name].update(test_ppl=scores[name]["ppl"], test_kl=scores[name]["kl"],
                                 agreement=scores[name]["agreement"], test_ppl_before=scores["base"]["ppl"])
        full, lora = results["full"], results["lora16"]
        record["lora_ratios"] = {"model_state": lora["model_state_mb"] / full["model_state_mb"],
                                 "train_peak": lora["train_peak_mb"] / full["train_peak_mb"],
                                 "peak_rss": lora["peak_rss_mb"] / full["peak_rss_mb"],
                                 "tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
                                 "test_ppl": lora["test_ppl"] / full["test_ppl"]}
        record["lora_table"] = table(results, LORA_RUNS, "full")
        print(record["lora_table"], flush=True)
        print("LoRA / full: " + ", ".join(f"{k} {v:.3f}x" for k, v in record["lora_ratios"].items()), flush=True)
    record.update(wall_s=time.time() - t0, load_end=load())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
