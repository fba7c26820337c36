"""``potstill quickstart``: distill the bundled demo teacher, offline, in a few minutes.

    out/
      student-init/       the student before training (random init, fixed seed): both runs start here
      student/            the distilled student            (out/ is the KD run directory)
      metrics.jsonl, tensorboard/, config.yaml, checkpoints/ ...
      baseline-ce/        the same student, steps and data, cross-entropy only (--baseline)
      loss_curve.png      training loss and validation cross-entropy
      report/             potstill report of the run(s): plots, report.md, report.json (student/README.md: the card)
      results.json / results.md   the table printed at the end (test split)

The teacher is a ~20M-parameter Llama trained on the ``python-docs`` corpus by
``scripts/train_demo_teacher.py`` and shipped in ``potstill/assets/demo-teacher``. The
corpus ships with potstill as a pinned snapshot (``potstill/assets/python-docs``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..atomic import atomic_write_text, publish_dir
from ..config import DataConfig, DistillConfig
from ..errors import PotstillError

log = logging.getLogger("potstill")

DEMO_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "demo-teacher"
SEED = 0
# About 6x fewer parameters than the teacher; most of them in the embeddings and head.
STUDENT = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
           "intermediate_size": 384, "max_position_embeddings": 1024, "tie_word_embeddings": False}
DEFAULT_STEPS = 240
MAX_LENGTH = 256


def demo_teacher_path() -> Path:
    if not (DEMO_TEACHER / "config.json").is_file():
        raise PotstillError(f"the demo teacher is missing from {DEMO_TEACHER}: reinstall potstill, or rebuild it with "
                            "python scripts/train_demo_teacher.py")
    return DEMO_TEACHER


def run_config(out: Path, steps: int, student_init: Path, *, ce_only: bool = False) -> DistillConfig:
    """The quickstart's run: KD (default) or the cross-entropy baseline, same everything else."""
    loss = {"logits": {"weight": 0.0}, "ce": {"weight": 1.0}} if ce_only else \
        {"logits": {"weight": 1.0, "divergence": "fkl", "temperature": 1.0}, "ce": {"weight": 0.0}}
    return DistillConfig.model_validate({
        "teacher": {"name_or_path": str(demo_teacher_path())},
        "student": {"name_or_path": str(student_init)},
        "data": {"source": "python-docs", "split": "train", "validation_split": "validation",
                 "max_length": MAX_LENGTH, "packing": True},
        "loss": loss,
        "train": {"max_steps": steps, "batch_size": 16, "grad_accum": 1, "lr": 3e-3, "warmup_steps": max(1, steps // 20),
                  "scheduler": "cosine", "precision": "auto", "seed": SEED, "resume": "auto",
                  "checkpoint_every": max(1, steps // 3), "keep_checkpoints": 1, "log_every": max(1, steps // 60)},
        "eval": {"every": max(1, steps // 5), "max_batches": 8},
        "output": {"dir": str(out)},
    })


def make_student_init(out: Path) -> Path:
    """Build the random-init student once (seeded) and save it, so every run starts from it."""
    from accelerate.utils import set_seed
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = out / "student-init"
    if (path / "config.json").is_file():
        return path
    teacher = demo_teacher_path()
    tok = AutoTokenizer.from_pretrained(teacher)
    set_seed(SEED)
    cfg = AutoConfig.for_model("llama", vocab_size=AutoConfig.from_pretrained(teacher).vocab_size,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **STUDENT)
    model = AutoModelForCausalLM.from_config(cfg)
    tmp = out / ".tmp-student-init"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    publish_dir(tmp, path)
    return path


def test_scores(models: dict[str, Path], teacher: Path, *, progress: bool) -> dict[str, dict]:
    """Test-split metrics of each model folder against the teacher (same tokenized data for all)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import build_datasets
    from ..models.loading import freeze, load_causal_lm
    from ..models.precision import autocast_context, resolve_precision
    from ..training.evaluation import evaluate_models

    tok = AutoTokenizer.from_pretrained(teacher)
    test, _ = build_datasets(DataConfig(source="python-docs", split="test", validation_fraction=0.0,
                                        max_length=MAX_LENGTH), tok, progress=progress, label="test")
    precision = resolve_precision("auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # float32 weights (transformers 5 would keep the teacher's stored bf16); autocast does the rest.
    teacher_model = freeze(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)).to(device)
    rows = {}
    for name, path in models.items():
        # load_causal_lm: BitNet students get their ternary layers back, packed folders load too.
        model = freeze(load_causal_lm(str(path), revision=None, dtype=torch.float32, trust_remote_code=False,
                                      role="model")).to(device)
        scores = evaluate_models(model, test, pad_token_id=tok.pad_token_id, batch_size=16, device=device,
                                 teacher=None if path == teacher else teacher_model,
                                 autocast=autocast_context(precision, device), progress=progress, tokenizer=tok)
        scores["params"] = sum(p.numel() for p in model.parameters())
        rows[name] = scores
    return rows


def quickstart(out: str | Path = "runs/quickstart", steps: int = DEFAULT_STEPS, baseline: bool = False,
               progress: bool = True) -> dict[str, dict]:
    """Distill the demo teacher into a small student, evaluate, and return the results table."""
    from .card import write_model_card
    from .distill import distill
    from .report import build_report, plot_runs, results_table

    if steps < 1:
        raise PotstillError(f"--steps must be at least 1 (got {steps})")
    out = Path(out)
    teacher = demo_teacher_path()
    out.mkdir(parents=True, exist_ok=True)
    init = make_student_init(out)
    log.info("distilling the demo teacher into a %s-layer student for %d steps -> %s",
             STUDENT["num_hidden_layers"], steps, out)
    distill(run_config(out, steps, init), progress=progress)
    runs = {"KD": out}
    models = {"teacher": teacher, "student before": init, "student, KD": out / "student"}
    if baseline:
        log.info("baseline: the same student and steps with cross-entropy only -> %s", out / "baseline-ce")
        distill(run_config(out / "baseline-ce", steps, init, ce_only=True), progress=progress)
        runs["cross-entropy only"] = out / "baseline-ce"
        models["student, CE only"] = out / "baseline-ce" / "student"
    plot_runs(runs, out / "loss_curve.png")
    report = build_report(list(runs.values()), out=out / "report", labels=list(runs))
    write_model_card(out, report=report,
                     baselines={"CE only": out / "baseline-ce"} if baseline else None)
    rows = test_scores(models, teacher, progress=progress)
    atomic_write_text(out / "results.json", json.dumps({"steps": steps, "results": rows}, indent=2))
    atomic_write_text(out / "results.md", results_table(rows, markdown=True) + "\n")
    return rows
