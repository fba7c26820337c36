"""``potstill plan CONFIG``: the per-device memory of a run, before running it.

Reads the run config and the models' configs only (built on the meta device, never a weight),
estimates each part (:mod:`potstill.models.memory`) for DDP and FSDP over the given numbers of
devices, and says which fit and the largest ``train.batch_size`` that does.

On CPU the "runtime" line (Python, torch, transformers, datasets and the rest a run holds
before its models) is measured, not guessed: this command imports what ``potstill distill``
imports and reads its own resident memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.memory import GB, MB, PlanRow, Setting, plan_rows, run_models, setting_from_config

PLAN_FORMAT = "potstill-plan"
# The lines of the table, in order: (label, key in Estimate.parts).
PART_LINES = (("student weights", "weights"), ("gradients", "gradients"), ("optimizer state", "optimizer"),
              ("teacher", "teacher"), ("activations", "activations"), ("loss buffers", "loss"),
              ("runtime", "runtime"))


def parse_devices(text: str | None, device_type: str) -> list[int]:
    """``--devices`` "N" or "N,M,...": counts of devices (processes); default 1,2 on CPU, 1,2,4,8 on CUDA."""
    if text is None:
        return [1, 2] if device_type == "cpu" else [1, 2, 4, 8]
    counts = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= 65536:
            raise ConfigError(f"--devices {text}: give a whole number of devices from 1 to 65536, or several "
                              "separated by commas, e.g. --devices 8 or --devices 1,2,8")
        counts.append(int(part))
    return sorted(set(counts))


def check_device_memory(gb: float | None) -> None:
    import math

    if gb is not None and not (math.isfinite(gb) and 0 < gb <= 1 << 20):
        raise ConfigError(f"--device-memory {gb}: give the memory of one device in GB (2**30 bytes), a number "
                          "above 0, e.g. --device-memory 80")


def target_device(choice: str | None) -> str:
    """The device type runs will use: --device, else cuda where torch sees one, else cpu."""
    if choice is not None:
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_memory() -> int:
    """This machine's RAM in bytes (MemTotal)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS), in bytes."""
    from ..training.metrics import process_status_kib

    rss = process_status_kib("VmRSS")
    if rss is None:
        raise OSError("no VmRSS in /proc/self/status")
    return rss * 1024


def measure_runtime() -> int:
    """What a CPU run holds before its models: the RSS of this process after importing what
    ``potstill distill`` imports (torch, transformers with the model's code, already imported by
    the meta-device builds, accelerate, datasets, the training package). A run's peak RSS
    (metrics.jsonl ``peak_mem_mb``) counts the same."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401

    from ..training import loop  # noqa: F401  (the run's own imports: losses, teachers, data)

    try:
        return resident_bytes()
    except OSError:
        return 0


def capacity(n: int, device_type: str, device_memory_gb: float | None) -> int:
    """Bytes one of ``n`` devices may use: --device-memory, else the GPU's memory, else this
    machine's RAM shared by the ``n`` processes of a CPU run."""
    if device_memory_gb is not None:
        return int(device_memory_gb * GB)
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
        raise ConfigError("potstill plan --device cuda on a machine without a GPU: give --device-memory GB "
                          "(the memory of one GPU, e.g. 80)")
    return machine_memory() // n


def build_plan(config: str | Path, overrides: list[str] | None = None, *, devices: str | None = None,
               device_memory_gb: float | None = None, device: str | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready dict: models, setting, one row per strategy and device count."""
    from ..config import load_config

    check_device_memory(device_memory_gb)
    cfg = load_config(config, overrides or [])
    device_type = target_device(device)
    counts = parse_devices(devices, device_type)
    cache_k = None
    if cfg.teacher.cache is not None:
        from ..teachers.cache_format import read_manifest

        cache_k = int(read_manifest(Path(cfg.teacher.cache)).get("k") or 1)
    models = run_models(cfg, cache_k=cache_k)
    runtime = measure_runtime() if device_type == "cpu" else 0
    import torch

    threads = torch.get_num_threads() if device_type == "cpu" else 1
    setting = setting_from_config(cfg, models, device_type=device_type, runtime=runtime, threads=threads)
    rows: list[PlanRow] = []
    for n in counts:
        # torchrun gives each of several CPU processes one thread unless OMP_NUM_THREADS says otherwise.
        st = setting if n == 1 or device_type != "cpu" else replace(setting, threads=1)
        rows += plan_rows(models.student, models.teacher, st, [n],
                          lambda k: capacity(k, device_type, device_memory_gb))
    per_example = cfg.onpolicy.num_completions if cfg.onpolicy.enabled else 1
    if per_example > 1:  # the estimate counted sequences; train.batch_size counts prompts
        for r in rows:
            r.largest_batch //= per_example
            r.largest_batch_other //= per_example
    return {
        "format": PLAN_FORMAT, "version": 1, "config": str(config), "overrides": list(overrides or []),
        "device_type": device_type, "device_memory_gb": device_memory_gb,
        "student": asdict(models.student), "student_source": models.student_source,
        "teacher": asdict(models.teacher) if models.teacher is not None else None,
        "teacher_kind": models.teacher_kind, "setting": asdict(setting),
        "runtime_measured": device_type == "cpu",
        "rows": [row_dict(r) for r in rows],
    }


def row_dict(r: PlanRow) -> dict[str, Any]:
    return {"strategy": r.strategy, "devices": r.devices, "capacity": r.capacity,
            "estimate": r.estimate.as_dict(), "estimate_other_checkpointing": r.estimate_other.as_dict(),
            "total": r.estimate.total, "fits": r.fits, "largest_batch_size": r.largest_batch,
            "total_other_checkpointing": r.estimate_other.total, "fits_other_checkpointing": r.fits_other,
            "largest_batch_size_other_checkpointing": r.largest_batch_other, "notes": r.notes}


def millions(n: int) -> str:
    """A parameter count: 70.55B, 129.5M, 3.42M, 0.031M."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    m = n / 1e6
    return f"{m:.1f}M" if m >= 10 else f"{m:.2f}M" if m >= 0.1 else f"{m:.3f}M"


def describe(plan: dict[str, Any]) -> str:
    """The plan's header line: the models, the teacher, precision, micro-batch and loss path."""
    s, t, st = plan["student"], plan["teacher"], Setting(**plan["setting"])
    teacher = {"local": f"local {t['model_class'] if t else ''} {millions(t['params'])} params "
                        f"({'int' + st.quantization[3:] if st.quantization != 'none' else {2: 'bf16', 4: 'fp32'}[st.teacher_bytes]})"
               if t else "local",
               "cache": f"cache (top-{st.top_k})", "served": f"served (top-{st.top_k})",
               "none": "none"}[plan["teacher_kind"]]
    if plan["teacher_kind"] == "local" and t is not None and not (st.kd or st.features):
        teacher += ", evaluation only"
    terms = [x for x, on in (("logits " + st.divergence, st.kd), ("ce", st.ce or not (st.kd or st.features)),
                             ("features", st.features)) if on]
    return (f"student {s['model_class']} {millions(s['params'])} params ({plan['student_source']}); "
            f"teacher: {teacher}\n"
            f"{st.precision} on {plan['device_type']}; micro-batch {st.batch_size} x {st.seq_len} tokens, "
            f"grad_accum {st.grad_accum}; loss path {st.loss_path} ({' + '.join(terms)})")


def format_plan(plan: dict[str, Any]) -> str:
    """The table: one column per strategy x devices, MB (2**20 bytes) per device."""
    rows = plan["rows"]
    st = Setting(**plan["setting"])
    ckpt = "on" if st.checkpointing else "off"
    other = "off" if st.checkpointing else "on"
    heads = [f"{r['strategy']} x{r['devices']}" for r in rows]
    label_width = 34
    width = max(11, *(len(h) + 2 for h in heads))

    def line(label: str, cells: list[str]) -> str:
        return label.ljust(label_width) + "".join(c.rjust(width) for c in cells)

    def mb(x: float) -> str:
        return f"{x / MB:,.0f}"

    out = [describe(plan), "", line("MB per device" + (" (process)" if plan["device_type"] == "cpu" else ""), heads)]
    for label, key in PART_LINES:
        if key == "activations":
            out.append(line(f"activations (checkpointing {ckpt})", [mb(r["estimate"]["parts"][key]) for r in rows]))
            out.append(line(f"activations (checkpointing {other})",
                            [mb(r["estimate_other_checkpointing"]["parts"][key]) for r in rows]))
            continue
        if key == "runtime" and plan["device_type"] == "cuda":
            label = "runtime (CUDA context, assumed)"
        elif key == "runtime":
            label = "runtime (measured here)"
        out.append(line(label, [mb(r["estimate"]["parts"][key]) for r in rows]))
    if plan["device_type"] == "cpu":
        out.append(line("loading (peak while loading)", [mb(r["estimate"]["phases"]["loading"]) for r in rows]))
    else:
        out.append(line("loading (host memory, not device)", [mb(r["estimate"]["host_loading"]) for r in rows]))
    out.append(line(f"peak (checkpointing {ckpt})", [mb(r["total"]) for r in rows]))
    out.append(line(f"peak (checkpointing {other})", [mb(r["total_other_checkpointing"]) for r in rows]))
    out.append(line("memory per device", [mb(r["capacity"]) for r in rows]))
    out.append(line(f"fits (checkpointing {ckpt})", ["yes" if r["fits"] else "NO" for r in rows]))
    out.append(line(f"fits (checkpointing {other})", ["yes" if r["fits_other_checkpointing"] else "NO" for r in rows]))
    out.append(line(f"largest batch_size ({ckpt})", [str(r["largest_batch_size"]) for r in rows]))
    out.append(line(f"largest batch_size ({other})", [str(r["largest_batch_size_other_checkpointing"]) for r in rows]))
    notes = sorted({n for r in rows for n in r["notes"]})
    out.append("")
    out.append("peak = the largest of a step's phases (teacher forward, loss, backward, optimizer step) and, on CPU, loading; "
               "parts are not additive.")
    if plan["device_type"] == "cpu":
        out.append("CPU: a 'device' is a process; without --device-memory the machine's RAM is shared by the processes.")
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def check_json_output(path: str) -> None:
    """--json FILE: its folder exists; an existing file is overwritten only if it is an earlier plan."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"--json {path} is a folder: give a file name, e.g. {Path(path) / 'plan.json'}")
    if not p.parent.is_dir():
        raise ConfigError(f"--json {path}: the folder {p.parent} does not exist: create it first")
    if p.exists():
        from ..ownership import read_json_object

        data = read_json_object(p)
        if data is None or data.get("format") != PLAN_FORMAT:
            raise ConfigError(f"--json {path} exists and is not an earlier potstill plan: potstill does not "
                              "overwrite your files; give a new file name")


def write_json(path: str, plan: dict[str, Any]) -> None:
    from ..atomic import atomic_write_text

    atomic_write_text(path, json.dumps(plan, indent=2) + "\n")

