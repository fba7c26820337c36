"""The model card of a finished run: ``RUN/student/README.md`` in the Hugging Face format.

YAML front matter that ``huggingface_hub.ModelCard`` reads (library, pipeline, tags, where the
weights came from, the teacher, the data, ``model-index`` results), then the method in words,
teacher / student before / student after (and baseline runs) on every metric evaluated, the
share of the teacher-student gap closed, the report's plots (copied into student/ so the
uploaded folder is self-contained), how to load the model and the command that made it.

Metadata decisions:

* ``base_model`` names where the student's *weights* came from, never the teacher merely for
  teaching: ``student.name_or_path`` (``base_model_relation: finetune``); the teacher when the
  student was cut from it (``student.from_teacher``: its layers are a subset of the teacher's
  weights, trained further, which the Hub's relations call ``finetune``, the closest of
  adapter / merge / quantized / finetune); none for a student built from a config (random init).
* The Hub expects repository ids there: a local folder is not written as ``base_model`` (nor
  as ``teacher_model``); the text names it by its folder name only (no host paths in a card).
  A relative path counts as local when it exists here or where the run was started
  (:func:`launch_dirs`).
* The teacher goes in the custom key ``teacher_model`` (hub ids; ``ModelCardData`` keeps unknown
  keys) and the text "Distilled from ...".
* ``datasets`` only when ``data.source`` looks like a hub dataset id, not a local path and not the
  built-in ``python-docs`` corpus (no Hub dataset); ``model-index`` results then name the dataset
  type ``python-docs`` or ``local``, and the split says what was scored (e.g. the held-out part).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, atomic_write_text
from ..data.sources import BUILTIN_SOURCES
from ..config import PRUNE_TARGETS
from ..errors import ConfigError
from .report import (
    METRICS_HEADER,
    PLOT_TITLES,
    PLOTS,
    fmt,
    fmt_recovery,
    load_run,
    md_cell,
    md_table,
    summary_line,
)

TAGS = ["distillation", "knowledge-distillation", "potstill"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet", ".arrow", ".gz", ".zst", ".md", ".yaml", ".yml")


def hub_id(value: Any, roots: tuple[Path, ...] = ()) -> str | None:
    """``value`` when it reads as a Hugging Face Hub id (``org/name`` or ``name``) and is no local path:
    not a file name, not ``./``/``~``-relative, and not an existing path here or under one of ``roots``
    (the folders a run may have been started from), and not a built-in corpus (``python-docs``)."""
    if not isinstance(value, str) or not _HUB_ID.match(value) or value.lower().endswith(_FILE_SUFFIXES):
        return None
    if value in BUILTIN_SOURCES or value.startswith((".", "~")) or os.path.exists(value):
        return None
    if any((root / value).exists() for root in roots):
        return None
    return value


def launch_dirs(cfg: dict[str, Any], run_dir: Path) -> tuple[Path, ...]:
    """The folder the run was most likely started from, where relative paths in its config point: the
    run folder minus a relative ``output.dir`` (``runs/kd`` in /home/me/runs/kd -> /home/me)."""
    out = (cfg.get("output") or {}).get("dir")
    if not isinstance(out, str) or os.path.isabs(out):
        return ()
    parts = [q for q in Path(out).parts if q not in (".", "")]
    here = Path(run_dir).resolve()
    if not parts or ".." in parts or list(here.parts[-len(parts):]) != parts:
        return ()
    return (Path(*here.parts[:-len(parts)]),)


def _shown(value: Any, roots: tuple[Path, ...] = ()) -> str:
    """A model or data source as the card's text names it: the hub id, the built-in corpus, or a local
    folder's or file's name only (no paths of the machine that trained it)."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(_shown(v, roots) for v in value) or "-"
    if not isinstance(value, str):
        return "an in-memory object"
    if value in BUILTIN_SOURCES:
        return f"the `{value}` corpus built into potstill"
    return hub_id(value, roots) or f"the local path `{Path(value.rstrip('/')).name}`"


def weights_origin(cfg: dict[str, Any], roots: tuple[Path, ...] = ()) -> tuple[str | None, str | None, str]:
    """(base_model, base_model_relation, sentence) for where the student's weights came from; ``roots``
    as in :func:`hub_id`."""
    student, teacher = cfg.get("student") or {}, (cfg.get("teacher") or {}).get("name_or_path")
    if student.get("from_teacher") and student["from_teacher"].get("prune"):
        target = {k: v for k, v in student["from_teacher"]["prune"].items() if k in PRUNE_TARGETS and v is not None}
        base = hub_id(teacher, roots)
        return base, "finetune" if base else None, (
            "pruned from the teacher (Minitron-style: the heads, channels and blocks that mattered least on "
            f"calibration batches removed; target {', '.join(f'{k} {v}' for k, v in target.items())}), then trained")
    if student.get("from_teacher"):
        rule = student["from_teacher"]
        every = rule.get("every")
        kept = (f"layers {', '.join(map(str, rule['layers']))}" if rule.get("layers") is not None
                else f"layers 0, {every}, {2 * every}, ..." if every and every > 1 else "all")
        base = hub_id(teacher, roots)
        return base, "finetune" if base else None, \
            f"initialized from the teacher's own weights ({kept} of its decoder layers kept), then trained"
    if student.get("name_or_path") is not None:
        base = hub_id(student["name_or_path"], roots)
        return base, "finetune" if base else None, \
            f"initialized from {_shown(student['name_or_path'], roots)}, then trained"
    return None, None, "built from a model config with random initialization (no pretrained weights)"


def _trained_part_words(student: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Card lines for what of the student trained: LoRA adapters, frozen parts, teacher embeddings."""
    lines = []
    trained, total = summary.get("trained_parameters"), summary.get("student_parameters")
    share = f" ({fmt(trained)} of {fmt(total)} parameters trained)" if trained and total and trained < total else ""
    lora = student.get("lora")
    if lora:
        lines.append(f"- **LoRA:** rank {lora.get('r')}, alpha {lora.get('alpha')} on {lora.get('target_modules')}"
                     f"{share}; `student/` is merged, `adapter/` holds the adapter alone")
    elif student.get("freeze") or student.get("train_only") or student.get("spectrum"):
        parts = [f"{k} {', '.join(f'`{x}`' for x in student[k])}" for k in ("freeze", "train_only") if student.get(k)]
        if student.get("spectrum"):
            parts.append(f"Spectrum file `{Path(student['spectrum']).name}`")
        lines.append(f"- **Frozen parts:** {'; '.join(parts)}{share}")
    emb = student.get("embeddings_from_teacher")
    if emb:
        how = "copied" if emb.get("mode") == "copy" else "projected onto their top principal directions"
        lines.append(f"- **Embeddings:** the teacher's input embeddings and head, {how}"
                     + (", kept frozen" if emb.get("freeze") else ""))
    return lines


def _loss_words(cfg: dict[str, Any], summary: dict[str, Any] | None = None) -> list[str]:
    loss = cfg.get("loss") or {}
    words = []
    logits = loss.get("logits") or {}
    if logits.get("weight"):
        divergence = logits.get("divergence", "fkl")
        gamma = logits.get("cakld_confidence") or ((summary or {}).get("measured") or {}).get("cakld_confidence")
        if divergence == "cakld" and gamma is not None:
            how = "set" if logits.get("cakld_confidence") is not None else "measured teacher confidence"
            divergence = f"cakld, {how} γ = {gamma:.3f}"
        words.append(f"logit distillation ({divergence}, temperature {logits.get('temperature', 1.0)}) "
                     f"weight {logits['weight']}")
    for key, name in (("ce", "cross-entropy on the data's labels"), ("hidden", "hidden-state matching"),
                      ("attention", "attention-relation matching (MiniLMv2)")):
        if (loss.get(key) or {}).get("weight"):
            words.append(f"{name} weight {loss[key]['weight']}")
    if loss.get("balance") in ("gradnorm", "pcgrad"):
        words.append({"gradnorm": "terms balanced by GradNorm", "pcgrad": "conflicting term gradients projected "
                      "apart (PCGrad)"}[loss["balance"]])
    lmbda = (cfg.get("onpolicy") or {}).get("lmbda")
    if lmbda:
        words.append(f"on-policy: the student samples {100 * lmbda:.0f}% of the completions the teacher scores")
    return words


def _teacher_words(cfg: dict[str, Any], roots: tuple[Path, ...] = ()) -> str:
    teacher = cfg.get("teacher") or {}
    if teacher.get("server"):
        url = (teacher["server"] or {}).get("url")
        named = f" ({_shown(teacher.get('name_or_path'), roots)})" if teacher.get("name_or_path") else ""
        return f"a teacher behind an inference server{named}" if url else f"a served teacher{named}"
    if teacher.get("name_or_path") is not None:
        return _shown(teacher["name_or_path"], roots)
    if teacher.get("cache"):
        return "a teacher's cached outputs"
    return "no teacher (cross-entropy only)"


def _model_name(cfg: dict[str, Any], run_dir: Path) -> str:
    repo = (cfg.get("output") or {}).get("push_to_hub")
    return repo.rsplit("/", 1)[-1] if repo else Path(run_dir).resolve().name


def _eval_dataset(data: dict[str, Any], roots: tuple[Path, ...]) -> dict[str, str]:
    """model-index ``dataset`` of the validation metrics: the Hub id where the data has one; else the
    built-in corpus's name, or ``local`` for the user's own files (the Hub wants a type there, and an
    invented id would point at someone else's dataset). The split says what was scored: a named split,
    a separate validation source, or the fraction potstill held out of the training split."""
    if data.get("validation_source") is not None:
        source, split = data["validation_source"], "validation (data.validation_source)"
    elif data.get("validation_split"):
        source, split = data.get("source"), str(data["validation_split"])
    else:
        fraction = data.get("validation_fraction")
        held = f"{100 * fraction:g}%" if isinstance(fraction, (int, float)) else "a part"
        source, split = data.get("source"), f"{data.get('split') or 'train'} (held-out {held}, not trained on)"
    ds = hub_id(source, roots)
    if ds:
        kind, name = ds, ds
    elif isinstance(source, str) and source in BUILTIN_SOURCES:
        kind, name = source, f"{source} (potstill's built-in corpus)"
    else:
        kind, name = "local", _shown(source, roots).replace("`", "").removeprefix("the local path ")
    return {"dataset_type": kind, "dataset_name": name, "dataset_split": split}


def _eval_results(run: dict[str, Any], cfg: dict[str, Any], roots: tuple[Path, ...] = ()):
    """model-index results: validation perplexity, bits per byte, and the task metrics, student after training."""
    from huggingface_hub import EvalResult

    dataset = _eval_dataset(cfg.get("data") or {}, roots)
    results = []
    for key, metric_type, name in (("ppl", "perplexity", "validation perplexity"), ("bpb", "bits_per_byte", "bits per byte")):
        value = (run["metrics"].get(key) or {}).get("after")
        if value is not None:
            results.append(EvalResult(task_type="text-generation", metric_type=metric_type, metric_name=name,
                                      metric_value=round(float(value), 6), **dataset))
    for key, m in run["metrics"].items():
        if key.startswith("tasks/") and m.get("after") is not None:
            task, _, metric = key[len("tasks/"):].rpartition("/")
            metric = metric.split(",")[0]
            results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                      metric_type=metric, metric_name=f"{task} {metric}",
                                      metric_value=round(float(m["after"]), 6)))
    return results


def card_metadata(run: dict[str, Any], run_dir: Path):
    """The card's front matter as a ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    cfg = run["config"]
    roots = launch_dirs(cfg, run_dir)
    base, relation, _ = weights_origin(cfg, roots)
    teacher = hub_id((cfg.get("teacher") or {}).get("name_or_path"), roots)
    extra: dict[str, Any] = {"pipeline_tag": "text-generation"}
    if relation:
        extra["base_model_relation"] = relation
    if teacher:
        extra["teacher_model"] = teacher
    results = _eval_results(run, cfg, roots)
    ds = hub_id((cfg.get("data") or {}).get("source"), roots)
    return ModelCardData(library_name="transformers", tags=list(TAGS), base_model=base,
                         datasets=[ds] if ds else None, model_name=_model_name(cfg, run_dir) if results else None,
                         eval_results=results or None, **extra)


def _comparison(run: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> str:
    header = list(METRICS_HEADER)
    for label in baselines:
        header += [label, f"{label} recovery"]
    rows = []
    for key, m in run["metrics"].items():
        row = [m["title"] + (" ↓" if m["lower_is_better"] else " ↑"), fmt(m["teacher"]), fmt(m["before"]),
               fmt(m["after"]), fmt_recovery(m["recovery"])]
        for other in baselines.values():
            b = other["metrics"].get(key) or {}
            row += [fmt(b.get("after")), fmt_recovery(b.get("recovery"))]
        rows.append(row)
    return md_table(header, rows)


def report_plots(run_dir: Path, report: dict | None) -> list[Path]:
    """The report's PNGs the card shows: those of ``report`` (a build_report result), else those in
    RUN/report/, in the report's order."""
    if report is not None:
        folder, names = Path(report["out"]), list(report.get("plots") or [])
    else:
        folder = run_dir / "report"
        found = {p.name for p in folder.glob("*.png")} if folder.is_dir() else set()
        names = [n for n in PLOTS if n in found] + sorted(found - set(PLOTS))
    return [folder / name for name in names if (folder / name).is_file()]


def _command(info: dict[str, Any]) -> str | None:
    argv = info.get("command")
    if not isinstance(argv, list) or not argv:
        return None
    args = [str(a) for a in argv]
    if args[0].endswith(("__main__.py", "potstill")):
        args = ["potstill"] + args[1:]
    return shlex.join(args)


def build_model_card(run_dir: str | os.PathLike, *, baselines: dict[str, Path] | None = None,
                     report: dict | None = None) -> str:
    """The text of the run's model card (front matter and body). ``baselines`` maps a label to
    another run's folder (e.g. {"CE only": path}) shown beside this run; ``report`` is what
    :func:`~potstill.commands.report.build_report` returned (its numbers and plots are used)."""
    run_dir = Path(run_dir)
    run = _run_from_report(run_dir, report) or load_run(run_dir)
    others = {label: load_run(path) for label, path in (baselines or {}).items()}
    cfg, s = run["config"], run["summary"]
    meta = card_metadata(run, run_dir)
    roots = launch_dirs(cfg, run_dir)
    _, _, origin = weights_origin(cfg, roots)
    train = cfg.get("train") or {}
    hw = s.get("hardware") or {}
    name = _model_name(cfg, run_dir)
    lines = [f"# {md_cell(name)}", "",
             (f"Distilled from {_teacher_words(cfg, roots)} with potstill (knowledge distillation): the student "
              f"learned from the teacher's outputs. The student was {origin}."), "",
             "## Method", ""]
    params = s.get("student_parameters")
    tparams = s.get("teacher_parameters")
    lines.append(f"- **Teacher:** {_teacher_words(cfg, roots)}" + (f", {fmt(tparams)} parameters" if tparams else ""))
    lines.append(f"- **Student:** {fmt(params) + ' parameters, ' if params else ''}{origin}")
    lines += _trained_part_words(cfg.get("student") or {}, s)
    losses = _loss_words(cfg, s)
    lines.append("- **Losses:** " + ("; ".join(losses) if losses else "-"))
    lines.append(f"- **Data:** {_shown((cfg.get('data') or {}).get('source'), roots)}"
                 + (f", {fmt(s['train_examples'])} training examples" if s.get("train_examples") else ""))
    batch = train.get("batch_size")
    if batch is not None:
        accum = train.get("grad_accum") or 1
        procs = hw.get("processes") or 1
        lines.append(f"- **Batch:** {batch} sequences × {accum} accumulation × {procs} process(es), "
                     f"learning rate {train.get('lr')}")
    lines.append(f"- **Training:** {summary_line(run)}")
    if hw:
        procs = hw.get("processes") or 1
        lines.append(f"- **Hardware:** {procs} × {hw.get('device_name') or hw.get('device')}, precision "
                     f"{hw.get('precision') or train.get('precision')}"
                     + (f", strategy {hw.get('strategy') or train.get('strategy')}" if procs > 1 else ""))
    lines.append("")
    lines += ["## Results", "",
              "Teacher, the student before training, and after (validation split of the training data"
              + (", and lm-evaluation-harness tasks" if any(k.startswith("tasks/") for k in run["metrics"]) else "")
              + "). Recovery is the share of the teacher–student gap that training closed (100% = reached the "
              "teacher; “-” where a teacher value is missing, or the student started at or beyond the teacher's level).", ""]
    lines += [_comparison(run, others) if run["metrics"] else "No evaluation was logged.", ""]
    plots = report_plots(run_dir, report)
    if plots:
        lines += ["## Training curves", "", ("From `potstill report` (the teacher as a dashed line where it was "
                                             "evaluated; step 0 is the student before training)."), ""]
        for p in plots:
            lines += [f"![{PLOT_TITLES.get(p.name, p.stem)}]({p.name})", ""]
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              (f'repo = "{(cfg.get("output") or {}).get("push_to_hub")}"' if (cfg.get("output") or {}).get("push_to_hub")
               else 'repo = "path/to/student"  # this folder, or its Hub id once uploaded'),
              "tokenizer = AutoTokenizer.from_pretrained(repo)",
              "model = AutoModelForCausalLM.from_pretrained(repo)", "```", ""]
    command = _command(run["run_info"])
    if command:
        lines += ["## Reproduce", "", "The run was made with:", "", "```bash", command, "```", "",
                  "with the run's `config.yaml`"
                  + (f" (potstill {run['run_info'].get('potstill_version')})" if run["run_info"].get("potstill_version") else "")
                  + ".", ""]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)


def _run_from_report(run_dir: Path, report: dict | None) -> dict[str, Any] | None:
    """This run's numbers inside a build_report result, found by its folder."""
    if not report:
        return None
    for run in (report.get("runs") or {}).values():
        if Path(run["dir"]).resolve() == run_dir.resolve():
            return run
    return None


def write_model_card(run_dir: str | os.PathLike, *, baselines: dict[str, Path] | None = None,
                     report: dict | None = None) -> Path:
    """Write ``RUN/student/README.md`` atomically (and the report's plots beside it); its path."""
    run_dir = Path(run_dir)
    student = run_dir / "student"
    if not student.is_dir():
        raise ConfigError(f"{run_dir} has no student/ folder: the run did not finish, no model card to write")
    text = build_model_card(run_dir, baselines=baselines, report=report)
    for png in report_plots(run_dir, report):  # the card links them relatively: student/ is complete alone
        atomic_write_bytes(student / png.name, png.read_bytes())
    path = student / "README.md"
    atomic_write_text(path, text)
    return path

