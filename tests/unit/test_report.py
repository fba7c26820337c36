"""`potstill report` and the model card on hand-made run folders: tables, recovery, Markdown
escaping, plots, ownership, and the card's metadata read back by huggingface_hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tiny

from potstill.commands.card import build_model_card, hub_id, write_model_card
from potstill.commands.report import (
    MARK_FILE,
    build_report,
    md_cell,
    md_table,
    recovery,
    results_table,
    run_labels,
)
from potstill.config import config_to_yaml, validate_config
from potstill.errors import PotstillError

PNG = b"\x89PNG\r\n\x1a\n"


def cells(row: str) -> list[str]:
    """The cells of one Markdown table row, as GitHub splits them (escaped pipes stay inside a cell)."""
    assert row.startswith("|") and row.endswith("|"), row
    return re.split(r"(?<!\\)\|", row[1:-1])


def table_rows(markdown: str) -> list[list[list[str]]]:
    """Every table in ``markdown``: its rows as cell lists."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(cells(line))
        elif current:
            tables.append(current)
            current = []
    return tables


def assert_tables_render(markdown: str) -> None:
    tables = table_rows(markdown)
    assert tables
    for table in tables:
        assert all(len(row) == len(table[0]) for row in table), table
        assert all(c.strip() == "---" for c in table[1])


def config(student: dict | None = None, *, teacher: str = "org/teacher", source: str = "org/corpus") -> dict:
    return {"teacher": {"name_or_path": teacher}, "student": student or {"config": dict(tiny.TINY_STUDENT)},
            "data": {"source": source}, "loss": {"logits": {"weight": 1.0, "temperature": 2.0}, "ce": {"weight": 0.5}},
            "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "precision": "fp32"}}


def make_run(folder: Path, cfg: dict | None = None, *, tasks: bool = True, old: bool = False,
             student: bool = False) -> Path:
    """A run folder as a finished run leaves it: config.yaml, metrics.jsonl, summary.json, run_info.json."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_to_yaml(validate_config(cfg or config())))
    evals = {0: (3.0, 0.02, 0.30), 2: (2.6, 0.015, 0.40), 4: (2.5, 0.01, 0.45)}
    records = []
    for step, (ce, kl, acc) in evals.items():
        rec = {"step": step, "eval/ce": ce}
        if not old:
            rec.update({"eval/ppl": 2.718 ** ce, "eval/bpb": ce / 2, "eval/teacher_ce": 2.0, "eval/teacher_ppl": 7.39,
                        "eval/teacher_bpb": 1.0, "eval/kl": kl, "eval/agreement": acc, "eval/tokens": 100.0,
                        "eval/bytes": 300.0})
        records.append(rec)
        if tasks and not old and step in (0, 4):
            records.append({"step": step, "tasks/toy/acc": acc, "tasks/toy/acc_stderr": 0.01})
    for s in range(1, 5):
        train = {"step": s, "loss": 3.0 - 0.1 * s}
        if not old:
            train.update({"loss/kd": 0.5 - 0.05 * s, "loss/ce": 3.0 - 0.1 * s, "tokens_per_s": 1000.0 + s,
                          "peak_mem_mb": 500.0 + s, "lr": 1e-3, "grad_norm": 1.0})
        records.append(train)
    if tasks and not old:
        records.append({"step": 0, "teacher_tasks/toy/acc": 0.5})
    records.sort(key=lambda r: r["step"])
    tiny.write_jsonl(folder / "metrics.jsonl", records)
    if not old:
        (folder / "summary.json").write_text(json.dumps({
            "steps": 4, "student_parameters": 45216, "teacher_parameters": 111024, "train_examples": 10,
            "train_overall": {"steps": 4, "tokens": 512, "tokens_per_s": 900.0, "wall_time_s": 3.5,
                              "peak_mem_mb": 504.0},
            "hardware": {"device": "cpu", "device_name": "Test CPU", "processes": 1, "precision": "fp32",
                         "strategy": "ddp"}}))
        (folder / "run_info.json").write_text(json.dumps(
            {"potstill_version": "0.1.0", "command": ["/x/potstill/__main__.py", "distill", "cfg.yaml"]}))
    if student:
        tiny.build_llama(folder / "student", 64)
    return folder


def test_recovery_is_the_share_of_the_gap_closed_either_direction():
    assert recovery(3.0, 2.5, 2.0) == pytest.approx(0.5)  # lower is better: (before - after) / (before - teacher)
    assert recovery(0.3, 0.4, 0.5) == pytest.approx(0.5)  # higher is better: (after - before) / (teacher - before)
    assert recovery(3.0, 3.5, 2.0) == pytest.approx(-0.5)  # moved away from the teacher
    assert recovery(3.0, 2.5, 3.0) is None  # no gap
    assert recovery(None, 2.5, 2.0) is None and recovery(3.0, 2.5, None) is None
    # The student started beyond the teacher: no gap to close, not a -1000% "recovery" over a tiny reversed gap.
    assert recovery(5.957, 5.696, 5.98, lower_is_better=True) is None
    assert recovery(0.6, 0.7, 0.5, lower_is_better=False) is None
    assert recovery(3.0, 2.5, 2.0, lower_is_better=True) == pytest.approx(0.5)
    assert recovery(0.3, 0.4, 0.5, lower_is_better=False) == pytest.approx(0.5)


def test_a_student_that_starts_beyond_the_teacher_shows_no_recovery(tmp_path):
    run = make_run(tmp_path / "run")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        if "eval/teacher_ce" in r:
            r["eval/teacher_ce"] = 3.5  # worse than the student's 3.0 at step 0
    tiny.write_jsonl(run / "metrics.jsonl", lines)
    report = build_report([run])
    assert report["recovery"]["run"]["ce"] is None and report["recovery"]["run"]["bpb"] == pytest.approx(0.5)
    row = next(line for line in (run / "report" / "report.md").read_text().splitlines() if "validation CE" in line)
    assert cells(row)[-1].strip() == "-"


def test_markdown_cells_never_hold_a_raw_pipe():
    assert md_cell("a|b\nc") == "a\\|b c"
    table = md_table(["x|y", "z"], [["1", "KL(a||b)"], ["2", "-"]])
    assert_tables_render(table)
    quick = results_table({"teacher": {"ppl": 2.0, "kl": None}, "student|x": {"ppl": 3.0, "kl": 0.1}}, markdown=True)
    assert_tables_render(quick)
    assert "||" not in quick


def test_labels_default_to_folder_names_and_are_made_unique(tmp_path):
    runs = [tmp_path / "a" / "kd", tmp_path / "b" / "kd", tmp_path / "ce"]
    assert run_labels(runs, None) == ["kd", "kd-2", "ce"]
    assert run_labels(runs, ["x", "x", "y"]) == ["x", "x-2", "y"]
    with pytest.raises(PotstillError, match="one per run"):
        run_labels(runs, ["x"])


def test_report_of_two_runs(tmp_path):
    kd = make_run(tmp_path / "kd")
    ce = make_run(tmp_path / "ce", tasks=False)
    report = build_report([kd, ce], labels=["KD", "CE|only"])
    out = kd / "report"
    assert report["out"] == out and report["plots"] == ["losses.png", "eval.png", "throughput.png"]
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == PNG
    rec = report["recovery"]["KD"]
    assert rec["ce"] == pytest.approx(0.5) and rec["bpb"] == pytest.approx(0.5)
    assert rec["tasks/toy/acc"] == pytest.approx(0.75)  # (0.45 - 0.30) / (0.50 - 0.30)
    assert "tasks/toy/acc_stderr" not in rec
    md = (out / "report.md").read_text()
    assert_tables_render(md)
    assert "| KD | 4 | 512 |" in md and "CE\\|only" in md and "75%" in md
    assert "![Evaluation](eval.png)" in md
    saved = json.loads((out / "report.json").read_text())
    assert saved["runs"]["KD"]["metrics"]["ce"] == {"title": "validation CE (nats/token)", "lower_is_better": True,
                                                    "teacher": 2.0, "before": 3.0, "after": 2.5, "recovery": 0.5}
    assert saved["runs"]["KD"]["summary"]["tokens_per_s"] == 900.0
    assert json.loads((out / MARK_FILE).read_text())["kind"] == "report"
    build_report([kd])  # its own folder: rewritten
    assert "## Comparison" not in (out / "report.md").read_text()


def test_older_run_reports_fewer_rows(tmp_path):
    run = make_run(tmp_path / "old", old=True)
    report = build_report([run], out=tmp_path / "rep")
    assert list(report["runs"]["old"]["metrics"]) == ["ce"]
    assert report["recovery"]["old"] == {"ce": None}
    assert report["plots"] == ["losses.png", "eval.png"]
    assert_tables_render((tmp_path / "rep" / "report.md").read_text())


def test_report_refuses_in_one_line(tmp_path):
    run = make_run(tmp_path / "run")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(PotstillError, match="not written by potstill") as err:
        build_report([run], out=foreign)
    assert "\n" not in str(err.value) and (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    with pytest.raises(PotstillError, match="no metrics.jsonl"):
        build_report([tmp_path / "empty"])
    (tmp_path / "norecords").mkdir()
    (tmp_path / "norecords" / "config.yaml").write_text(config_to_yaml(validate_config(config())))
    (tmp_path / "norecords" / "metrics.jsonl").write_text("")
    with pytest.raises(PotstillError, match="no records"):
        build_report([tmp_path / "norecords"])


def card_data(path: Path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()


@pytest.mark.parametrize("student, teacher, base, relation", [
    ({"config": dict(tiny.TINY_STUDENT)}, "org/teacher", None, None),
    ({"name_or_path": "org/small"}, "org/teacher", "org/small", "finetune"),
    ({"from_teacher": {"every": 2}}, "org/teacher", "org/teacher", "finetune"),
    ({"config": dict(tiny.TINY_STUDENT)}, "LOCAL", None, None),
])
def test_card_metadata_round_trip(tmp_path, student, teacher, base, relation):
    local_teacher = tmp_path / "my-teacher"
    local_teacher.mkdir()
    teacher = str(local_teacher) if teacher == "LOCAL" else teacher
    run = make_run(tmp_path / "run", config(student, teacher=teacher), student=True)
    path = write_model_card(run)
    assert path == run / "student" / "README.md"
    data = card_data(path)
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"distillation", "knowledge-distillation", "potstill"} <= set(data["tags"])
    assert data.get("base_model") == base and data.get("base_model_relation") == relation
    assert data.get("teacher_model") == (None if teacher == str(local_teacher) else "org/teacher")
    assert data["datasets"] == ["org/corpus"]
    text = path.read_text()
    assert str(tmp_path) not in text  # local paths are named by folder name only
    assert ("`my-teacher`" if teacher == str(local_teacher) else "org/teacher") in text
    assert "finetuned from" not in text.lower()
    from huggingface_hub import ModelCard

    results = {r.metric_type: r.metric_value for r in ModelCard.load(path).data.eval_results}
    assert results["perplexity"] == pytest.approx(2.718 ** 2.5, rel=1e-5)
    assert results["bits_per_byte"] == pytest.approx(1.25) and results["acc"] == pytest.approx(0.45)


def test_card_body_with_baseline_plots_and_command(tmp_path):
    kd = make_run(tmp_path / "kd", config(source=str(tmp_path / "data.jsonl")), student=True)
    ce = make_run(tmp_path / "ce", tasks=False)
    report = build_report([kd])
    text = build_model_card(kd, baselines={"CE only": ce}, report=report)
    assert "datasets" not in card_data_text(text)
    assert_tables_render(text.split("\n---\n", 1)[1])
    assert "| CE only | CE only recovery |" in text
    assert "potstill distill cfg.yaml" in text and "temperature 2.0" in text and "weight 0.5" in text
    write_model_card(kd, baselines={"CE only": ce}, report=report)
    for name in report["plots"]:
        assert f"]({name})" in text and (kd / "student" / name).read_bytes()[:8] == PNG
    assert hub_id("org/name") == "org/name" and hub_id("data.jsonl") is None and hub_id(str(tmp_path)) is None
    assert hub_id("python-docs") is None and hub_id("org/corpus") == "org/corpus"


def test_card_names_local_paths_by_folder_and_the_builtin_corpus_as_no_dataset(tmp_path, monkeypatch):
    """Relative paths in the config point where the run was started, not where the card is written:
    ``my-teacher`` next to runs/kd is a local folder, not the Hub id "my-teacher"."""
    launch = tmp_path / "project"
    (launch / "my-teacher").mkdir(parents=True)
    cfg = config({"from_teacher": {"every": 2}}, teacher="my-teacher", source="python-docs")
    cfg["output"] = {"dir": "runs/kd"}
    run = make_run(launch / "runs" / "kd", cfg, student=True)
    monkeypatch.chdir(tmp_path)  # elsewhere: "my-teacher" does not exist here
    data = card_data(write_model_card(run))
    assert "base_model" not in data and "teacher_model" not in data and "datasets" not in data
    text = (run / "student" / "README.md").read_text()
    assert "`my-teacher`" in text and "`python-docs` corpus built into potstill" in text
    assert "layers 0, 2, 4, ..." in text
    from huggingface_hub import ModelCard

    dataset_types = {r.dataset_type for r in ModelCard.load(run / "student" / "README.md").data.eval_results}
    assert "python-docs" in dataset_types


def card_data_text(text: str) -> str:
    return text.split("\n---\n", 1)[0]
