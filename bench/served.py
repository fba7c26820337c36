"""Benchmark: a teacher served by vLLM against the same teacher in this process (issue #13).

The quickstart pair (the bundled demo teacher, 16.9M parameters; the quickstart's student
init, one seeded init for every run), the quickstart's run settings (16 x 256 tokens a step,
lr 3e-3, cosine, forward KL at temperature 1), the same steps and data for every run (every
m-th row of the python-docs train split, about one epoch of the run, as ``offline.py``):

| run | what |
| --- | --- |
| ``ce``         | cross-entropy only (``loss.logits.weight=0``, ``ce=1``): the memory baseline |
| ``local``      | dense forward KL, the teacher loaded in the training process (the quickstart's KD run) |
| ``cache``      | ``potstill cache-teacher`` in process (``cache.k=20``, ``value_bits=16``), then ``teacher.cache``: the local top-20 reference |
| ``served``     | ``teacher.server`` (vLLM, ``top_k=20``), ``lookahead=1``: the next step's targets asked while the student trains |
| ``served_la0`` | the same with ``lookahead=0``: no overlap |

and two captures of the same data: ``potstill cache-teacher`` in process and through the server.

Every run and capture is its own child process (``python -m potstill distill|cache-teacher
cfg.yaml --no-progress``, its config and log in ``--out``). Peak RSS is the child's
``ru_maxrss`` from ``os.wait4``: Linux carries the launcher's peak into a child at exec, so this
launcher never imports torch (the student init, the data subset and the test scores are made
in helper children). Tokens/s: the median of the run's ``metrics.jsonl`` windows after the
first few steps. Test perplexity: ``quickstart.test_scores`` on each student folder.

This script starts its own vLLM server (``scripts/vllm_server.py``, ``--max-logprobs 64``),
only when the served part begins, and stops it by its process group in a ``finally``, unless
``--url``/``--model`` name a running one.

    python bench/served.py                          # the numbers in bench/README.md (idle machine)
    python bench/served.py --quick                  # smoke run, a few steps
    python bench/served.py --quick --url http://127.0.0.1:8311 --model demo
"""

from __future__ import annotations

# No torch, no potstill here: see the module doc (peak RSS of the children).
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "scripts"))

import vllm_server  # noqa: E402  (standard library only)

DEMO_TEACHER = REPO / "src" / "potstill" / "assets" / "demo-teacher"
SERVED_NAME = "demo-teacher"
TOP_K = 20
DEFAULT_STEPS = 80      # about 12 minutes for the whole script on an idle 2-core CPU
QUICK_STEPS = 6
QUICK_SCORE_BATCHES = 4  # --quick scores the first 4 x 16 x 256 test tokens, not the whole test split
CONCURRENCY = 8  # teacher.server.max_concurrency (the default): requests in flight, runs and capture alike
TRAIN_RUNS = ("ce", "local", "cache", "served", "served_la0")
LABELS = {"ce": "CE only (no teacher)", "local": "local teacher, dense fkl", "cache": "local top-20 (cache)",
          "served": "served top-20, lookahead 1", "served_la0": "served top-20, lookahead 0",
          "capture_local": "cache-teacher in process", "capture_served": "cache-teacher via server"}
IDLE_LOAD = 0.3  # 1-minute load average below which the machine counts as idle


# ----------------------------------------------------------------------------------------
# Helper children (these import torch and potstill)


def child_prepare(out: Path, steps: int) -> None:
    """Student init, data subset, the quickstart's KD and CE configs as plain dicts -> out/prepare.json.

    No validation set: every run would evaluate it at its end (a CE-only run with the teacher
    loaded for KL), and that peak, not training's, would be the run's peak RSS. The CE-only run
    loads no teacher at all. The data are tokenized here once, so no measured run pays for it."""
    import torch
    from transformers import AutoTokenizer

    from offline import thin_train_split  # bench/offline.py: the same subset rule
    from potstill.commands.quickstart import make_student_init, run_config
    from potstill.config import DataConfig
    from potstill.data import build_datasets

    init = make_student_init(out)
    subset, stride = thin_train_split(out, steps * 16)
    configs = {}
    for name, ce_only in (("kd", False), ("ce", True)):
        cfg = run_config(out / name, steps, init, ce_only=ce_only).model_dump(mode="json")
        cfg["data"].update(source=str(subset), validation_split=None, validation_source=None, validation_fraction=0.0)
        if ce_only:
            cfg["teacher"]["name_or_path"] = None
        configs[name] = cfg
    build_datasets(DataConfig(**configs["kd"]["data"]), AutoTokenizer.from_pretrained(init),
                   seed=configs["kd"]["train"]["seed"], progress=False)
    info = {"init": str(init), "subset": str(subset), "train_row_stride": stride, "configs": configs,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "prepare.json").write_text(json.dumps(info, indent=2))


def child_score(out: Path, max_batches: int | None) -> None:
    """Test-split scores of the trained students (``quickstart.test_scores``'s evaluation; the
    first ``max_batches`` batches of it with --quick), the two caches compared, the two served
    students compared -> out/scores.json."""
    from safetensors.torch import load_file

    from potstill.commands.quickstart import demo_teacher_path

    result: dict = {}
    models = {name: out / name / "student" for name in TRAIN_RUNS if (out / name / "student").is_dir()}
    a, b = models.get("served"), models.get("served_la0")
    if a is not None and b is not None:  # the overlap must not change what is trained
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
        result["served_la1_vs_la0_max_abs_weight_diff"] = diff
        if diff == 0.0:
            del models["served_la0"]  # the same weights: the same scores, not evaluated twice
    scores = score_models(models, demo_teacher_path(), max_batches)
    if "served_la0" not in scores and "served" in scores and b is not None:
        scores["served_la0"] = dict(scores["served"], scored_as="served (identical weights)")
    result["scores"] = scores
    if (out / "cache-local" / "manifest.json").is_file() and (out / "cache-served" / "manifest.json").is_file():
        result["served_vs_local_cache"] = compare_caches(out / "cache-local", out / "cache-served")
    (out / "scores.json").write_text(json.dumps(result, indent=2))


def score_models(models: dict[str, Path], teacher: Path, max_batches: int | None) -> dict[str, dict]:
    """``quickstart.test_scores`` itself, or (``max_batches``) the same evaluation on the first batches."""
    from potstill.commands.quickstart import test_scores

    if max_batches is None:
        rows = test_scores(models, teacher, progress=False)
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from potstill.commands.quickstart import MAX_LENGTH
        from potstill.config import DataConfig
        from potstill.data import build_datasets
        from potstill.models.loading import freeze, load_causal_lm
        from potstill.models.precision import autocast_context, resolve_precision
        from potstill.training.evaluation import evaluate_models

        tok = AutoTokenizer.from_pretrained(teacher)
        test, _ = build_datasets(DataConfig(source="python-docs", split="test", validation_fraction=0.0,
                                            max_length=MAX_LENGTH), tok, progress=False)
        device = torch.device("cpu")
        teacher_model = freeze(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32))
        rows = {}
        for name, path in models.items():
            model = freeze(load_causal_lm(str(path), revision=None, dtype=torch.float32, trust_remote_code=False,
                                          role="model"))
            rows[name] = evaluate_models(model, test, pad_token_id=tok.pad_token_id, batch_size=16, device=device,
                                         teacher=teacher_model, max_batches=max_batches,
                                         autocast=autocast_context(resolve_precision("auto"), device), progress=False)
            rows[name]["params"] = sum(p.numel() for p in model.parameters())
    return {name: {k: v for k, v in row.items() if isinstance(v, (int, float))} for name, row in rows.items()}


def compare_caches(local: Path, served: Path) -> dict:
    """Top-k rows of the in-process capture vs the served one: top-1 agreement, top-k id overlap,
    mean |difference| of the top-1 log-prob and of the rest mass (log)."""
    import numpy as np

    from potstill.teachers import cache_format as fmt

    ml, ms = fmt.read_manifest(local), fmt.read_manifest(served)
    bits, k, vb = ml["encoding"]["id_bits"], ml["k"], ml["encoding"]["value_bits"]
    top1 = overlap = dlogp = drest = 0.0
    rows = 0
    for el, es in zip(ml["shards"], ms["shards"]):
        sl, ss = fmt.read_shard(local, el), fmt.read_shard(served, es)
        il, is_ = fmt.unpack_ids(sl["ids"], k, bits), fmt.unpack_ids(ss["ids"], k, bits)
        ll, ls = fmt.dequantize_logp(sl["logp"], vb), fmt.dequantize_logp(ss["logp"], vb)
        rl, rs = fmt.dequantize_logp(sl["rest"], vb), fmt.dequantize_logp(ss["rest"], vb)
        top1 += float((il[:, 0] == is_[:, 0]).sum())
        overlap += sum(len(set(x) & set(y)) for x, y in zip(il.tolist(), is_.tolist())) / k
        dlogp += float(np.abs(ll[:, 0] - ls[:, 0]).sum())
        finite = np.isfinite(rl) & np.isfinite(rs)
        drest += float(np.abs(rl[finite] - rs[finite]).sum()) if finite.any() else 0.0
        rows += len(il)
    n = max(rows, 1)
    return {"rows": rows, "top1_agreement": top1 / n, "topk_id_overlap": overlap / n,
            "mean_abs_top1_logp_diff": dlogp / n, "mean_abs_log_rest_diff": drest / n,
            "same_bytes": [e["sha256"] for e in ml["shards"]] == [e["sha256"] for e in ms["shards"]]}


# ----------------------------------------------------------------------------------------
# The launcher


def run_child(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` to the end; its exit code, wall time, peak RSS (MB) and the load averages around it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()  # Ctrl-C: this child only, by its pid
            process.wait()
            raise
    process.returncode = code = os.waitstatus_to_exitcode(status)
    row = {"command": " ".join(cmd), "log": str(log), "exit_code": code, "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_before": load_before, "load_after": os.getloadavg()}
    if code != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        row["error"] = lines[-1] if lines else f"exit code {code}"
        print(f"   FAILED: {row['error']}", flush=True)
    return row


def helper(mode: str, out: Path, *args: str) -> dict:
    row = run_child([sys.executable, str(Path(__file__).resolve()), "--child", mode, "--out", str(out), *args],
                    out / f"{mode}.log")
    if row["exit_code"] != 0:
        raise SystemExit(f"bench/served.py: the {mode} helper failed ({row['error']}); see {row['log']}")
    return row


def write_config(out: Path, name: str, cfg: dict) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def median_tokens_per_s(run: Path, warm_steps: int) -> tuple[float | None, int]:
    """Median tokens/s of the logged windows that end after ``warm_steps``, and how many there were."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None, 0
    records = [r for r in map(json.loads, path.read_text().splitlines()) if "tokens_per_s" in r]
    rates = [r["tokens_per_s"] for r in records if r["step"] > warm_steps] or [r["tokens_per_s"] for r in records]
    return (statistics.median(rates) if rates else None), len(rates)


def last_logged_peak(run: Path) -> float | None:
    """The run's own VmHWM at its last metrics record (before the final save): a cross-check."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    peaks = [r["peak_mem_mb"] for r in map(json.loads, path.read_text().splitlines()) if "peak_mem_mb" in r]
    return round(peaks[-1], 1) if peaks else None


def server_rss_mb(pgid: int) -> float:
    """Resident memory of the server's whole process group (API server + engine core + worker)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return round(total / 1024, 1)


def server_version(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/version", timeout=10) as r:
            return json.loads(r.read()).get("version")
    except (OSError, ValueError):
        return None


class Server:
    """The vLLM server of the served part: the one ``--url`` names, or one started on first use."""

    def __init__(self, args, out: Path, max_length: int):
        self.url, self.model, self.out, self.max_length = args.url, args.model, out, max_length
        self.started = None
        self.start_s = None

    def get(self) -> tuple[str, str | None]:
        if self.url is None:
            print("== starting vLLM (demo teacher, --max-logprobs 64)", flush=True)
            t0 = time.perf_counter()
            self.started = vllm_server.start_server(DEMO_TEACHER, name=SERVED_NAME, max_logprobs=64,
                                                    max_model_len=max(512, self.max_length), log_dir=self.out)
            self.start_s = round(time.perf_counter() - t0, 1)
            self.url, self.model = self.started.url, self.started.name
            print(f"   {self.url} (pid {self.started.pid}) in {self.start_s} s", flush=True)
        return self.url, self.model

    def stop(self) -> None:
        if self.started is not None:
            self.started.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {DEFAULT_STEPS}; "
                                                                   f"--quick: {QUICK_STEPS})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 4 test batches (about 3-4 minutes)")
    parser.add_argument("--out", default=None, help="a new or empty folder for the runs (default: a fresh one in /tmp)")
    parser.add_argument("--url", default=None, help="a running vLLM server to use (else one is started)")
    parser.add_argument("--model", default=None, help="its served model name (with --url; default: the only one)")
    parser.add_argument("--json", default=str(HERE / "results" / "served.json"))
    parser.add_argument("--child", choices=["prepare", "score"], help=argparse.SUPPRESS)
    parser.add_argument("--score-batches", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if steps < 2:
        parser.error("--steps must be at least 2")
    if args.model and not args.url:
        parser.error("--model names the model of a running server: give --url too")

    if args.child:  # a helper child: out exists, the launcher made it
        out = Path(args.out)
        child_prepare(out, steps) if args.child == "prepare" else child_score(out, args.score_batches)
        return 0

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-served-"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {out} is not a new or empty folder: every figure here comes from fresh runs")
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"command": " ".join(["python"] + sys.argv), "quick": args.quick, "steps": steps, "out": str(out),
                    "top_k": TOP_K, "cpus": os.cpu_count(), "machine": platform.machine(),
                    "load_at_start": os.getloadavg(), "runs": {}, "captures": {},
                    "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    idle = record["load_at_start"][0] < IDLE_LOAD
    print(f"== out {out}; load average {record['load_at_start']} on {os.cpu_count()} CPUs: machine "
          f"{'idle' if idle else 'NOT idle (timings are noise)'}", flush=True)

    helper("prepare", out, "--steps", str(steps))
    prep = json.loads((out / "prepare.json").read_text())
    record.update(torch=prep["torch"], torch_threads=prep["threads"], train_row_stride=prep["train_row_stride"],
                  potstill=_version("potstill"))
    log_every = max(1, steps // 30)
    warm = max(2, steps // 15)  # steps whose windows are left out of tokens/s (thread pools, first requests)
    record["tokens_per_s_after_step"] = warm

    def config(kind: str, name: str, **changes) -> dict:
        cfg = json.loads(json.dumps(prep["configs"][kind]))
        cfg["output"]["dir"] = str(out / name)
        cfg["train"].update(checkpoint_every=steps, keep_checkpoints=1, log_every=log_every)
        cfg["eval"] = {"every": None, "max_batches": 8}  # no evaluation inside the timed steps
        for section, values in changes.items():
            cfg[section].update(values)
        return cfg

    def server_section(url: str, model: str | None, lookahead: int = 1) -> dict:
        return {"url": url, "model": model, "top_k": TOP_K, "lookahead": lookahead, "max_concurrency": CONCURRENCY}

    def train(name: str, cfg: dict) -> None:
        print(f"== {name}: {LABELS[name]}", flush=True)
        path = write_config(out, name, cfg)
        row = {"label": LABELS[name], "config": str(path),
               **run_child([sys.executable, "-m", "potstill", "distill", str(path), "--no-progress"],
                           out / f"{name}.log")}
        row["tokens_per_s"], row["tokens_per_s_windows"] = median_tokens_per_s(out / name, warm)
        row["logged_peak_mem_mb"] = last_logged_peak(out / name)
        record["runs"][name] = row
        print(f"   {row['wall_s']} s, {row['tokens_per_s'] or float('nan'):.0f} tokens/s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        write_record(args, record)

    def capture(name: str, cfg: dict) -> None:
        print(f"== {name}: {LABELS[name]}", flush=True)
        path = write_config(out, name, cfg)
        row = {"label": LABELS[name], "config": str(path),
               **run_child([sys.executable, "-m", "potstill", "cache-teacher", str(path), "--no-progress"],
                           out / f"{name}.log")}
        manifest = Path(cfg["cache"]["dir"]) / "manifest.json"
        if row["exit_code"] == 0 and manifest.is_file():
            m = json.loads(manifest.read_text())
            row.update(tokens=m["n_rows"], capture_s=m["capture_seconds"],
                       tokens_per_s=m["capture_tokens_per_s"], bytes_per_token=m["bytes_per_token"])
            print(f"   {row['tokens']} tokens in {row['capture_s']} s: {row['tokens_per_s']:.0f} tokens/s", flush=True)
        record["captures"][name] = row
        write_record(args, record)

    cache_section = {"kind": "topk", "k": TOP_K, "value_bits": 16}
    server = Server(args, out, prep["configs"]["kd"]["data"]["max_length"])
    try:
        # No server needed (a server started later cannot slow these down).
        train("ce", config("ce", "ce"))
        train("local", config("kd", "local"))
        capture("capture_local", config("kd", "capture_local", cache={**cache_section, "dir": str(out / "cache-local")}))
        if record["captures"]["capture_local"]["exit_code"] == 0:
            train("cache", config("kd", "cache", teacher={"cache": str(out / "cache-local")}))
        # The served part.
        url, model = server.get()
        record["vllm"] = server_version(url)
        record["server"] = {"url": url, "model": model, "started_here": server.started is not None,
                            "start_s": server.start_s}
        # teacher.name_or_path: the tokenizer only (cache-teacher tokenizes the data; no model loads).
        capture("capture_served", config("kd", "capture_served", cache={**cache_section, "dir": str(out / "cache-served")},
                                         teacher={"server": server_section(url, model)}))
        served_teacher = {"name_or_path": None, "server": server_section(url, model)}
        train("served", config("kd", "served", teacher=served_teacher))
        train("served_la0", config("kd", "served_la0", teacher={**served_teacher,
                                                                "server": server_section(url, model, lookahead=0)}))
        if server.started is not None:
            record["server"]["rss_mb_at_end"] = server_rss_mb(server.started.pid)
    finally:
        server.stop()
    record["load_after_runs"] = os.getloadavg()

    print("== test scores", flush=True)
    helper("score", out, *(["--score-batches", str(QUICK_SCORE_BATCHES)] if args.quick else []))
    scored = json.loads((out / "scores.json").read_text())
    for name, row in record["runs"].items():
        score = scored["scores"].get(name)
        if score:
            row.update(test_ppl=score["ppl"], test_kl=score.get("kl"), test_agreement=score.get("agreement"),
                       params=score["params"])
    record["teacher_test_ppl"] = next((r.get("teacher_ppl") for r in scored["scores"].values()), None)
    record["test_batches"] = "all" if not args.quick else QUICK_SCORE_BATCHES
    for key in ("served_la1_vs_la0_max_abs_weight_diff", "served_vs_local_cache"):
        if key in scored:
            record[key] = scored[key]
    record["targets"] = targets(record)
    record["load_at_end"] = os.getloadavg()
    record["machine_idle_at_start"] = idle
    write_record(args, record, final=True)
    failed = [n for n, r in {**record["runs"], **record["captures"]}.items() if r["exit_code"] != 0]
    return 1 if failed else 0


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def targets(record: dict) -> dict:
    """Issue #13's targets from this run's figures, and what the overlap buys against what it could."""
    runs, caps = record["runs"], record["captures"]
    get = lambda name, key: (runs.get(name) or {}).get(key)  # noqa: E731
    ppl = _ratio(get("served", "test_ppl"), get("cache", "test_ppl"))
    mem = _ratio(get("served", "peak_rss_mb"), get("ce", "peak_rss_mb"))
    t = {"quality_served_over_local_top20_ppl": ppl, "quality_within_2pct": None if ppl is None else abs(ppl - 1) <= 0.02,
         "memory_served_over_ce_peak_rss": mem, "memory_within_1.1x": None if mem is None else mem <= 1.1,
         # served / cache: what the client itself costs (the same top-20 loss, targets from disk)
         "memory_served_over_cache_peak_rss": _ratio(get("served", "peak_rss_mb"), get("cache", "peak_rss_mb")),
         "memory_local_dense_over_ce_peak_rss": _ratio(get("local", "peak_rss_mb"), get("ce", "peak_rss_mb")),
         "speed_overlap_la1_over_la0": _ratio(get("served", "tokens_per_s"), get("served_la0", "tokens_per_s")),
         "speed_served_over_local_dense": _ratio(get("served", "tokens_per_s"), get("local", "tokens_per_s")),
         "capture_served_over_in_process": _ratio((caps.get("capture_served") or {}).get("tokens_per_s"),
                                                  (caps.get("capture_local") or {}).get("tokens_per_s"))}
    # Where the step would be with the server on hardware of its own: the student alone (the cache
    # run: the same top-20 loss, targets read from disk) against the server alone (its capture).
    student, teacher = get("cache", "tokens_per_s"), (caps.get("capture_served") or {}).get("tokens_per_s")
    if student and teacher:
        t["model_no_overlap_tokens_per_s"] = 1 / (1 / student + 1 / teacher)  # step = student + teacher
        t["model_full_overlap_tokens_per_s"] = min(student, teacher)          # step = max(student, teacher)
    return t


def show(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def write_record(args, record: dict, final: bool = False) -> None:
    """The tables (printed at the end) and the JSON, rewritten after every run."""
    runs, caps = record["runs"], record["captures"]
    ref_ppl = (runs.get("cache") or {}).get("test_ppl")
    ref_speed = (runs.get("local") or {}).get("tokens_per_s")
    ref_mem = (runs.get("ce") or {}).get("peak_rss_mb")
    head = ["run", "test ppl", "ppl vs local top-20", "tokens/s", "tokens/s vs local dense", "peak RSS MB",
            "RSS vs CE only"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in TRAIN_RUNS:
        r = runs.get(name)
        if r is None:
            continue
        if r["exit_code"] != 0:
            lines.append(f"| {r['label']} | failed: {r.get('error', '')[:80]} |" + " |" * (len(head) - 2))
            continue
        rel = _ratio(r.get("test_ppl"), ref_ppl)
        lines.append(f"| {r['label']} | {show(r.get('test_ppl'), '.3f')} | {show(None if rel is None else (rel - 1) * 100, '+.2f', '%')} | "
                     f"{show(r['tokens_per_s'], '.0f')} | {show(_ratio(r['tokens_per_s'], ref_speed), '.2f', 'x')} | "
                     f"{r['peak_rss_mb']:.0f} | {show(_ratio(r['peak_rss_mb'], ref_mem), '.2f', 'x')} |")
    cap_head = ["capture (top-20, 16-bit)", "tokens", "seconds", "tokens/s", "vs in process"]
    cap_lines = ["| " + " | ".join(cap_head) + " |", "|" + "---|" * len(cap_head)]
    ref_cap = (caps.get("capture_local") or {}).get("tokens_per_s")
    for name, r in caps.items():
        if r["exit_code"] != 0 or "tokens" not in r:
            cap_lines.append(f"| {r['label']} | failed: {r.get('error', '')[:80]} | | | |")
            continue
        cap_lines.append(f"| {r['label']} | {r['tokens']} | {r['capture_s']} | {r['tokens_per_s']:.0f} | "
                         f"{show(_ratio(r['tokens_per_s'], ref_cap), '.2f', 'x')} |")
    record["table"] = "\n".join(lines)
    record["capture_table"] = "\n".join(cap_lines)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    if final:
        print(record["table"])
        print()
        print(record["capture_table"])
        print()
        t = record.get("targets", {})
        load0, load1 = record["load_at_start"], record["load_at_end"]
        print(f"steps {record['steps']}{' (--quick: a smoke run)' if record['quick'] else ''}; torch "
              f"{record.get('torch')}, vLLM {record.get('vllm')}; load average {load0[0]:.2f} at start, "
              f"{load1[0]:.2f} at end on {record['cpus']} CPUs: machine "
              f"{'idle' if record['machine_idle_at_start'] else 'NOT idle: the timings are noise'} at start")
        print(f"quality: served / local top-20 test ppl = {show(t.get('quality_served_over_local_top20_ppl'), '.4f')} "
              f"(target within 2%: {_verdict(t.get('quality_within_2pct'))})")
        print(f"memory: served / CE-only peak RSS = {show(t.get('memory_served_over_ce_peak_rss'), '.3f')} "
              f"(target <= 1.1x: {_verdict(t.get('memory_within_1.1x'))}); served / local top-20 = "
              f"{show(t.get('memory_served_over_cache_peak_rss'), '.3f')}; local dense / CE-only = "
              f"{show(t.get('memory_local_dense_over_ce_peak_rss'), '.3f')}")
        print(f"speed: overlap (lookahead 1 / 0) = {show(t.get('speed_overlap_la1_over_la0'), '.2f', 'x')}; served / "
              f"local dense = {show(t.get('speed_served_over_local_dense'), '.2f', 'x')}; with the server on its own "
              f"hardware: {show(t.get('model_no_overlap_tokens_per_s'), '.0f')} tokens/s without overlap, "
              f"{show(t.get('model_full_overlap_tokens_per_s'), '.0f')} with full overlap")
        if "served_la1_vs_la0_max_abs_weight_diff" in record:
            print(f"lookahead 1 vs 0 students: max |weight difference| = "
                  f"{record['served_la1_vs_la0_max_abs_weight_diff']:.3g}")
        if "served_vs_local_cache" in record:
            c = record["served_vs_local_cache"]
            print(f"served vs in-process cache: top-1 agreement {c['top1_agreement']:.4f}, top-{TOP_K} id overlap "
                  f"{c['topk_id_overlap']:.4f}, mean |top-1 log-prob difference| {c['mean_abs_top1_logp_diff']:.4f}")
        print(f"wrote {args.json}; runs in {record['out']}")


def _verdict(ok) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


if __name__ == "__main__":
    raise SystemExit(main())
