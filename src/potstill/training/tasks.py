"""Task evaluation through lm-evaluation-harness (the ``lm-eval`` package, ``potstill[eval]``).

    check_tasks(["hellaswag", "my_task"], ["tasks/"])      before any model loads: one line per mistake
    run_tasks(model, tokenizer, ["my_task"], task_paths=["tasks/"], limit=100)
        -> {"my_task": {"acc": 0.41, "acc_stderr": 0.05, ...}}

The model is the object already in memory (the student being trained, a loaded teacher),
wrapped in lm-eval's ``HFLM``; nothing is loaded again. Tasks are lm-eval's own by name
(their datasets come from the hub, so they need the network once) or local task YAMLs in
``task_paths`` (offline with local data files). A local YAML's relative ``data_files`` are
resolved against the YAML's folder; lm-eval itself reads them from the working directory.

Called in the middle of a training run (``eval.tasks_every``), so it leaves the caller's
state as it found it: the model's train/eval mode and the Python, NumPy and torch RNGs.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger("potstill")

INSTALL = "pip install 'potstill[eval]' (lm-evaluation-harness)"
_MANAGERS: dict[tuple[str, ...], Any] = {}  # indexing lm-eval's ~15k built-in tasks takes seconds: once per path set


def task_manager(task_paths: Sequence[str | Path] = ()):
    """lm-eval's TaskManager over its built-in tasks and ``task_paths`` (cached per path set)."""
    key = tuple(str(Path(p).expanduser().resolve()) for p in task_paths)
    if key not in _MANAGERS:
        TaskManager = _lm_eval().tasks.TaskManager
        with quiet_lm_eval():
            _MANAGERS[key] = TaskManager(include_path=list(key) or None)
    return _MANAGERS[key]


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401 - the TaskManager lives here
    except ImportError:
        raise ConfigError(f"task evaluation (eval.tasks, evaluate --tasks) needs lm-evaluation-harness: "
                          f"{INSTALL}") from None
    return lm_eval


def check_tasks(tasks: Sequence[str], task_paths: Sequence[str | Path] = ()) -> None:
    """lm-eval is installed, each task folder exists, each task name is known: one ConfigError
    line otherwise, naming the task and the closest known names."""
    for path in task_paths:
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(f"task folder {path} does not exist (eval.task_paths / --task-dir): give a folder "
                              "of lm-eval task YAMLs, e.g. examples/lm-eval-tasks")
        if not (p.is_dir() or p.suffix in (".yaml", ".yml")):
            raise ConfigError(f"task folder {path} is neither a folder nor a .yaml file (eval.task_paths / --task-dir)")
    manager = task_manager(task_paths)
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
    """Score ``model`` on ``tasks``: {task or group: {metric: value}}, lm-eval's ``"acc,none"``
    keys as ``"acc"`` and ``"acc_stderr,none"`` as ``"acc_stderr"`` (other filters keep their
    name: ``"exact_match,strip"`` -> ``"exact_match_strip"``); values that are not numbers
    (lm-eval's "N/A") are left out. Seeded by ``seed``: the same call gives the same numbers.
    ``progress``: lm-eval's own bars (False hides them, e.g. for logs written to a file)."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    check_tasks(tasks, task_paths)
    manager = task_manager(task_paths)
    specs = [local_task_config(manager, name, task_paths) or name for name in tasks]
    was_training = model.training
    model.eval()
    try:
        with preserved_rng(), quiet_lm_eval():
            lm = (HFLM if progress else silent(HFLM))(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                                      max_length=max_length, device=str(device))
            out = lm_eval.simple_evaluate(
                model=lm, tasks=specs, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                log_samples=False, bootstrap_iters=0 if limit else 1000, verbosity=None)
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


def local_task_config(manager, name: str, task_paths: Sequence[str | Path]) -> dict[str, Any] | None:
    """The config of a plain task from one of ``task_paths``, its relative ``data_files`` made
    absolute against its YAML's folder; None for lm-eval's own tasks, groups and tags."""
    if not task_paths:
        return None
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    roots = [Path(p).expanduser().resolve() for p in task_paths]
    if entry is None or entry.yaml_path is None or entry.kind.name not in ("TASK",):
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
    """lm-eval's ``results`` section as {task: {metric: float}}."""
    parsed: dict[str, dict[str, float]] = {}
    for task, metrics in (out.get("results") or {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("none", "") else f"{metric}_{filt}"] = float(value)
        if row:
            parsed[task] = row
    return parsed


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
    """lm-eval's INFO and WARNING lines (task configs, chat-template notes) down to errors, unless
    potstill's own logger is at DEBUG. Its progress bars stay: they show the work is moving."""
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
