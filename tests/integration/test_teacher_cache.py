"""potstill cache-teacher + distill teacher.cache=...: capture, resume, training, checks."""

from __future__ import annotations

import json
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
from potstill.errors import ConfigError
from potstill.commands.distill import distill

import tiny


def _config(tmp_path, teacher_dir, student_dir, data, **sections) -> dict:
    cfg = {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"name_or_path": str(student_dir)},
        "data": {"source": str(data), "max_length": 48},
        "train": {"max_steps": 6, "batch_size": 8, "precision": "fp32", "log_every": 1, "lr": 1e-3},
        "eval": {"max_batches": 2},
        "cache": {"dir": str(tmp_path / "cache"), "examples_per_shard": 64},
        "output": {"dir": str(tmp_path / "run")},
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
    with pytest.raises(ConfigError, match="tvd has no sparse version"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "loss.logits.divergence=tvd"], progress=False)
    with pytest.raises(ConfigError, match="rkl is not defined for a renormalized top-k"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "loss.logits.divergence=rkl",
                                "loss.logits.missing_mass=renormalize"], progress=False)
    # Capturing other settings into the same folder is refused, not mixed.
    with pytest.raises(CacheError, match="differs in: k"):
        cache_teacher(cfg, overrides=["cache.k=4"], progress=False)
    sampled = _config(tmp_path / "s", teacher_dir, student_dir, text_jsonl, cache={"kind": "sampled", "k": 6})
    cache_teacher(sampled, progress=False)
    with pytest.raises(ConfigError, match="not defined for sampled tokens"):
        distill(cfg, overrides=[f"teacher.cache={sampled['cache']['dir']}", "loss.logits.divergence=jsd"],
                progress=False)
    run = distill(cfg, overrides=[f"teacher.cache={sampled['cache']['dir']}", f"output.dir={tmp_path / 'srun'}"],
                  progress=False)
    assert np.isfinite(run.final_eval["ce"])


def test_cache_loss_path_falls_back_or_refuses(captured, tmp_path, caplog):
    """A top-k cache with a divergence whose sparse loss has no chunked form: loss.path=auto trains on
    the plain path and says why; an explicit loss.path=chunked is refused in one line."""
    cfg, _ = captured
    folder = cfg["cache"]["dir"]
    caplog.set_level("INFO", logger="potstill")
    run = distill(cfg, overrides=[f"teacher.cache={folder}", "teacher.name_or_path=null",
                                  "loss.logits.divergence=rkl", f"output.dir={tmp_path / 'auto'}"], progress=False)
    assert np.isfinite(run.final_eval["ce"])
    assert "loss path: plain (full logits), because teacher cache with loss.logits.divergence=rkl" in caplog.text
    with pytest.raises(ConfigError, match="loss.path=chunked is not possible: teacher cache with "
                                          "loss.logits.divergence=rkl: the sparse loss has no chunked form"):
        distill(cfg, overrides=[f"teacher.cache={folder}", "teacher.name_or_path=null", "loss.logits.divergence=rkl",
                                "loss.path=chunked", f"output.dir={tmp_path / 'forced'}"], progress=False)
