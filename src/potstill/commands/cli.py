"""The ``potstill`` command: one thin function per verb.

User mistakes (:class:`~potstill.errors.PotstillError`) print one line and exit non-zero;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import PotstillError
from ..version import __version__

log = logging.getLogger("potstill")


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import distill

    result = distill(args.config, overrides=args.overrides, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun / accelerate launch only the main process reports
    print(f"student saved to {result.student_dir}")
    if result.final_eval:
        print(format_table({"student": result.final_eval}))
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from ..teachers.capture import cache_teacher

    m = cache_teacher(args.config, overrides=args.overrides, progress=not args.no_progress)
    print(f"teacher cache {m['kind']} k={m['k']}: {len(m['shards'])} shards, {m['n_rows']} tokens, "
          f"{m['bytes_per_token']:.1f} bytes per token ({m['bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    s = generate(args.config, overrides=args.overrides, progress=not args.no_progress)
    print(f"wrote {s['rows']} rows ({s['prompts']} prompts x {s['generation']['num_generations']}) to {s['output']}; "
          f"skipped {s['skipped_too_long']} prompts over {s['max_prompt_length']} tokens")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from .evaluate import check_arguments, evaluate

    # Before anything loads: a bad count or an unwritable --json must not cost a model load.
    check_arguments(batch_size=args.batch_size, max_length=args.max_length, max_batches=args.max_batches,
                    precision=args.precision, task_limit=args.task_limit, task_fewshot=args.task_fewshot)
    if args.json:
        check_output_file(args.json, "--json")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    result = evaluate(args.model, teacher=args.teacher, data=args.data, split=args.split,
                      max_length=args.max_length, batch_size=args.batch_size, max_batches=args.max_batches,
                      precision=args.precision, packing=args.packing, tasks=tasks, task_paths=args.task_dir or [],
                      task_limit=args.task_limit, task_fewshot=args.task_fewshot, progress=not args.no_progress)
    text = {k: v for k, v in result.items() if "/" not in k}
    if text:
        print(format_table({"model": text}))
    if any("/" in k for k in result):
        print(format_task_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


def check_output_file(path: str, flag: str) -> None:
    """A file the command will write at its end: its folder exists and it is not a folder itself."""
    from ..errors import ConfigError

    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: give a file name, e.g. {Path(path) / 'metrics.json'}")
    if not p.parent.is_dir():
        raise ConfigError(f"{flag} {path}: the folder {p.parent} does not exist: create it first")
    if p.exists() and not _is_metrics_json(p):
        raise ConfigError(f"{flag} {path} exists and is not an earlier potstill evaluate result (a JSON object "
                          "of numbers): potstill does not overwrite your files; give a new file name")


def _is_metrics_json(path: Path) -> bool:
    """What ``evaluate --json`` writes: a JSON object whose values are all numbers."""
    from ..ownership import read_json_object

    data = read_json_object(path)
    return data is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values())


def cmd_export(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from .export import export_packed

    if not args.bitnet:
        raise ConfigError("potstill export: give --bitnet (the packed ternary format is the one export there is)")
    m = export_packed(args.run, args.out, dtype=args.dtype)
    print(f"packed BitNet model written to {m['out']}: {len(m['modules'])} ternary matrices, "
          f"{m['packed_weight_bytes']:,} bytes vs {m['bf16_weight_bytes']:,} in bf16 "
          f"(1/{1 / m['ratio_to_bf16']:.2f}); model.safetensors {m['file_bytes']:,} bytes")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart
    from .report import results_table

    rows = quickstart(args.out, steps=args.steps, baseline=args.baseline, progress=True)
    print()
    print(results_table(rows))
    print(f"\nstudent: {args.out}/student   loss curve: {args.out}/loss_curve.png   table: {args.out}/results.md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    report = build_report([Path(r) for r in args.runs], out=Path(args.out) if args.out else None, labels=labels)
    print(f"report: {report['out']}/report.md (plots: {', '.join(report['plots'])})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import build_plan, check_json_output, format_plan, write_json

    if args.json:
        check_json_output(args.json)  # before the configs are read: a bad path costs nothing
    plan = build_plan(args.config, args.overrides, devices=args.devices, device_memory_gb=args.device_memory,
                      device=args.device)
    print(format_plan(plan))
    if args.json:
        write_json(args.json, plan)
    return 0


def format_task_table(result: dict[str, float]) -> str:
    """lm-eval scores as a plain-text table: one row per task and metric, the model's and the teacher's."""
    from ..training.tasks import TASKS, TEACHER_TASKS

    rows: dict[str, dict[str, float]] = {}
    for key, value in result.items():
        for prefix, who in ((TASKS, "model"), (TEACHER_TASKS, "teacher")):
            if key.startswith(prefix):
                rows.setdefault(key[len(prefix):], {})[who] = value
    width = max(len(name) for name in rows) + 2
    lines = ["task/metric".ljust(width) + "model".rjust(10) + "teacher".rjust(10)]
    for name, r in rows.items():
        lines.append(name.ljust(width) + "".join(f"{r[w]:10.4f}" if w in r else "-".rjust(10)
                                                 for w in ("model", "teacher")))
    return "\n".join(lines)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per model, one column per metric."""
    cols = [c for c in ("ppl", "ce", "bpb", "bpc", "kl", "agreement", "kd", "teacher_ppl", "teacher_bpb",
                        "teacher_bpc", "tokens") if any(c in r for r in rows.values())]
    width = max(len(name) for name in rows) + 2
    lines = ["".ljust(width) + "".join(c.rjust(13) for c in cols)]
    for name, r in rows.items():
        cells = "".join((f"{r[c]:13.4f}" if c != "tokens" else f"{int(r[c]):13d}") if c in r else "-".rjust(13)
                        for c in cols)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


def add_config_arguments(p: argparse.ArgumentParser, example: str, func) -> None:
    """The arguments of every command that runs from a run config: CONFIG [overrides] [--no-progress]."""
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="potstill", description="Knowledge distillation for causal language models.",
        epilog="Run 'potstill COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"potstill {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    # --debug is accepted after the command too: `potstill distill run.yaml --debug`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from .quickstart import DEFAULT_STEPS

    p = sub.add_parser("quickstart", parents=[common], help="offline demo: distill the bundled teacher, print a table",
                       description="Distill the bundled demo teacher into a 6x smaller student on the python-docs "
                                   "corpus (a snapshot shipped with potstill), then compare teacher, student "
                                   "before and student after on the test split. No network needed.")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default: {DEFAULT_STEPS})")
    p.add_argument("--baseline", action="store_true",
                   help="also train the same student with cross-entropy only, for comparison")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("distill", parents=[common], help="distill a teacher into a student from a YAML config",
                       description="Distill a teacher into a student. Overrides are dotted keys: "
                                   "train.lr=3e-4 loss.logits.temperature=2.0. Environment variables "
                                   "POTSTILL_SECTION__KEY=value apply between the file and the overrides.")
    add_config_arguments(p, "train.max_steps=500", cmd_distill)

    p = sub.add_parser("cache-teacher", parents=[common], help="capture the teacher's top-k or sampled logits to disk",
                       description="Run the teacher once over the config's tokenized train data and store, per "
                                   "valid token, its top-k log-probs (cache.kind=topk) or k sampled ids "
                                   "(cache.kind=sampled) in checksummed shards under cache.dir. Continues from "
                                   "the last complete shard. Train from it with teacher.cache=DIR.")
    add_config_arguments(p, "cache.dir=runs/cache cache.k=12", cmd_cache_teacher)

    p = sub.add_parser("generate", parents=[common], help="the teacher answers the data's prompts (sequence-level KD)",
                       description="Generate teacher answers to the prompts of data.source into generate.output "
                                   "(jsonl or parquet rows: prompt, completion, teacher, generation settings), "
                                   "readable by data.source directly. Continues a stopped run.")
    add_config_arguments(p, "generate.output=runs/gen.jsonl", cmd_generate)

    p = sub.add_parser("evaluate", parents=[common],
                       help="perplexity, bits per byte, KL and agreement, lm-eval tasks of a model or run",
                       description="Evaluate a run directory (uses its validation data, teacher and eval.tasks) or "
                                   "a model folder on --data and/or --tasks (lm-evaluation-harness: hub tasks by name, "
                                   "local task YAMLs with --task-dir).")
    p.add_argument("model", help="run directory or model folder / hub id")
    p.add_argument("--teacher", help="teacher model folder or hub id (for KL, agreement, and its own scores)")
    p.add_argument("--data", help="dataset: file, glob, folder or hub name (default: the run's validation split)")
    p.add_argument("--split", help="hub dataset split (default: train)")
    p.add_argument("--packing", action="store_true",
                   help="--data: pack examples into blocks of --max-length (the last partial block is dropped); "
                        "default: each example in its own row, every token scored")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated, e.g. hellaswag,arc_easy (needs potstill[eval])")
    p.add_argument("--task-dir", action="append", metavar="DIR",
                   help="a folder of local lm-eval task YAMLs (repeatable), e.g. examples/lm-eval-tasks")
    p.add_argument("--task-limit", type=int, help="examples per task (default: all)")
    p.add_argument("--task-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--max-length", type=int, help="tokens per sequence (default: the run's, else 1024)")
    p.add_argument("--batch-size", type=int, help="default: the run's, else 8")
    p.add_argument("--max-batches", type=int)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="default: the run's, else auto")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", parents=[common], help="plots, tables and the teacher-gap recovery of finished runs",
                       description="Loss curves per term, evaluation curves with the teacher as reference and the "
                                   "step-0 point, tokens/s and memory over time, and a table of teacher, student "
                                   "before and after (and of several runs side by side) with the share of the "
                                   "teacher-student gap each run closed: PNGs, report.md and report.json. "
                                   "Every distill run writes its own report/ at the end.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with metrics.jsonl and config.yaml)")
    p.add_argument("--out", help="output folder (default: FIRST_RUN/report)")
    p.add_argument("--labels", help="names of the runs in the tables and legends, comma-separated")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", parents=[common], help="write a packed 1.58-bit (ternary) model of a BitNet run",
                       description="Pack a student trained with student.bitnet=true: ternary weights at 2 bits "
                                   "(4 per byte) with one scale per matrix, in safetensors, plus config and "
                                   "tokenizer. `potstill evaluate` reads the folder.")
    p.add_argument("run", help="run directory (with student/) or a BitNet student folder")
    p.add_argument("--bitnet", action="store_true", help="packed ternary format (required)")
    p.add_argument("--out", help="output folder (default: RUN/bitnet)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the other tensors (embeddings, norms, head): float32 = exact training-time outputs "
                        "(default); bfloat16 = half their size, outputs differ slightly")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", parents=[common], help="estimate a run's memory per device before running it",
                       description="Estimate the per-device memory of a run (student weights, gradients, AdamW "
                                   "state, teacher, activations with and without checkpointing, loss buffers, "
                                   "runtime) for DDP and FSDP over --devices, from the configs alone (models "
                                   "built on the meta device; no weights read); say which fit in "
                                   "--device-memory and the largest train.batch_size that does.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    p.add_argument("--devices", help="number of devices (processes), or several: 1,2,8 "
                                     "(default: 1,2 on CPU, 1,2,4,8 on CUDA)")
    p.add_argument("--device-memory", type=float, metavar="GB",
                   help="memory of one device in GB (2**30 bytes); default: the GPU's, or this machine's RAM "
                        "shared by the processes")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where the run will train (default: cuda if present)")
    p.add_argument("--json", help="also write the plan to this JSON file")
    p.set_defaults(func=cmd_plan)
    return parser


class _PotstillHandler(logging.StreamHandler):
    """The handler of the "potstill" logger: potstill's own lines, prefixed "potstill: "."""


def setup_logging(debug: bool) -> None:
    """potstill's own messages as "potstill: ..." lines on stderr; everything else (transformers,
    torch, datasets, Python warnings) under its own logger name, so that no library's warning
    reads as if potstill said it. Calling it again replaces the handler instead of adding one."""
    level = logging.DEBUG if debug else logging.INFO
    ours = logging.getLogger("potstill")
    for old in [h for h in ours.handlers if isinstance(h, _PotstillHandler)]:
        ours.removeHandler(old)
    handler = _PotstillHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("potstill: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False  # the root handler below would print each line a second time
    # Other libraries: warnings and errors only (debug: everything), each line naming its logger.
    logging.basicConfig(level=level if debug else logging.WARNING, format="%(name)s: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        import transformers

        transformers.logging.set_verbosity_error()
        for noisy in ("accelerate", "datasets", "urllib3", "httpx", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # torchao warns at import about optional native kernels (CUDA, Triton) a CPU run never uses.
        logging.getLogger("torchao").setLevel(logging.ERROR)
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's enum registration notes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.debug)
    try:
        return run_command(args)
    finally:
        close_process_group()


def run_command(args) -> int:
    """The command's exit code; a PotstillError is one line and its code."""
    try:
        return int(args.func(args) or 0)
    except PotstillError as err:
        if args.debug:
            raise
        print(f"potstill: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("potstill: interrupted; a run continues from its last checkpoint with train.resume=auto",
              file=sys.stderr)
        return 130


def close_process_group() -> None:
    """Under torchrun, tear down the process group before the interpreter exits: left to exit-time
    destructors, gloo's threads can abort a finished worker ("terminate called without an active
    exception", exit -6) after the run has saved everything."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to tear down
            pass


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
