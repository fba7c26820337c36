"""potstill cache-teacher + distill teacher.cache=...: capture, resume, training, checks."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import potstill.teachers.cache_format as fmt
from potstill.teachers.cache_format import CacheError, CacheReader
from potstill.teachers.capture import cache_teacher
from potstill.errors import ConfigError, RunDirError
from potstill.ownership import mark_owned, owner_kind
from potstill.commands.distill import distill

import tiny
from mounts import read_only_folder, small_disk


def _config(tmp_path, teacher_dir, student_dir, data, **sections) -> dict:
    cfg = {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"name_or_path": str(student_dir)},
        "data": {"source": str(data), "max_length": 48},
        "train": {"max_steps": 6, "batch_size": 8, "precision": "fp32", "log_every": 1, "lr": 1e-3},
        "eval": {"max_batches": 2},
        "cache": {"dir": str(tmp_path / "cache"), "examples_per_shard": 64},
        "output": {"dir": str(tmp_path / "run"), "report": False},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


_cli = tiny.run_cli


def _files(folder: Path) -> dict:
    """Every shard's bytes, and the manifest without its timings."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}
    manifest = json.loads(files.pop("manifest.json"))
    for key in ("capture_seconds", "capture_tokens_per_s"):
        manifest.pop(key)
    for entry in manifest["shards"]:
        entry.pop("seconds")
    return {**files, "manifest.json": manifest}


@pytest.fixture
def captured(tmp_path, teacher_dir, student_dir, text_jsonl):
    cfg = _config(tmp_path, teacher_dir, student_dir, text_jsonl)
    manifest = cache_teacher(cfg, progress=False)
    return cfg, manifest


def test_cache_rows_are_the_teachers_top_k(captured, tokenizer, teacher_dir):
    """Example i's cached rows are the teacher's top-k on example i of the tokenized train data."""
    from transformers import AutoModelForCausalLM

    from potstill.data import build_datasets
    from potstill.config import validate_config

    cfg, manifest = captured
    assert manifest["complete"] and manifest["k"] == 12 and manifest["encoding"]["id_bits"] == 9
    assert manifest["n_shards"] == len(manifest["shards"]) > 1
    train, _ = build_datasets(validate_config(cfg).data, tokenizer, seed=0, progress=False)
    assert manifest["dataset"]["fingerprint"] == train.fingerprint
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    reader = CacheReader(cfg["cache"]["dir"])
    step = -fmt.LOGP_MIN[8] / 255
    for i in (0, 63, 64, len(train) - 1):  # shard edges
        item = train[i]
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=item["input_ids"][None]).logits[0, :-1].float(), -1)
        logp = logp[item["labels"][1:] != -100]
        rows = reader.rows(i)
        assert rows["ids"].shape == (len(logp), 12)
        top = logp.topk(12, -1)
        np.testing.assert_array_equal(rows["ids"][:, 0], top.indices[:, 0].numpy())
        got = np.take_along_axis(logp.numpy(), rows["ids"], axis=1)
        big = got > fmt.LOGP_MIN[8] + step
        np.testing.assert_allclose(rows["logp"][big], got[big], atol=step / 2 + 1e-4)
        rest = np.log1p(-np.exp(top.values.double().numpy()).sum(-1))
        keep = rest > fmt.LOGP_MIN[8] + step  # below the floor the cache stores probability 0
        np.testing.assert_allclose(rows["rest"][keep], rest[keep], atol=step / 2 + 1e-3)
        assert np.all(rows["rest"][~keep] <= fmt.LOGP_MIN[8] + step)
    bytes_total = sum((Path(cfg["cache"]["dir"]) / e["file"]).stat().st_size for e in manifest["shards"])
    assert manifest["bytes_per_token"] == pytest.approx(bytes_total / manifest["n_rows"])
    assert manifest["n_rows"] == train.n_loss_tokens - len(train)  # every position but each block's first


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_capture_crashed_midway_resumes_to_identical_files(tmp_path, teacher_dir, student_dir, text_jsonl,
                                                           monkeypatch, kind):
    ref = _config(tmp_path / "ref", teacher_dir, student_dir, text_jsonl, cache={"kind": kind, "k": 8})
    cache_teacher(ref, progress=False)
    cfg = _config(tmp_path, teacher_dir, student_dir, text_jsonl, cache={"kind": kind, "k": 8})
    real = fmt.write_manifest

    def crash_after_third_shard_file(folder, manifest):
        if len(manifest["shards"]) == 3:  # shard 2 is on disk, the manifest does not list it yet
            raise KeyboardInterrupt("simulated kill")
        real(folder, manifest)

    monkeypatch.setattr(fmt, "write_manifest", crash_after_third_shard_file)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(cfg, progress=False)
    monkeypatch.setattr(fmt, "write_manifest", real)
    folder = Path(cfg["cache"]["dir"])
    partial = json.loads((folder / "manifest.json").read_text())
    assert len(partial["shards"]) == 2 and not partial["complete"] and (folder / "shard-00002.npz").exists()
    with pytest.raises(CacheError, match=r"incomplete \(2 of 4 shards\)"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "teacher.name_or_path=null"], progress=False)
    cache_teacher(cfg, progress=False)
    assert _files(folder) == _files(Path(ref["cache"]["dir"]))


def test_capture_killed_by_signal_continues_from_last_complete_shard(tmp_path, teacher_dir, student_dir,
                                                                     text_jsonl):
    cfg = _config(tmp_path, teacher_dir, student_dir, text_jsonl, cache={"examples_per_shard": 2})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    folder = Path(cfg["cache"]["dir"])
    proc = subprocess.Popen([sys.executable, "-m", "potstill", "cache-teacher", str(tmp_path / "run.yaml"),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    listed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            listed = len(json.loads((folder / "manifest.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            listed = 0
        if listed >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the capture finished before it could be killed"
    killed_at = len(json.loads((folder / "manifest.json").read_text())["shards"])
    assert 5 <= killed_at < 118
    done = _cli("cache-teacher", str(tmp_path / "run.yaml"), "--no-progress")
    assert f"continuing after {killed_at} of 118 complete shards" in done.stderr
    ref = _config(tmp_path / "ref", teacher_dir, student_dir, text_jsonl, cache={"examples_per_shard": 2})
    cache_teacher(ref, progress=False)
    assert _files(folder) == _files(Path(ref["cache"]["dir"]))


def test_cli_cache_teacher_then_distill_without_a_teacher(tmp_path, teacher_dir, student_dir, text_jsonl):
    cfg = _config(tmp_path, teacher_dir, student_dir, text_jsonl)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = _cli("cache-teacher", str(tmp_path / "run.yaml"), "cache.k=5", "--no-progress")
    assert "teacher cache topk k=5: 4 shards" in out.stdout and "bytes per token" in out.stdout
    # The teacher path does not even exist: a cached run must not load it.
    run = _cli("distill", str(tmp_path / "run.yaml"), f"teacher.cache={tmp_path / 'cache'}",
               "teacher.name_or_path=/does/not/exist", "loss.ce.weight=0.5", "--no-progress")
    assert "no teacher model loaded" in run.stderr and "student saved to" in run.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/kd" in r]
    assert len(steps) == 6 and all(r["loss/kd"] > 0 and r["loss/ce"] > 0 for r in steps)
    assert steps[-1]["loss/kd"] < steps[0]["loss/kd"]
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final_eval"]
    assert "ppl" in final and "kl" not in final  # no teacher: CE / perplexity only


@pytest.mark.parametrize("path", ["auto", "plain"])
def test_cached_kd_with_k_equal_v_matches_online_kd(tmp_path, teacher_dir, student_dir, text_jsonl, tokenizer,
                                                   path):
    """k = V at 16 bits: the cached run's loss and gradient norm follow the online run's."""
    v = len(tokenizer)
    base = _config(tmp_path, teacher_dir, student_dir, text_jsonl, cache={"k": v, "value_bits": 16},
                   train={"max_steps": 3}, loss={"path": path})
    cache_teacher(base, progress=False)
    online = distill(base, overrides=[f"output.dir={tmp_path / 'online'}"], progress=False)
    cached = distill(base, overrides=[f"output.dir={tmp_path / 'cached'}", f"teacher.cache={tmp_path / 'cache'}"],
                     progress=False)

    def steps(run):
        return [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()
                if '"grad_norm"' in line]

    for a, b in zip(steps(online), steps(cached), strict=True):
        assert b["loss/kd"] == pytest.approx(a["loss/kd"], rel=2e-3)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-2)
    assert cached.final_eval["ce"] == pytest.approx(online.final_eval["ce"], rel=1e-3)


def test_small_k_trains_differently_by_missing_mass_mode(captured, tmp_path):
    cfg, _ = captured
    runs = {}
    for mode in ("rest", "renormalize"):
        runs[mode] = distill(cfg, overrides=[f"teacher.cache={cfg['cache']['dir']}", f"output.dir={tmp_path / mode}",
                                             f"loss.logits.missing_mass={mode}"], progress=False)
    assert runs["rest"].final_eval["ce"] != runs["renormalize"].final_eval["ce"]


def test_tampered_and_truncated_shards_are_named(captured, tmp_path):
    cfg, manifest = captured
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    folder = Path(cfg["cache"]["dir"])
    target = folder / "shard-00000.npz"
    good = target.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    target.write_bytes(bytes(bad))
    proc = _cli("distill", str(tmp_path / "run.yaml"), f"teacher.cache={folder}", "train.max_steps=20",
                "--no-progress", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("potstill: error: teacher cache") and "shard shard-00000.npz fails its checksum" in last
    target.write_bytes(good[:-100])
    with pytest.raises(CacheError, match=r"shard shard-00000\.npz is truncated"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "train.max_steps=20", f"output.dir={tmp_path / 'run2'}"],
                progress=False)


def test_cache_from_another_tokenizer_or_dataset_is_refused(captured, tmp_path, tmp_path_factory, text_jsonl):
    cfg, _ = captured
    folder = cfg["cache"]["dir"]
    with pytest.raises(CacheError, match="another tokenized dataset"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "data.max_length=40"], progress=False)
    with pytest.raises(CacheError, match="another tokenized dataset"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "data.max_examples=300"], progress=False)
    # A cache captured with another tokenizer (and a teacher that speaks it).
    other = tmp_path_factory.mktemp("other")
    tok = tiny.build_tokenizer(other / "tok", vocab_size=320)
    tiny.build_llama(other / "teacher", len(tok), hidden_size=32, layers=1, heads=4, intermediate=64, seed=5)
    tok.save_pretrained(other / "teacher")
    other_cfg = _config(other, other / "teacher", other / "teacher", text_jsonl)
    cache_teacher(other_cfg, progress=False)
    with pytest.raises(CacheError, match="captured with another tokenizer"):
        distill(cfg, overrides=[f"teacher.cache={other / 'cache'}"], progress=False)


def test_cache_settings_checked_against_the_loss(captured, tmp_path, teacher_dir, student_dir, text_jsonl):
    cfg, _ = captured
    folder = cfg["cache"]["dir"]
    with pytest.raises(ConfigError, match="temperature 1.0"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "loss.logits.temperature=2"], progress=False)
    with pytest.raises(ConfigError, match="tvd needs the teacher's full distribution"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "loss.logits.divergence=tvd"], progress=False)
    with pytest.raises(ConfigError, match="rkl is not defined against a renormalized top-k"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "loss.logits.divergence=rkl",
                                "loss.logits.missing_mass=renormalize"], progress=False)
    # Capturing other settings into the same folder is refused, not mixed.
    with pytest.raises(CacheError, match="differs in: k"):
        cache_teacher(cfg, overrides=["cache.k=4"], progress=False)
    sampled = _config(tmp_path / "s", teacher_dir, student_dir, text_jsonl, cache={"kind": "sampled", "k": 6})
    cache_teacher(sampled, progress=False)
    with pytest.raises(ConfigError, match="not defined for sampled teacher tokens"):
        distill(cfg, overrides=[f"teacher.cache={sampled['cache']['dir']}", "loss.logits.divergence=jsd"],
                progress=False)
    run = distill(cfg, overrides=[f"teacher.cache={sampled['cache']['dir']}", f"output.dir={tmp_path / 'srun'}"],
                  progress=False)
    assert np.isfinite(run.final_eval["ce"])


def test_cache_loss_path_keeps_chunked_for_other_divergences(captured, tmp_path, caplog):
    """A top-k cache with a divergence other than fkl (here rkl): the chunked path now has every
    sparse divergence (autograd per row block), so loss.path=auto stays chunked and trains."""
    cfg, _ = captured
    folder = cfg["cache"]["dir"]
    caplog.set_level("INFO", logger="potstill")
    run = distill(cfg, overrides=[f"teacher.cache={folder}", "teacher.name_or_path=null",
                                  "loss.logits.divergence=rkl", f"output.dir={tmp_path / 'auto'}"], progress=False)
    assert np.isfinite(run.final_eval["ce"])
    assert "loss path: chunked" in caplog.text


# ----------------------------------------------------------------------------------------
# The cache folder is potstill's own: overwrite, other people's folders, inputs, full and read-only disks


def tree(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> bytes), to show that a refusal changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _capture(cfg, *overrides):
    return cache_teacher(cfg, overrides=list(overrides), progress=False)


def test_overwrite_replaces_only_the_files_a_capture_wrote(captured, tmp_path):
    cfg, first = captured
    folder = Path(cfg["cache"]["dir"])
    assert owner_kind(folder) == "cache"
    (folder / "notes.txt").write_text("my notes on this cache")
    (folder / "plots").mkdir()
    (folder / "plots" / "loss.png").write_bytes(b"\x89PNG mine")
    mine = {k: v for k, v in tree(folder).items() if k in ("notes.txt", "plots/loss.png")}
    with pytest.raises(CacheError, match="differs in: k"):
        _capture(cfg, "cache.k=4")
    second = _capture(cfg, "cache.k=4", "cache.overwrite=true")
    assert second["k"] == 4 and first["k"] == 12 and len(second["shards"]) == len(first["shards"])
    after = tree(folder)
    assert {k: after[k] for k in mine} == mine  # the user's files, byte for byte
    assert sorted(after) == sorted([*mine, ".potstill-owned", "manifest.json",
                                    *(e["file"] for e in second["shards"])])
    CacheReader(folder)  # complete and readable
    # Cut short while clearing: the manifest (deleted first) is gone, some shards are not. A capture starts over.
    (folder / "manifest.json").unlink()
    third = _capture(cfg)
    assert third["k"] == 12 and [e["sha256"] for e in third["shards"]] == [e["sha256"] for e in first["shards"]]
    assert {k: tree(folder)[k] for k in mine} == mine


def test_cache_written_before_the_mark_is_continued_and_overwritten(captured):
    cfg, first = captured
    folder = Path(cfg["cache"]["dir"])
    (folder / ".potstill-owned").unlink()
    assert owner_kind(folder) is None
    again = _capture(cfg)  # same settings: nothing to do, the cache is recognized by its manifest
    assert again["shards"] == first["shards"] and owner_kind(folder) == "cache"
    (folder / ".potstill-owned").unlink()
    assert _capture(cfg, "cache.k=3", "cache.overwrite=true")["k"] == 3


@pytest.mark.parametrize("case", ["user-folder", "other-manifest", "potstill-run", "file", "parent-is-file"])
def test_cache_dir_that_is_not_a_cache_is_refused_and_left_untouched(tmp_path, teacher_dir, student_dir,
                                                                    text_jsonl, case):
    target = tmp_path / "target"
    cache_dir = target
    if case == "file":
        target.write_text("a file of mine")
    elif case == "parent-is-file":
        target.write_text("a file of mine")
        cache_dir = target / "cache"
    else:
        target.mkdir()
        (target / "data.csv").write_text("a,b\n1,2\n")
        if case == "other-manifest":
            (target / "manifest.json").write_text('{"format": "my-dataset", "files": ["data.csv"]}')
        if case == "potstill-run":
            mark_owned(target, "run")
    before = tree(tmp_path)
    cfg = _config(tmp_path, teacher_dir, student_dir, text_jsonl, cache={"dir": str(cache_dir), "overwrite": True})
    says = {"user-folder": "is not empty and holds no teacher cache",
            "other-manifest": "is not empty and holds no teacher cache",
            "potstill-run": "is not empty and holds a potstill run", "file": "is a file, not a folder",
            "parent-is-file": f"{target} is a file, not a folder"}[case]
    with pytest.raises(CacheError, match=re.escape(says)):
        _capture(cfg)
    assert tree(tmp_path) == before


def test_cache_dir_overlapping_the_inputs_is_refused(tmp_path, teacher_dir, student_dir, text_jsonl):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    data = tmp_path / "data" / "text.jsonl"
    data.parent.mkdir()
    shutil.copy(text_jsonl, data)
    before = tree(tmp_path)
    cases = [(teacher / "cache", "lies inside teacher.name_or_path"), (teacher, "lies inside teacher.name_or_path"),
             (data.parent, "holds data.source"), (tmp_path, "holds teacher.name_or_path")]
    for cache_dir, says in cases:
        cfg = _config(tmp_path, teacher, student_dir, data, cache={"dir": str(cache_dir), "overwrite": True})
        with pytest.raises(CacheError, match=f"cache.dir {re.escape(str(cache_dir))} {says}"):
            _capture(cfg)
    cfg = _config(tmp_path, teacher, student_dir, str(tmp_path / "da*" / "*.jsonl"), cache={"dir": str(data.parent)})
    with pytest.raises(CacheError, match=f"holds data.source {re.escape(str(data))}"):  # a glob, expanded
        _capture(cfg)
    assert tree(tmp_path) == before


def test_damaged_cache_is_named_when_a_capture_continues_and_overwrite_recaptures_it(captured):
    cfg, first = captured
    folder = Path(cfg["cache"]["dir"])
    good = tree(folder)
    shard = folder / "shard-00001.npz"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    shard.write_bytes(bytes(damaged))
    with pytest.raises(CacheError, match=r"shard shard-00001\.npz fails its checksum.*cache\.overwrite=true"):
        _capture(cfg)
    shard.write_bytes(good["shard-00001.npz"])
    (folder / "manifest.json").write_text(good["manifest.json"].decode()[:200])
    with pytest.raises(CacheError, match=r"manifest\.json is not valid JSON"):
        _capture(cfg)
    manifest = json.loads(good["manifest.json"])
    del manifest["shards"][2]["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"manifest\.json is damaged \(shards\[2\]\.sha256 is missing\)"):
        _capture(cfg)
    again = _capture(cfg, "cache.overwrite=true")
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in first["shards"]]


def test_damaged_manifest_is_one_line_when_training(captured, tmp_path):
    cfg, _ = captured
    folder = Path(cfg["cache"]["dir"])
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["dataset"]["fingerprint"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = _cli("distill", str(tmp_path / "run.yaml"), f"teacher.cache={folder}", "--no-progress", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("potstill: error:")]
    assert errors == [f"potstill: error: teacher cache {folder}: manifest.json is damaged (dataset.fingerprint is "
                      "missing); capture the cache again (potstill cache-teacher with cache.overwrite=true)"]


def test_capture_stopped_by_a_full_disk_continues_once_space_is_freed(tmp_path, teacher_dir, student_dir,
                                                                     text_jsonl):
    ref = _config(tmp_path / "ref", teacher_dir, student_dir, text_jsonl)
    _capture(ref)
    disk = tmp_path / "disk"
    cfg = _config(tmp_path, teacher_dir, student_dir, text_jsonl, cache={"dir": str(disk / "cache")})
    with small_disk(disk, 160) as resize:
        with pytest.raises(RunDirError) as info:
            _capture(cfg)
        message = str(info.value)
        assert f"writing teacher cache {disk / 'cache'}: no space left on the device" in message
        done = int(re.search(r"continues after the (\d+) complete shards?$", message).group(1))
        assert 1 <= done < 4, message
        left = sorted(p.name for p in (disk / "cache").iterdir())
        assert left == [".potstill-owned", "manifest.json", *(fmt.shard_name(i) for i in range(done))] or \
            left == [".potstill-owned", "manifest.json", *(fmt.shard_name(i) for i in range(done + 1))]
        assert len(json.loads((disk / "cache" / "manifest.json").read_text())["shards"]) == done
        resize(4096)
        _capture(cfg)
        assert _files(disk / "cache") == _files(Path(ref["cache"]["dir"]))


def test_read_only_cache_dir_is_one_line_before_any_work(tmp_path, teacher_dir, student_dir, text_jsonl):
    disk = tmp_path / "ro"
    with read_only_folder(disk):
        cfg = _config(tmp_path, teacher_dir, student_dir, text_jsonl, cache={"dir": str(disk / "cache")})
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        proc = _cli("cache-teacher", str(tmp_path / "run.yaml"), "--no-progress", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("potstill: error:")]
    assert errors == [f"potstill: error: cache.dir {disk / 'cache'}: cannot write in {disk} (read-only or no "
                      "permission): choose another cache.dir or fix its permissions"]
    assert "loading" not in proc.stderr.lower()
