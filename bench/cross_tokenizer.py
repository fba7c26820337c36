"""Benchmark: distilling across tokenizers (teacher byte-level BPE, student Unigram).

The pair is ``bench/xtok_common.py``'s: the bundled demo teacher (16.9M-parameter Llama,
byte-level BPE of 8192 tokens) and a student of the quickstart's size with a SentencePiece-style
Unigram tokenizer of 8192 tokens, from one seeded random init for every run. The quickstart's
run settings (batch 16 x 256 tokens, lr 3e-3, cosine), the same steps for every run, and the
same data (the python-docs train split thinned to every m-th row, ``<out>/train-subset.jsonl``):

* ``ce``: cross-entropy only, no teacher;
* ``seqkd``: sequence-level KD: ``potstill generate`` lets the teacher write a docstring for the
  first line (the qualified name) of each train-subset row; the student trains with CE on
  ``name + teacher's answer`` as plain text, for the same steps x batch x length (packed blocks),
  so the same token budget (2048 prompts by default, max_new_tokens 128: the generations are
  cycled, the table says how many epochs);
* ``kd``: cross-tokenizer KD online (``loss.cross_tokenizer`` defaults: hybrid, top_k 64),
  ``loss.logits.weight=1`` plus ``loss.ce.weight=1`` (tokens that do not align get CE only);
* ``kd_ce0``: the same with ``loss.ce.weight=0`` (optional, not in the default list);
* ``kd_cache``: ``kd`` from a cache captured once with ``cache.offsets=true``, ``cache.k=64``.

Every run is a ``potstill`` CLI call in a subprocess. Columns: test-split bits per UTF-8 byte
of each trained student, ``potstill evaluate --data test.jsonl`` (every example in its own row,
each model on its own tokens; the teacher's for reference), training tokens/s (median of the
logged windows), peak memory (the run summary's), wall time of the run and of the capture /
generation.

    python bench/cross_tokenizer.py                    # 120 steps, writes bench/results/cross_tokenizer.json
    python bench/cross_tokenizer.py --steps 4 --out /tmp/xtok-smoke --runs ce,kd --json /tmp/xtok-smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline import median_tokens_per_s, thin_train_split  # noqa: E402
from xtok_common import prepare  # noqa: E402

ALL_RUNS = ("ce", "seqkd", "kd", "kd_cache", "kd_ce0")
DEFAULT_RUNS = ("ce", "seqkd", "kd", "kd_cache")
LABELS = {"ce": "CE only (no teacher)", "seqkd": "SeqKD (CE on teacher generations)",
          "kd": "cross-tokenizer KD online (hybrid, +CE)", "kd_ce0": "cross-tokenizer KD online (hybrid, no CE)",
          "kd_cache": "cross-tokenizer KD from cache (offsets, k=64)"}
TOP_K = 64
BATCH, LENGTH = 16, 256


def sh(cmd: list[str], log: Path) -> tuple[float, str]:
    """Run a potstill command, its output teed to ``log``; (wall seconds, output)."""
    print("   $ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout)
    if proc.returncode:
        print(proc.stdout[-4000:], flush=True)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; log {log}")
    return wall, proc.stdout


def base_config(run: Path, steps: int, init: Path, subset: Path, *, ce_only: bool) -> dict:
    from potstill.commands.quickstart import run_config
    from potstill.data.corpus import python_docs_split_path

    cfg = run_config(run, steps, init, ce_only=ce_only).model_dump(mode="json")
    cfg["data"].update(source=str(subset), validation_split=None,
                       validation_source=str(python_docs_split_path("validation")))
    cfg["train"].update(checkpoint_every=steps, log_every=max(1, steps // 24))
    cfg["eval"].update(every=None, max_batches=8)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def make_prompts(subset: Path, out: Path, n: int) -> Path:
    """First line of each train-subset text + a blank line: the teacher writes the rest."""
    rows = [json.loads(line)["text"] for line in subset.read_text(encoding="utf-8").splitlines()]
    path = out / "seqkd-prompts.jsonl"
    text = "".join(json.dumps({"prompt": t.split("\n", 1)[0][:200] + "\n\n"}) + "\n" for t in rows[:n])
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def generations_as_text(gen: Path, out: Path, student_tokenizer: Path) -> tuple[Path, dict]:
    """The generate output as plain text rows (prompt + completion), and token counts."""
    from transformers import AutoTokenizer

    from potstill.commands.quickstart import demo_teacher_path

    t_tok = AutoTokenizer.from_pretrained(demo_teacher_path())
    s_tok = AutoTokenizer.from_pretrained(student_tokenizer)
    rows = [json.loads(line) for line in gen.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [r["prompt"] + r["completion"] for r in rows]
    path = out / "seqkd-text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    comp_t = sum(len(t_tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)
    text_s = sum(len(s_tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return path, {"generations": len(rows), "generated_teacher_tokens": comp_t, "seqkd_text_student_tokens": text_s}


def evaluate(model: Path, test: Path, out_json: Path, log: Path) -> dict:
    if not out_json.is_file():
        sh(["potstill", "evaluate", str(model), "--data", str(test), "--max-length", str(LENGTH),
            "--batch-size", str(BATCH), "--precision", "fp32", "--json", str(out_json), "--no-progress"], log)
    return json.loads(out_json.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default="/tmp/xtok-bench")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma list of {', '.join(ALL_RUNS)}")
    parser.add_argument("--json", default="bench/results/cross_tokenizer.json")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="seqkd: generate.max_new_tokens")
    parser.add_argument("--prompts", type=int, default=2048,
                        help="seqkd: prompts the teacher answers (about 10 answers a second on 2 cores; the "
                             "student cycles over them for the run's token budget)")
    args = parser.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if r not in ALL_RUNS]
    if bad:
        parser.error(f"unknown runs {bad}")

    from potstill.commands.quickstart import demo_teacher_path
    from potstill.data.corpus import python_docs_split_path

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    out = Path(args.out)
    pair = prepare(out)  # the tokenizer and init are shared by every --steps
    init, teacher = pair["init"], demo_teacher_path()
    out = out / f"steps-{args.steps}"  # runs, caches, generations and scores of this step count
    out.mkdir(exist_ok=True)
    subset, stride = thin_train_split(out, args.steps * BATCH)
    test = python_docs_split_path("test")
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    extra: dict = {"teacher": {}, "loads": {"start": load_start}}

    tscore = evaluate(teacher, test, out / "eval-teacher.json", logs / "eval-teacher.log")
    extra["teacher"] = {"test_bpb": tscore.get("bpb"), "test_bpc": tscore.get("bpc"), "tokens": tscore.get("tokens"),
                        "bytes": tscore.get("bytes")}
    print(f"== teacher: test bpb {tscore.get('bpb'):.4f}", flush=True)

    for name in runs:
        run = out / name
        row: dict = {"label": LABELS[name]}
        cfg = base_config(run, args.steps, init, subset, ce_only=name in ("ce", "seqkd"))
        if name.startswith("kd"):
            cfg["loss"]["ce"]["weight"] = 0.0 if name == "kd_ce0" else 1.0
            cfg["loss"].setdefault("cross_tokenizer", {})["top_k"] = TOP_K
        print(f"== {name}: {row['label']}", flush=True)
        if name == "seqkd":
            gen = out / f"seqkd-gen-{args.max_new_tokens}.jsonl"
            n_prompts = args.prompts
            prompts = make_prompts(subset, out, n_prompts)
            assert n_prompts <= len(subset.read_text().splitlines()), "--prompts: more than the train subset has"
            gcfg = base_config(out / "gen-run", args.steps, init, prompts, ce_only=True)
            gcfg["generate"] = {**gcfg.get("generate", {}), "output": str(gen), "max_new_tokens": args.max_new_tokens,
                                "temperature": 1.0, "batch_size": 128, "seed": 0,
                                "max_prompt_length": 128}
            gfile = write_config(gcfg, out / "seqkd-generate.yaml")
            gsum = out / "seqkd-generate.json"
            if not gsum.is_file():
                wall, _ = sh(["potstill", "generate", str(gfile), "--no-progress"], logs / "seqkd-generate.log")
                gsum.write_text(json.dumps({"generate_wall_s": wall}))
            row.update(json.loads(gsum.read_text()))
            text, counts = generations_as_text(gen, out, pair["tokenizer"])
            row.update(counts, prompts=n_prompts, max_new_tokens=args.max_new_tokens)
            row["seqkd_epochs"] = args.steps * BATCH * LENGTH / max(counts["seqkd_text_student_tokens"], 1)
            cfg["data"]["source"] = str(text)
        if name == "kd_cache":
            cache = out / f"cache-offsets-k{TOP_K}"
            ccfg = write_config(cfg, out / "kd_cache-capture.yaml")
            csum = out / "kd_cache-capture.json"
            if not csum.is_file():
                wall, _ = sh(["potstill", "cache-teacher", str(ccfg), "cache.offsets=true", f"cache.k={TOP_K}",
                              f"cache.dir={cache}", "--no-progress"], logs / "kd_cache-capture.log")
                manifest = json.loads((cache / "manifest.json").read_text()) if (cache / "manifest.json").is_file() else {}
                size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
                csum.write_text(json.dumps({
                    "capture_wall_s": wall, "capture_s": manifest.get("capture_seconds"), "cache_bytes": size,
                    "cached_tokens": manifest.get("n_rows"), "bytes_per_token": manifest.get("bytes_per_token")}))
            row.update(json.loads(csum.read_text()))
            cfg["teacher"]["cache"] = str(cache)
            cfg["teacher"]["tokenizer"] = str(teacher)
        cfile = write_config(cfg, out / f"{name}.yaml")
        if not (run / "summary.json").is_file():  # a finished run (from an earlier call) is only scored again
            row["train_wall_s"], log_text = sh(["potstill", "distill", str(cfile), "--no-progress"], logs / f"{name}.log")
        else:
            log_text = (logs / f"{name}.log").read_text() if (logs / f"{name}.log").is_file() else ""
        m = re.search(r"cross-tokenizer alignment.*", log_text)
        if m:
            row["alignment_line"] = m.group(0)
            print("   " + m.group(0), flush=True)
        summary = json.loads((run / "summary.json").read_text())
        row["peak_mem_mb"] = find_key(summary, "peak_mem_mb")
        row["alignment"] = find_key(summary, "alignment") or find_key(summary, "cross_tokenizer")
        row["tokens_per_s"] = median_tokens_per_s(run)
        score = evaluate(run / "student", test, out / f"eval-{name}.json", logs / f"eval-{name}.log")
        row.update(test_bpb=score.get("bpb"), test_bpc=score.get("bpc"), test_ppl=score.get("ppl"),
                   test_tokens=score.get("tokens"), test_bytes=score.get("bytes"))
        results[name] = row
        print(f"   {json.dumps({k: v for k, v in row.items() if k != 'alignment_line'})}", flush=True)
        write_record(args, runs, results, extra, stride, t_start)
    write_record(args, runs, results, extra, stride, t_start, final=True)
    return 0


def find_key(obj, key):
    """The first value of ``key`` anywhere in a nested dict (summary.json layouts vary)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = find_key(v, key)
            if found is not None:
                return found
    return None


def write_record(args, runs, results, extra, stride, t_start, final: bool = False) -> None:
    runs = [r for r in runs if r in results]
    ref = results.get("ce")
    head = ["run", "test bpb", "vs CE", "tokens/s", "peak MB", "train s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t = extra["teacher"]
    lines.append(f"| teacher (reference, 16.9M, BPE) | {t['test_bpb']:.4f} | - | - | - | - | {t['tokens']} tokens, "
                 f"{t['bytes']} bytes scored |")
    for name in runs:
        r = results[name]
        rel = f"{(r['test_bpb'] / ref['test_bpb'] - 1) * 100:+.1f}%" if ref else "-"
        note = ""
        if name == "seqkd":
            note = (f"{r['generations']} generations, {r['generated_teacher_tokens']} generated teacher tokens "
                    f"(max_new_tokens {r['max_new_tokens']}, {r['generate_wall_s']:.0f} s); "
                    f"{r['seqkd_text_student_tokens']} student tokens of text, {r['seqkd_epochs']:.2f} epochs")
        if name == "kd_cache":
            note = (f"capture {r['capture_wall_s']:.0f} s (teacher passes {r['capture_s'] or float('nan'):.0f} s), "
                    f"cache {r['cache_bytes'] / 2**20:.1f} MiB")
            if "kd" in results:
                note += f"; bpb vs kd {(r['test_bpb'] / results['kd']['test_bpb'] - 1) * 100:+.2f}%"
        if name == "ce":
            note = f"{r['test_bytes']} bytes scored"
        peak = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") else "-"
        lines.append(f"| {r['label']} | {r['test_bpb']:.4f} | {rel} | {r['tokens_per_s']:.0f} | {peak} | "
                     f"{r.get('train_wall_s', float('nan')):.0f} | {note} |")
    table = "\n".join(lines).replace("| nan |", "| - |")
    extra["loads"]["end"] = os.getloadavg()
    if final:
        print(table)
        for name in runs:
            if results[name].get("alignment_line"):
                print(f"{name}: {results[name]['alignment_line']}")
    import potstill
    import transformers

    record = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
              "batch": BATCH, "length": LENGTH, "train_row_stride": stride, "potstill": potstill.__version__,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
              "loadavg": extra["loads"], "idle": max(extra["loads"]["start"][0], extra["loads"]["end"][0]) < 0.5,
              "wall_s": time.perf_counter() - t_start, "teacher": extra["teacher"], "results": results, "table": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    if final:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    raise SystemExit(main())
