"""Pictures and tables of finished runs: ``potstill report`` (losses.png, eval.png, throughput.png,
report.md, report.json with the share of the teacher-student gap each run closed), the quickstart's
loss curve and results table. The numbers of one run (:func:`load_run`) also feed the model card."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, atomic_write_text
from ..errors import ConfigError, PotstillError, RunDirError
from ..ownership import MARK_FILE, mark_owned, read_json_object
from ..training.metrics import read_metrics
from ..training.tasks import TASKS, TEACHER_TASKS
from ..version import __version__


def plot_runs(runs: dict[str, Path], out_png: Path) -> Path:
    """Training loss and validation cross-entropy of one or more runs, side by side.

    ``runs`` maps a label to a run directory. Training losses of different objectives
    (KD vs CE) are not on one scale, so they share only the x-axis; validation
    cross-entropy is the one comparable curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval/ce"]) for r in records if "eval/ce" in r]
        if train:
            ax_train.plot(*zip(*train), label=label)
        if evals:
            ax_eval.plot(*zip(*evals), marker="o", label=label)
    ax_train.set(title="training loss (each run's own objective)", xlabel="step", ylabel="loss per token")
    ax_eval.set(title="validation cross-entropy (lower is better)", xlabel="step", ylabel="nats per token")
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


COLUMNS = (("ppl", "test ppl", "{:.2f}"), ("ce", "test CE", "{:.4f}"), ("kl", "KL(teacher ‖ model)", "{:.4f}"),
           ("agreement", "top-1 agree", "{:.3f}"), ("params", "params", "{:,}"))


def results_table(rows: dict[str, dict], *, markdown: bool = False) -> str:
    """One row per model with the columns above (missing values shown as '-')."""
    header = ["model"] + [title for _, title, _ in COLUMNS]
    body = [[name] + [fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in COLUMNS]
            for name, r in rows.items()]
    if markdown:
        return md_table(header, body)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt_row(header)] + [fmt_row(row) for row in body])


# ---------------------------------------------------------------------------------------------
# `potstill report`: plots, tables and the share of the teacher-student gap each run closed.

REPORT_KIND = "report"
PLOTS = ("losses.png", "eval.png", "throughput.png")
PLOT_TITLES = {"losses.png": "Training losses", "eval.png": "Evaluation", "throughput.png": "Throughput and memory"}
OWN_FILES = PLOTS + ("report.md", "report.json")

# Validation metrics (metrics.jsonl "eval/<key>"): key, title, lower is better, teacher's key.
EVAL_METRICS = (("ce", "validation CE (nats/token)", True, "teacher_ce"),
                ("ppl", "validation perplexity", True, "teacher_ppl"),
                ("bpb", "bits per byte", True, "teacher_bpb"),
                ("kl", "KL(teacher ‖ student)", True, None),
                ("agreement", "top-1 agreement", False, None))
RECOVERY_EVAL = ("ce", "bpb")  # recovery is reported for these and every task metric
PLOT_EVAL = ("ce", "bpb", "kl", "agreement")
_LOWER_TASK_WORDS = ("perplexity", "ppl", "bits_per_byte", "bpb", "loss", "ter")


def _lower_is_better_task(metric: str) -> bool:
    """Task metrics where less is better (perplexities, bits per byte, losses); accuracies otherwise."""
    name = metric.split(",")[0].lower()
    return any(name == w or name.endswith("_" + w) or name.startswith(w) for w in _LOWER_TASK_WORDS)


def recovery(before: float | None, after: float | None, teacher: float | None, *,
             lower_is_better: bool | None = None) -> float | None:
    """Share of the teacher-student gap the training closed: 1 = the student reached the teacher, 0 = no
    change, negative = moved away. For lower-is-better metrics (before - after) / (before - teacher), for
    higher-is-better (after - before) / (teacher - before): the same number. None when a value is
    missing or the gap is ~0 (the student started at the teacher's level: nothing to recover), and, when
    ``lower_is_better`` is given, when the student started beyond the teacher (no gap to close: the
    ratio would only measure noise over a tiny or reversed gap)."""
    if before is None or after is None or teacher is None:
        return None
    gap = teacher - before
    if abs(gap) <= 1e-9 * max(1.0, abs(before), abs(teacher)):
        return None
    if lower_is_better is not None and (gap > 0) == lower_is_better:
        return None
    return (after - before) / gap


def md_cell(value: Any) -> str:
    """Text safe inside a GitHub Markdown table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("\\", "\\\\").replace("|", "\\|")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; every cell passed through :func:`md_cell`."""
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: '-' when missing, integers with separators, others to ``digits`` significant."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def fmt_recovery(value: float | None) -> str:
    """A recovery share as a percentage ('-' when there is none); one decimal below 10%."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if abs(value) < 0.1 else f"{100 * value:.0f}%"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config as a plain dict (validated where it still validates: defaults filled in)."""
    from ..config import read_yaml, validate_config

    raw = read_yaml(run_dir / "config.yaml")
    try:
        return validate_config(raw).model_dump()
    except PotstillError:
        return raw


def _task_values(record: dict, prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in record.items()
            if k.startswith(prefix) and not k.endswith("_stderr") and "_stderr," not in k and _number(v) is not None}


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything the report and the model card show about one run: summary numbers, the metrics
    table (teacher / student before / student after / recovery) and the curves, from the run's
    metrics.jsonl, config.yaml, summary.json and run_info.json. Older runs lacking some keys give
    fewer rows. A folder without metrics.jsonl or config.yaml, or without records, is one ConfigError."""
    run_dir = Path(run_dir)
    for name in ("metrics.jsonl", "config.yaml"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} is not a finished potstill run: it has no {name}")
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'} holds no records: nothing to report")
    summary = read_json_object(run_dir / "summary.json") or {}
    info = read_json_object(run_dir / "run_info.json") or {}
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    train = [r for r in records if "loss" in r or any(k.startswith("loss/") for k in r)]
    before_rec = next((r for r in evals if r["step"] == 0), None)
    after_rec = evals[-1] if evals and evals[-1]["step"] != 0 else None
    strip = lambda r: {k[5:]: v for k, v in r.items() if k.startswith("eval/")} if r else {}
    before = strip(before_rec) or dict(summary.get("initial_eval") or {})
    after = strip(after_rec) or dict(summary.get("final_eval") or {})
    teacher = {key: _number(after.get(tkey, before.get(tkey))) for key, _, _, tkey in EVAL_METRICS if tkey}

    task_recs = [r for r in records if any(k.startswith(TASKS) for k in r)]
    tasks_before = _task_values(next((r for r in task_recs if r["step"] == 0), {}), TASKS)
    last = task_recs[-1] if task_recs and task_recs[-1]["step"] != 0 else {}
    tasks_after = _task_values(last, TASKS)
    tasks_teacher: dict[str, float] = {}
    for r in records:
        tasks_teacher.update(_task_values(r, TEACHER_TASKS))
    summary_tasks = summary.get("tasks") if isinstance(summary.get("tasks"), dict) else {}
    for role, values in (("student_before", tasks_before), ("student", tasks_after), ("teacher", tasks_teacher)):
        for task, scores in (summary_tasks.get(role) or {}).items():
            if isinstance(scores, dict):
                values.update({f"{task}/{m}": v for m, v in scores.items()
                               if _number(v) is not None and "_stderr" not in m and f"{task}/{m}" not in values})

    metrics: dict[str, dict[str, Any]] = {}
    for key, title, lower, _ in EVAL_METRICS:
        b, a, t = _number(before.get(key)), _number(after.get(key)), teacher.get(key)
        if a is None and b is None:
            continue
        metrics[key] = {"title": title, "lower_is_better": lower, "teacher": t, "before": b, "after": a,
                        "recovery": recovery(b, a, t, lower_is_better=lower) if key in RECOVERY_EVAL else None}
    for key in sorted(set(tasks_before) | set(tasks_after) | set(tasks_teacher)):
        b, a, t = tasks_before.get(key), tasks_after.get(key), tasks_teacher.get(key)
        lower = _lower_is_better_task(key.rpartition("/")[2])
        metrics["tasks/" + key] = {"title": key, "lower_is_better": lower, "teacher": t, "before": b, "after": a,
                                   "recovery": recovery(b, a, t, lower_is_better=lower)}

    overall = summary.get("train_overall") or {}
    steps = summary.get("steps", max(r["step"] for r in records))
    peak = overall.get("peak_mem_mb")
    if peak is None:
        peaks = [r["peak_mem_mb"] for r in train if _number(r.get("peak_mem_mb")) is not None]
        peak = max(peaks) if peaks else None
    return {
        "dir": str(run_dir),
        "config": _run_config(run_dir),
        "run_info": info,
        "summary": {
            "steps": steps,
            "tokens": overall.get("tokens"),
            "tokens_per_s": overall.get("tokens_per_s"),
            "peak_mem_mb": peak,
            "wall_time_s": overall.get("wall_time_s"),
            "train_time_s": overall.get("train_time_s"),
            "student_parameters": summary.get("student_parameters"),
            "trained_parameters": summary.get("trained_parameters"),
            "teacher_parameters": summary.get("teacher_parameters"),
            "measured": summary.get("measured") or {},
            "train_examples": summary.get("train_examples"),
            "hardware": summary.get("hardware") or {},
        },
        "metrics": metrics,
        "eval_steps": [r["step"] for r in evals],
        "curves": {
            "train": {key: [(r["step"], r[key]) for r in train if _number(r.get(key)) is not None]
                      for key in _ordered_keys(train, lambda k: k == "loss" or k.startswith("loss/")) +
                      ["tokens_per_s", "peak_mem_mb"]},
            "eval": {key: [(r["step"], r["eval/" + key]) for r in evals if _number(r.get("eval/" + key)) is not None]
                     for key, *_ in EVAL_METRICS},
            "tasks": {key: [(r["step"], v) for r in task_recs for k, v in _task_values(r, TASKS).items() if k == key]
                      for key in sorted(set(tasks_before) | set(tasks_after))},
        },
    }


def _ordered_keys(records: list[dict], keep) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for k in r:
            if keep(k):
                seen.setdefault(k, None)
    return list(seen)


def run_labels(runs: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    """Labels for the runs: the given ones, else the folder names; repeated ones get a suffix."""
    if labels is not None:
        if len(labels) != len(runs):
            raise ConfigError(f"--labels gives {len(labels)} label(s) for {len(runs)} run(s): give one per run")
        names = [str(lab).strip() or Path(r).name for lab, r in zip(labels, runs)]
    else:
        names = [Path(r).resolve().name or str(r) for r in runs]
    out: list[str] = []
    for name in names:
        label, n = name, 2
        while label in out:
            label, n = f"{name}-{n}", n + 1
        out.append(label)
    return out


def _claim_out(out: Path) -> None:
    """Refuse (one line) an existing folder potstill did not make for a report; mark it ours."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"report folder {out} is a file: choose another --out")
    mark = read_json_object(out / MARK_FILE) or {}
    if out.is_dir() and any(out.iterdir()) and mark.get("kind") != REPORT_KIND:
        why = "was not written by potstill" if not mark else f"holds a potstill {mark.get('kind')}, not a report"
        raise RunDirError(f"report folder {out} {why}: potstill replaces only its own output; choose another "
                          "--out or move the folder away yourself")
    mark_owned(out, REPORT_KIND)


def build_report(runs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                 labels: Sequence[str] | None = None, progress: bool = False) -> dict:
    """Plots, tables and the teacher-gap recovery of finished runs, written into ``out`` (default:
    FIRST_RUN/report): losses.png, eval.png, throughput.png, report.md and report.json. ``progress``
    logs each stage (reading runs, plotting, writing) on the ``potstill`` logger.

    Returns {"out": Path, "plots": [file names], "labels": [...], "runs": {label: numbers},
    "recovery": {label: {metric: share or None}}, "markdown": Path, "json": Path}."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ConfigError("potstill report needs at least one run folder")
    say = logging.getLogger("potstill").info if progress else (lambda *a: None)
    names = run_labels(runs, labels)
    data = {}
    for label, run in zip(names, runs):
        say("report: reading %s (%s)", run, label)
        data[label] = load_run(run)
    out = Path(out) if out is not None else runs[0] / "report"
    _claim_out(out)
    say("report: plotting into %s", out)
    plots = write_plots(data, out)
    rec = {label: {k: m["recovery"] for k, m in d["metrics"].items() if k in RECOVERY_EVAL or k.startswith("tasks/")}
           for label, d in data.items()}
    md = report_markdown(data, plots)
    atomic_write_text(out / "report.md", md)
    payload = {"potstill_version": __version__, "plots": plots, "recovery": rec,
               "runs": {label: {k: v for k, v in d.items() if k != "config"} for label, d in data.items()}}
    atomic_write_text(out / "report.json", json.dumps(payload, indent=2, default=str) + "\n")
    return {"out": out, "plots": plots, "labels": names, "runs": data, "recovery": rec,
            "markdown": out / "report.md", "json": out / "report.json"}


def metrics_rows(d: dict[str, Any]) -> list[list[str]]:
    """Rows of the per-run table: metric, teacher, student before, student after, recovery."""
    return [[m["title"] + (" ↓" if m["lower_is_better"] else " ↑"), fmt(m["teacher"]), fmt(m["before"]),
             fmt(m["after"]), fmt_recovery(m["recovery"])] for m in d["metrics"].values()]


METRICS_HEADER = ("metric", "teacher", "student before", "student after", "recovery")


def summary_line(d: dict[str, Any]) -> str:
    s = d["summary"]
    parts = [f"{fmt(s['steps'])} steps"]
    if s.get("tokens") is not None:
        parts.append(f"{fmt(s['tokens'])} tokens trained")
    if s.get("tokens_per_s") is not None:
        parts.append(f"{fmt(s['tokens_per_s'], 4)} tokens/s overall")
    if s.get("peak_mem_mb") is not None:
        parts.append(f"peak memory {fmt(s['peak_mem_mb'], 4)} MB")
    if s.get("wall_time_s") is not None:
        parts.append(f"wall time {fmt(s['wall_time_s'], 3)} s")
    hw = s.get("hardware") or {}
    if hw.get("device"):
        parts.append(f"on {hw.get('processes', 1)} × {hw.get('device_name') or hw['device']}")
    return ", ".join(parts)


def report_markdown(data: dict[str, dict[str, Any]], plots: Sequence[str]) -> str:
    """report.md: per run a summary line and the metrics table, a comparison of several runs, the plots."""
    lines = ["# potstill report", "",
             ("Recovery is the share of the teacher–student gap that training closed: for lower-is-better "
              "metrics (before − after) / (before − teacher), for higher-is-better ones (after − before) / "
              "(teacher − before); 100% = the student reached the teacher, “-” = no teacher value, or the student "
              "started at or beyond the teacher's level (no gap to close)."), ""]
    for label, d in data.items():
        lines += [f"## {md_cell(label)}", "", f"`{md_cell(d['dir'])}`: {summary_line(d)}.", ""]
        rows = metrics_rows(d)
        lines += [md_table(METRICS_HEADER, rows) if rows else "No evaluation was logged.", ""]
    if len(data) > 1:
        lines += ["## Comparison", "", comparison_table(data), ""]
    for name in plots:
        lines += [f"## {PLOT_TITLES.get(name, name)}", "", f"![{PLOT_TITLES.get(name, name)}]({name})", ""]
    return "\n".join(lines)


def comparison_table(data: dict[str, dict[str, Any]]) -> str:
    """One row per run: steps, tokens, final metrics and their recovery."""
    keys: dict[str, dict] = {}
    for d in data.values():
        for k, m in d["metrics"].items():
            keys.setdefault(k, m)
    short = {"ce": "val CE", "ppl": "val ppl", "bpb": "bpb", "kl": "KL", "agreement": "top-1 agree"}
    header = ["run", "steps", "tokens"]
    for k, m in keys.items():
        header.append(short.get(k, m["title"]))
        if k in RECOVERY_EVAL or k.startswith("tasks/"):
            header.append(f"{short.get(k, m['title'])} recovery")
    rows = []
    for label, d in data.items():
        row = [label, fmt(d["summary"]["steps"]), fmt(d["summary"]["tokens"])]
        for k in keys:
            m = d["metrics"].get(k, {})
            row.append(fmt(m.get("after")))
            if k in RECOVERY_EVAL or k.startswith("tasks/"):
                row.append(fmt_recovery(m.get("recovery")))
        rows.append(row)
    return md_table(header, rows)


def _grid(n: int, plt, width: float = 4.2, height: float = 3.2):
    cols = n if n <= 3 else 2 if n == 4 else 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig, path: Path, plt) -> None:
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _exp(x):
    import numpy as np

    return np.exp(np.clip(x, -50, 50))


def _log(x):
    import numpy as np

    return np.log(np.clip(x, 1e-300, None))


def write_plots(data: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """losses.png, eval.png and throughput.png into ``out`` (each only where some run logged its values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

    colors = {label: f"C{i % 10}" for i, label in enumerate(data)}
    from_zero = ("tokens_per_s", "peak_mem_mb")
    written = []

    def panels(curve_sets: list[tuple[str, str, dict]], name: str, *, markers: bool, teachers=None, ylabel=None):
        present = [(key, title, per_run) for key, title, per_run in curve_sets if any(per_run.values())]
        if not present:
            return
        fig, axes = _grid(len(present), plt)
        for ax, (key, title, per_run) in zip(axes, present):
            for label, points in per_run.items():
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o" if markers else None, markersize=4, color=colors[label], label=label)
            refs = (teachers or {}).get(key, {})
            values = {v for v in refs.values() if v is not None}
            if len(values) == 1:
                ax.axhline(values.pop(), color="black", linestyle="--", linewidth=1.2, label="teacher")
            else:
                for label, v in refs.items():
                    if v is not None:
                        ax.axhline(v, color=colors[label], linestyle="--", linewidth=1.2, label=f"teacher ({label})")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ylabel:
                ax.set_ylabel(ylabel.get(key, ""), fontsize=9)
            if key in from_zero:  # room above a flat line (peak memory often is), which would sit on the frame
                top = max((y for points in per_run.values() for _, y in points or ()), default=0.0)
                ax.set_ylim(bottom=0, top=top * 1.1 if top > 0 else None)
            if key == "ce":  # perplexity is exp(CE): the same curve, read on the right-hand axis
                right = ax.secondary_yaxis("right", functions=(_exp, _log))
                right.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # even steps in CE
                right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                right.yaxis.set_minor_locator(NullLocator())
                right.set_ylabel("perplexity", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        _save(fig, out / name, plt)
        written.append(name)

    loss_keys = _ordered_keys([{k: 1 for k in d["curves"]["train"]} for d in data.values()],
                              lambda k: k == "loss" or k.startswith("loss/"))
    panels([(k, "total loss (each run's own objective)" if k == "loss" else f"loss term: {k[5:]}",
             {label: d["curves"]["train"].get(k, []) for label, d in data.items()}) for k in loss_keys],
           "losses.png", markers=False)

    titles = {key: title for key, title, *_ in EVAL_METRICS}
    titles["ce"] = "validation cross-entropy and perplexity"
    eval_sets = [(k, titles[k], {label: d["curves"]["eval"].get(k, []) for label, d in data.items()})
                 for k in PLOT_EVAL]
    task_keys = sorted({k for d in data.values() for k in d["curves"]["tasks"]})
    eval_sets += [("tasks/" + k, "task " + k.replace("/", ": ", 1),
                   {label: d["curves"]["tasks"].get(k, []) for label, d in data.items()}) for k in task_keys]
    teachers = {k: {label: d["metrics"].get(k, {}).get("teacher") for label, d in data.items()}
                for k, *_ in eval_sets}
    teachers["kl"] = {}
    panels(eval_sets, "eval.png", markers=True, teachers=teachers,
           ylabel={"ce": "nats/token", "bpb": "bits/byte", "kl": "nats/token"})

    panels([("tokens_per_s", "training throughput (tokens/s)",
             {label: d["curves"]["train"]["tokens_per_s"] for label, d in data.items()}),
            ("peak_mem_mb", "peak memory (MB)",
             {label: d["curves"]["train"]["peak_mem_mb"] for label, d in data.items()})],
           "throughput.png", markers=False, ylabel={"tokens_per_s": "tokens/s", "peak_mem_mb": "MB"})
    return written
