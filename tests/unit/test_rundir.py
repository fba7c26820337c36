"""The run directory (potstill.training.rundir): potstill writes into, and deletes from, only its own runs;
overwrite never deletes what the run reads; resume takes the newest intact checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from potstill import atomic
from potstill.config import as_config
from potstill.errors import RunDirError
from potstill.ownership import MARK_FILE, mark_owned, owner_kind
from potstill.training import checkpoint as ckpt
from potstill.training.rundir import RUN_ARTIFACTS, prepare_run_dir


def config(run, tmp_path, **sections):
    """A valid config whose inputs lie outside ``run`` unless a test moves them; ``sections`` override."""
    raw = {"teacher": {"name_or_path": str(tmp_path / "teacher")},
           "student": {"config": {"hidden_size": 32}},
           "data": {"source": str(tmp_path / "data.jsonl")},
           "output": {"dir": str(run)}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return as_config(raw)


class _Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 4))

    def save_pretrained(self, path, safe_serialization=True):
        path.mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach()}, str(path / "model.safetensors"))


def save_checkpoint(run, step):
    """A real checkpoint, written and published as the loop does."""
    model = _Student()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tmp = ckpt.temp_checkpoint_dir(run, step)
    ckpt.write_process_state(tmp, 0)
    ckpt.write_main_state(tmp, model=model, tokenizer=None, optimizer=optimizer, scheduler=scheduler,
                          state={"step": step, "max_steps": 8})
    final = ckpt.final_checkpoint_dir(run, step)
    atomic.publish_dir(tmp, final)
    return final


def make_run(run, *, mark=True):
    """A finished run of every artifact, as potstill leaves it (marked unless ``mark=False``)."""
    run.mkdir(parents=True, exist_ok=True)
    if mark:
        mark_owned(run, "run")
    save_checkpoint(run, 2)
    for folder in ("student", "projectors", "tensorboard"):
        (run / folder).mkdir()
        (run / folder / "file.bin").write_bytes(b"\x00" * 8)
    (run / "config.yaml").write_text("train: {}\n")
    (run / "run_info.json").write_text(json.dumps({"potstill_version": "0.1.0"}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "summary.json").write_text("{}")
    return run


def snapshot(folder):
    """Every file below ``folder`` (symlinks as their target) with its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    out[rel] = fh.read()
    return out


def test_a_new_folder_is_marked_as_a_run(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(config(run, tmp_path), run, is_main=True) is None
    assert owner_kind(run) == "run"


def test_other_processes_do_not_mark(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(config(run, tmp_path), run, is_main=False) is None
    assert owner_kind(run) is None


@pytest.mark.parametrize("overwrite, resume", [(False, False), (True, False), (False, "auto"), (True, "auto")])
def test_a_users_folder_with_run_names_is_refused_whatever_the_settings(tmp_path, overwrite, resume):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.yaml").write_text("my: own config\n")
    (run / "student").mkdir()
    (run / "student" / "weights.bin").write_bytes(b"precious")
    before = snapshot(run)
    cfg = config(run, tmp_path, output={"overwrite": overwrite}, train={"resume": resume})
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(cfg, run, is_main=True)
    message = str(err.value)
    assert "\n" not in message
    assert f"output.dir {run} holds student, config.yaml that potstill did not write" in message
    assert "choose another output.dir" in message
    assert snapshot(run) == before
    assert not (run / MARK_FILE).exists()


def test_a_users_folder_without_run_names_is_used_and_left_intact(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / ".tmp-student").mkdir()  # looks like a leftover, but this folder is not (yet) a run: not touched
    assert prepare_run_dir(config(run, tmp_path), run, is_main=True) is None
    assert (run / "notes.txt").read_text() == "mine" and (run / ".tmp-student").is_dir()
    assert owner_kind(run) == "run"


def test_a_folder_holding_another_kind_of_output_is_refused(tmp_path):
    run = tmp_path / "cache"
    mark_owned(run, "cache")
    with pytest.raises(RunDirError, match="holds a potstill cache, not a run: choose another output.dir"):
        prepare_run_dir(config(run, tmp_path, output={"overwrite": True}), run, is_main=True)


def test_overwrite_deletes_only_the_artifacts_of_our_run(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.png").write_bytes(b"png")
    before = snapshot(run)
    with pytest.raises(RunDirError, match=r"already holds a run \(checkpoints up to step 2\)"):
        prepare_run_dir(config(run, tmp_path), run, is_main=True)
    assert snapshot(run) == before

    assert prepare_run_dir(config(run, tmp_path, output={"overwrite": True}), run, is_main=True) is None
    assert sorted(p.name for p in run.iterdir()) == [MARK_FILE, "analysis", "notes.txt"]
    assert (run / "notes.txt").read_text() == "mine" and (run / "analysis" / "plot.png").read_bytes() == b"png"


def test_other_processes_never_delete(tmp_path):
    run = make_run(tmp_path / "run")
    before = snapshot(run)
    assert prepare_run_dir(config(run, tmp_path, output={"overwrite": True}), run, is_main=False) is None
    assert snapshot(run) == before


def test_a_legacy_run_is_ours_and_gets_marked(tmp_path):
    run = make_run(tmp_path / "run", mark=False)
    assert owner_kind(run) is None
    prepare_run_dir(config(run, tmp_path, output={"overwrite": True}), run, is_main=True)
    assert sorted(p.name for p in run.iterdir()) == [MARK_FILE]
    assert owner_kind(run) == "run"


def test_run_info_without_potstill_version_is_not_a_legacy_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text('{"mine": true}')
    with pytest.raises(RunDirError, match="holds run_info.json that potstill did not write"):
        prepare_run_dir(config(run, tmp_path, output={"overwrite": True}), run, is_main=True)
    assert (run / "run_info.json").read_text() == '{"mine": true}'


def _inside(run, rel, *, folder=False):
    path = run / rel
    if folder:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"text": "data"}\n')
    return path


@pytest.mark.parametrize("key, rel, folder", [
    ("student.name_or_path", "student", True),
    ("student.tokenizer", "student", True),
    ("teacher.name_or_path", "checkpoints/step-000002/student", True),
    ("teacher.tokenizer", "projectors/tok", True),
    ("teacher.cache", "tensorboard/cache", True),
    ("data.source", "student/train.jsonl", False),
    ("data.source", "metrics.jsonl", False),
    ("data.validation_source", "checkpoints/val.jsonl", False),
    ("data.cache_dir", "checkpoints/data-cache", True),
])
@pytest.mark.parametrize("resume", [False, "auto"])
def test_overwrite_never_deletes_what_the_run_reads(tmp_path, key, rel, folder, resume):
    run = make_run(tmp_path / "run")
    if resume == "auto":
        ckpt._remove(run / "checkpoints")  # no checkpoint: resume=auto starts over, with the same refusals
    path = _inside(run, rel, folder=folder)
    section, field = key.split(".")
    sections = {section: {field: str(path)}, "output": {"overwrite": True}, "train": {"resume": resume}}
    if key == "student.name_or_path":
        sections["student"]["config"] = None
    before = snapshot(run)
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(config(run, tmp_path, **sections), run, is_main=True)
    message = str(err.value)
    assert "\n" not in message
    assert f"output.overwrite=true would delete {run / rel.split('/')[0]}, but {key}={path} lies inside it" in message
    assert f"copy it out of {run} first" in message
    assert snapshot(run) == before


def test_overwrite_sees_through_glob_patterns(tmp_path):
    run = make_run(tmp_path / "run")
    _inside(run, "student/part-1.jsonl")
    cfg = config(run, tmp_path, data={"source": str(run / "student" / "*.jsonl")}, output={"overwrite": True})
    with pytest.raises(RunDirError, match=r"data.source=.*part-1.jsonl lies inside it"):
        prepare_run_dir(cfg, run, is_main=True)


def test_overwrite_sees_through_symlinks_and_removes_only_the_link(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    run = make_run(tmp_path / "run")
    ckpt._remove(run / "student")
    (run / "student").symlink_to(model, target_is_directory=True)
    cfg = config(run, tmp_path, student={"name_or_path": str(model), "config": None}, output={"overwrite": True})
    with pytest.raises(RunDirError, match=r"would delete .*student, but student.name_or_path=.*my-model lies inside"):
        prepare_run_dir(cfg, run, is_main=True)
    # Not an input: the link goes, what it points to stays.
    prepare_run_dir(config(run, tmp_path, output={"overwrite": True}), run, is_main=True)
    assert not os.path.lexists(run / "student")
    assert (model / "model.safetensors").read_bytes() == b"weights"


def test_resume_auto_sets_a_damaged_newest_checkpoint_aside(tmp_path):
    run = make_run(tmp_path / "run")
    save_checkpoint(run, 4)
    (ckpt.final_checkpoint_dir(run, 4) / "optimizer.pt").write_bytes(b"")
    found = prepare_run_dir(config(run, tmp_path, train={"resume": "auto"}), run, is_main=True)
    assert found == ckpt.final_checkpoint_dir(run, 2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["damaged-step-000004", "step-000002"]


def test_resume_auto_in_another_process_reaches_the_same_answer_without_changes(tmp_path):
    run = make_run(tmp_path / "run")
    save_checkpoint(run, 4)
    (ckpt.final_checkpoint_dir(run, 4) / "optimizer.pt").write_bytes(b"")
    ckpt.temp_checkpoint_dir(run, 6).mkdir()
    before = snapshot(run)
    found = prepare_run_dir(config(run, tmp_path, train={"resume": "auto"}), run, is_main=False)
    assert found == ckpt.final_checkpoint_dir(run, 2)
    assert snapshot(run) == before


def test_resume_auto_cleans_the_leftovers_of_our_run(tmp_path):
    run = make_run(tmp_path / "run")
    ckpt.temp_checkpoint_dir(run, 4).mkdir()
    (run / ".tmp-student").mkdir()
    assert prepare_run_dir(config(run, tmp_path, train={"resume": "auto"}), run, is_main=True).name == "step-000002"
    assert not ckpt.temp_checkpoint_dir(run, 4).exists() and not (run / ".tmp-student").exists()


def test_resume_auto_when_every_checkpoint_is_damaged(tmp_path):
    run = make_run(tmp_path / "run")
    (ckpt.final_checkpoint_dir(run, 2) / "scheduler.pt").unlink()
    with pytest.raises(RunDirError, match=r"every checkpoint in .* is damaged \(step-000002: scheduler.pt is missing\)"):
        prepare_run_dir(config(run, tmp_path, train={"resume": "auto"}), run, is_main=True)


def test_resume_auto_with_overwrite_starts_over_when_every_checkpoint_is_damaged(tmp_path, caplog):
    run = make_run(tmp_path / "run")
    (ckpt.final_checkpoint_dir(run, 2) / "scheduler.pt").unlink()
    cfg = config(run, tmp_path, train={"resume": "auto"}, output={"overwrite": True})
    with caplog.at_level("WARNING", logger="potstill"):
        assert prepare_run_dir(cfg, run, is_main=True) is None
    assert "every checkpoint in" in caplog.text and "starting over" in caplog.text
    assert sorted(p.name for p in run.iterdir()) == [MARK_FILE]


def test_an_explicit_damaged_checkpoint_is_refused_without_fallback(tmp_path):
    run = make_run(tmp_path / "run")
    bad = save_checkpoint(run, 4)
    (bad / "scheduler.pt").unlink()
    before = snapshot(run)
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(config(run, tmp_path, train={"resume": str(bad)}), run, is_main=True)
    assert str(err.value) == (f"train.resume: {bad} is not an intact checkpoint (scheduler.pt is missing): give "
                              "another checkpoint, or train.resume=auto for the newest intact one in output.dir")
    assert snapshot(run) == before


def test_an_explicit_run_directory_is_not_a_checkpoint(tmp_path):
    old = make_run(tmp_path / "old")
    run = tmp_path / "run"
    with pytest.raises(RunDirError, match=f"train.resume: {old} is a run directory, not a checkpoint: give one of "
                                          f"its checkpoints/step-N folders, or set output.dir={old} and "
                                          "train.resume=auto"):
        prepare_run_dir(config(run, tmp_path, train={"resume": str(old)}), run, is_main=True)


def test_an_explicit_intact_checkpoint_is_returned(tmp_path):
    good = save_checkpoint(tmp_path / "old", 2)
    run = tmp_path / "run"
    assert prepare_run_dir(config(run, tmp_path, train={"resume": str(good)}), run, is_main=True) == good


def test_output_dir_that_is_a_file(tmp_path):
    target = tmp_path / "run"
    target.write_text("a file of mine")
    with pytest.raises(RunDirError, match=f"output.dir {target} is a file, not a folder: choose another output.dir"):
        prepare_run_dir(config(target, tmp_path), target, is_main=True)
    with pytest.raises(RunDirError, match=f"output.dir {target} is a file, not a folder"):
        ckpt.RunLock(target).acquire()
    assert target.read_text() == "a file of mine"


def test_output_dir_below_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(RunDirError) as err:
        ckpt.RunLock(tmp_path / "file" / "run").acquire()
    assert str(err.value).startswith(f"cannot write the run directory {tmp_path / 'file' / 'run'}: a part of the "
                                     "path is a file, not a folder")
    assert "choose another output.dir" in str(err.value)


@contextlib.contextmanager
def read_only(folder):
    """``folder`` made unwritable: chmod for a user; for root (who ignores modes) the immutable attribute."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield "permission denied"
        finally:
            folder.chmod(0o700)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root where chattr +i is unavailable: a folder cannot be made read-only")
    try:
        yield "operation not permitted"
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_dir_is_one_line_before_anything_loads(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with read_only(run) as reason:
        with pytest.raises(RunDirError) as err:
            ckpt.RunLock(run).acquire()
        assert str(err.value).startswith(f"cannot write the run directory {run}: {reason}")
        assert "choose another output.dir or make that folder writable" in str(err.value)
        with pytest.raises(RunDirError, match=f"{run}.*(cannot write in {run} \\(read-only or no permission\\)|{reason})"):
            prepare_run_dir(config(run, tmp_path), run, is_main=True)
    assert list(run.iterdir()) == []


def test_every_run_artifact_counts_as_a_clash(tmp_path):
    for name in RUN_ARTIFACTS:
        run = tmp_path / name.replace(".", "_")
        run.mkdir()
        (run / name).write_text("mine")
        with pytest.raises(RunDirError, match=f"holds {name} that potstill did not write"):
            prepare_run_dir(config(run, tmp_path, output={"overwrite": True}), run, is_main=True)
        assert (run / name).read_text() == "mine"
