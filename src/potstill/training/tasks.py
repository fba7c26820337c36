"""Task evaluation through lm-evaluation-harness (the ``lm-eval`` package, ``potstill[eval]``).

    check_tasks(["hellaswag", "my_task"], ["tasks/"])      before any model loads: one line per mistake
    run_tasks(model, tokenizer, ["my_task"], task_paths=["tasks/"], limit=100)
        -> {"my_task": {"acc": 0.41, "acc_stderr": 0.05, "acc_norm": 0.44, "acc_norm_stderr": 0.05}}
    flatten_task_metrics(...) -> {"my_task/acc": 0.41, ...}   (metrics.jsonl: "tasks/my_task/acc")

The model is the object already in memory (the student being trained, a loaded teacher),
wrapped in lm-eval's ``HFLM``; nothing is loaded again. Tasks are lm-eval's own by name
(their datasets come from the hub, so they need the network once) or local task YAMLs in
``task_paths`` (offline with local data files). A local YAML's relative ``data_files`` are
resolved against the YAML's folder; lm-eval itself reads them from the working directory.

What lm-eval returns (``simple_evaluate(...)["results"]``, lm-eval 0.4.x): per task and per
group, ``{"alias": name, "<metric>,<filter>": value, "<metric>_stderr,<filter>": value or
"N/A"}``; the filter is ``none`` unless the task names its own (``filter_list``). Here that
becomes ``{"<metric>": v, "<metric>_stderr": v}``, or ``"<metric>_<filter>"`` for a named
filter; "N/A" and other non-numbers are left out.

Called in the middle of a training run (``eval.tasks_every``), so it leaves the caller's
state as it found it: the model's train/eval mode and the Python, NumPy and torch RNGs.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ModelError

log = logging.getLogger("potstill")

INSTALL = "pip install 'potstill[eval]' (lm-evaluation-harness)"
BOOTSTRAP_ITERS = 1000  # only metrics without a closed-form stderr (bleu, f1, ...) resample; mean-type ones do not
# Indexing lm-eval's ~15k built-in task YAMLs takes ~5 s (2 CPU cores); a folder of local YAMLs
# alone takes ~1 ms. Managers are built once per (paths, with built-ins) and kept.
_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}
_LOCAL_KINDS = ("TASK", "PY_TASK")  # a local group or tag may name built-in tasks: those need the full index


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks  # the TaskManager lives here
    except ImportError:
        raise ConfigError(f"task evaluation (eval.tasks, evaluate --tasks) needs lm-evaluation-harness: "
                          f"{INSTALL}") from None
    return lm_eval


def _resolved(task_paths: Sequence[str | Path]) -> tuple[str, ...]:
    return tuple(str(Path(p).expanduser().resolve()) for p in task_paths)


def _manager(paths: tuple[str, ...], builtins: bool):
    key = (paths, builtins)
    if key not in _MANAGERS:
        TaskManager = _lm_eval().tasks.TaskManager
        with quiet_lm_eval():
            _MANAGERS[key] = TaskManager(include_path=list(paths) or None, include_defaults=builtins)
    return _MANAGERS[key]


def task_manager(task_paths: Sequence[str | Path] = (), tasks: Sequence[str] | None = None):
    """lm-eval's TaskManager over ``task_paths`` and its built-in tasks (cached per path set).

    With ``tasks``: when every one is a plain task in ``task_paths``, a manager over those
    folders alone (~1 ms instead of ~5 s for the built-in index)."""
    paths = _resolved(task_paths)
    if tasks is not None and paths:
        local = _manager(paths, builtins=False)
        entries = [local.task_index.get(name) for name in tasks]
        if all(e is not None and e.kind.name in _LOCAL_KINDS for e in entries):
            return local
    return _manager(paths, builtins=True)


def check_tasks(tasks: Sequence[str], task_paths: Sequence[str | Path] = ()) -> None:
    """lm-eval is installed, each task folder exists, each task name is known: one ConfigError
    line otherwise, naming the task and the closest known names.

    Cost: importing lm-eval ~1 s; tasks all found in ``task_paths`` ~1 ms more; any other name
    (an lm-eval task, a typo) indexes lm-eval's ~15k built-in tasks once per process, ~5 s on
    2 CPU cores (measured, lm-eval 0.4.13)."""
    for path in task_paths:
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(f"task folder {path} does not exist (eval.task_paths / --task-dir): give a folder "
                              "of lm-eval task YAMLs, e.g. examples/lm-eval-tasks")
        if not (p.is_dir() or p.suffix in (".yaml", ".yml")):
            raise ConfigError(f"task folder {path} is neither a folder nor a .yaml file (eval.task_paths / --task-dir)")
    if not tasks:
        raise ConfigError("no task names given (eval.tasks / --tasks): name lm-eval tasks or local task YAMLs")
    manager = task_manager(task_paths, tasks)
    known = set(manager.all_tasks)
    for name in tasks:
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = f"lm-eval's tasks or {', '.join(map(str, task_paths))}" if task_paths else "lm-eval's tasks"
        raise ConfigError(f"unknown task {name!r}: not among {where}{hint}; local task YAMLs go in "
                          "eval.task_paths (or --task-dir)")


def run_tasks(model: nn.Module, tokenizer, tasks: Sequence[str], *, task_paths: Sequence[str | Path] = (),
              limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
              max_length: int | None = None, device: torch.device | str = "cpu", seed: int = 0,
              progress: bool = True) -> dict[str, dict[str, float]]:
    """Score ``model`` on ``tasks``: {task or group: {metric: value}}.

    lm-eval's ``"acc,none"`` becomes ``"acc"`` and ``"acc_stderr,none"`` ``"acc_stderr"``; a
    task's named filter keeps its name (``"exact_match,first_word"`` -> ``"exact_match_first_word"``);
    values that are not numbers (lm-eval's "N/A") are left out. Groups appear beside their tasks.

    ``model``: a Hugging Face causal LM (``.config``, ``.device``, ``generate``) on its device;
    HFLM takes it as it is (its dtype, its device: ``device`` is not used to move it) and calls
    its ``eval()`` and ``tie_weights()``. ``tokenizer``: the model's; HFLM gives it a pad token
    if it has none (unk, else eos). ``max_length``: the longest context+continuation scored
    (left-truncated); default the model's ``max_position_embeddings``. ``limit``: the first
    ``limit`` examples of each task. ``num_fewshot``: default each task's own. Autocast, if
    any, is the caller's. Seeded by ``seed`` (Python, NumPy, torch and the few-shot sampler):
    the same call gives the same numbers; the caller's RNG states and train/eval mode are
    restored afterwards. ``progress``: lm-eval's own bars (False hides them)."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    if not all(hasattr(model, attr) for attr in ("config", "device", "generate")):
        raise ModelError(f"task evaluation needs a Hugging Face causal LM (a PreTrainedModel), not "
                         f"{type(model).__name__}")
    check_tasks(tasks, task_paths)
    manager = task_manager(task_paths, tasks)
    specs = [local_task_config(manager, name, task_paths) or name for name in tasks]
    was_training = model.training
    try:
        with preserved_rng(), quiet_lm_eval(), lean_evaluator(progress):
            lm = (HFLM if progress else silent(HFLM))(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                                      max_length=max_length, device=str(device))
            out = lm_eval.simple_evaluate(
                model=lm, tasks=specs, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS, verbosity=None)
    finally:
        model.train(was_training)
    return parse_results(out or {})


def silent(hflm: type) -> type:
    """``hflm`` with its per-request progress bars off (lm-eval's evaluator never asks)."""

    class SilentHFLM(hflm):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return SilentHFLM


@contextlib.contextmanager
def lean_evaluator(progress: bool) -> Iterator[None]:
    """What simple_evaluate does beyond scoring, left out for the call's length: the environment
    report it attaches to its results (torch's collect_env: subprocesses, ~0.9 s a call), the
    process pool it bootstraps stderrs in (forked in the middle of a training run), and,
    without ``progress``, the bars of building each task's requests."""
    from lm_eval import evaluator
    from lm_eval.api import task as api_task

    patched = [(evaluator, "add_env_info", lambda storage: None)]
    if not progress:
        patched.append((api_task, "tqdm", functools.partial(api_task.tqdm, disable=True)))
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched if hasattr(mod, name)]
    old_env = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    for mod, name, value in patched:
        if hasattr(mod, name):
            setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        if old_env is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old_env


def local_task_config(manager, name: str, task_paths: Sequence[str | Path]) -> dict[str, Any] | None:
    """The config of a plain task from one of ``task_paths``, its relative ``data_files`` made
    absolute against its YAML's folder; None for lm-eval's own tasks, groups and tags."""
    if not task_paths:
        return None
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    roots = [Path(p).expanduser().resolve() for p in task_paths]
    if entry is None or entry.yaml_path is None or entry.kind.name != "TASK":
        return None
    yaml_path = Path(entry.yaml_path).resolve()
    if not any(yaml_path == r or r in yaml_path.parents for r in roots):
        return None
    cfg = load_yaml(yaml_path, resolve_func=True)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        cfg["dataset_kwargs"]["data_files"] = _absolute(files, yaml_path.parent)
    return cfg


def _absolute(files, base: Path):
    """data_files (a path, a list, or a split -> path(s) mapping) with relative paths under ``base``."""
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_absolute(f, base) for f in files]
    path = Path(str(files)).expanduser()
    if "://" in str(files) or path.is_absolute():
        return str(files)
    return str(base / path)


def parse_results(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` section (tasks and groups) as {task: {metric: float}}."""
    parsed: dict[str, dict[str, float]] = {}
    for task, metrics in (out.get("results") or {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("none", "") else f"{metric}_{filt}"] = float(value)
        if row:
            parsed[task] = row
    return parsed


TASKS, TEACHER_TASKS = "tasks/", "teacher_tasks/"  # key prefixes of the scores (metrics.jsonl, evaluate --json)


def score_models(models: Sequence[tuple[str, nn.Module]], tokenizer, tasks: Sequence[str], *,
                 autocast=contextlib.nullcontext, **run_kwargs) -> dict[str, float]:
    """:func:`run_tasks` for each (prefix, model), under ``autocast``, flattened under its prefix:
    ``{"tasks/<task>/<metric>": v, "teacher_tasks/<task>/<metric>": v, ...}``."""
    record: dict[str, float] = {}
    for prefix, model in models:
        with autocast():
            scores = run_tasks(model, tokenizer, tasks, **run_kwargs)
        record.update({prefix + k: v for k, v in flatten_task_metrics(scores).items()})
    return record


def flatten_task_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} -> {"task/metric": v}: the keys of ``tasks/...`` records in metrics.jsonl."""
    return {f"{task}/{metric}": value for task, row in results.items() for metric, value in row.items()}


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """The Python, NumPy and torch RNG states as they were before (lm-eval seeds them all)."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's INFO and WARNING lines (task configs, "pretrained is not a str", chat-template
    notes) down to errors, unless potstill's own logger is at DEBUG."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval")]
    levels = [lg.level for lg in loggers]
    if not log.isEnabledFor(logging.DEBUG):
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
