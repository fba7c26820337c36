"""Cross-tokenizer distillation from the CLI: a byte-level BPE teacher and a SentencePiece-style
Unigram student (tokenizers trained here, models built here), online and from a cache captured
with character offsets; and every input it cannot work with refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tiny import (TINY_STUDENT, assert_one_line_error, build_llama, build_tokenizer, build_unigram_tokenizer,
                  run_cli, run_config, run_torchrun_distill, synthetic_sentences, write_jsonl)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok-runs")
    tok = build_tokenizer(root / "teacher", vocab_size=384)
    build_llama(root / "teacher", len(tok), hidden_size=32, layers=2)
    build_unigram_tokenizer(root / "student-tokenizer", vocab_size=600)
    data = write_jsonl(root / "data.jsonl", [{"text": t} for t in synthetic_sentences(120, seed=3)])
    return root, data


def cross_config(root, data, out, **changes):
    cfg = run_config(out, root / "teacher", data, loss={"ce": {"weight": 0.5}}, max_steps=3)
    cfg["student"] = {"config": {**TINY_STUDENT, "model_type": "llama"}, "tokenizer": str(root / "student-tokenizer")}
    cfg["data"]["cache_dir"] = str(root / "data-cache")
    for key, value in changes.items():
        section, name = key.split(".", 1)
        cfg[section][name] = value
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kd_terms(run_dir):
    return [r for r in records(run_dir) if "loss/kd" in r]


def test_online_and_cached_runs(pair, tmp_path):
    root, data = pair
    online = cross_config(root, data, tmp_path / "online", **{"data.packing": False})
    proc = run_cli("distill", online, "--no-progress")
    assert "cross-tokenizer distillation: teacher" in proc.stderr
    assert "cross-tokenizer alignment (first micro-batch)" in proc.stderr
    assert "vocabulary map:" in proc.stderr
    steps = kd_terms(tmp_path / "online")
    assert len(steps) == 3
    for r in steps:  # both parts of the hybrid are at work: the tokenizers share some tokens, not all
        assert r["loss/kd_exact"] > 0 and r["loss/kd_uld"] > 0 and r["loss/ce"] > 0
        assert abs(r["loss/kd"] - r["loss/kd_exact"] - r["loss/kd_uld"]) < 1e-4 * max(1.0, r["loss/kd"])
    assert not any(k.startswith("eval/teacher") for r in records(tmp_path / "online") for k in r)
    summary = json.loads((tmp_path / "online" / "summary.json").read_text())
    xt = summary["cross_tokenizer"]
    assert 0 < xt["exact"] < xt["aligned"] <= xt["targets"] and 0.5 < xt["aligned_share"] <= 1.0
    assert "spell the same bytes" in xt["vocabulary_map"] and summary["teacher_parameters"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = tmp_path / "online" / "student"
    assert len(AutoTokenizer.from_pretrained(student)) == 600
    assert AutoModelForCausalLM.from_pretrained(student).get_output_embeddings().weight.shape[0] >= 600

    # The cache: the teacher's own tokenization with offsets, for any student tokenizer.
    cache = tmp_path / "cache"
    run_cli("cache-teacher", online, f"cache.dir={cache}", "cache.offsets=true", "cache.k=64", "cache.value_bits=16",
            "--no-progress")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["offsets"]["text_fingerprint"] and manifest["k"] == 64
    proc = run_cli("distill", online, f"output.dir={tmp_path / 'cached'}", f"teacher.cache={cache}",
                   f"teacher.tokenizer={root / 'teacher'}", "--no-progress")
    line = [x for x in proc.stderr.splitlines() if "cross-tokenizer alignment" in x][0]
    online_line = [x for x in (run_cli("distill", online, f"output.dir={tmp_path / 'again'}", "--no-progress")
                               .stderr.splitlines()) if "cross-tokenizer alignment" in x][0]
    assert line.split("potstill: ")[-1] == online_line.split("potstill: ")[-1]  # the same rows align
    # Same student init, same rows, the same teacher numbers up to the cache's 16-bit log-probs.
    first_online, first_cached = kd_terms(tmp_path / "online")[0], kd_terms(tmp_path / "cached")[0]
    for key in ("loss/kd_exact", "loss/kd_uld", "loss/ce"):
        assert first_cached[key] == pytest.approx(first_online[key], rel=2e-3), key


def test_cache_without_offsets_for_another_tokenizer(pair, tmp_path):
    root, data = pair
    cfg = cross_config(root, data, tmp_path / "run")
    cache = tmp_path / "plain-cache"
    run_cli("cache-teacher", cfg, f"cache.dir={cache}", "--no-progress")
    proc = run_cli("distill", cfg, f"teacher.cache={cache}", "--no-progress", check=False)
    assert_one_line_error(proc, "another tokenizer", "cache.offsets=true")
    assert not (tmp_path / "run" / "student").exists()


def test_offsets_cache_needs_the_teacher_tokenizer_and_the_same_texts(pair, tmp_path):
    root, data = pair
    cfg = cross_config(root, data, tmp_path / "run")
    cache = tmp_path / "xcache"
    run_cli("cache-teacher", cfg, f"cache.dir={cache}", "cache.offsets=true", "--no-progress")
    proc = run_cli("distill", cfg, f"teacher.cache={cache}", "teacher.name_or_path=null", "--no-progress", check=False)
    assert_one_line_error(proc, "teacher.tokenizer")
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": t} for t in synthetic_sentences(120, seed=4)])
    proc = run_cli("distill", cfg, f"teacher.cache={cache}", f"data.source={other}", "--no-progress", check=False)
    assert_one_line_error(proc, "other texts")
    proc = run_cli("cache-teacher", cfg, f"cache.dir={tmp_path / 'c2'}", "cache.offsets=true", "cache.kind=sampled",
                   "--no-progress", check=False)
    assert_one_line_error(proc, "cache.offsets", "cache.kind=topk")


@pytest.mark.parametrize("override, fragments", [
    ("loss.hidden.weight=1.0", ("loss.hidden", "token by token")),
    ("onpolicy.lmbda=0.5", ("onpolicy", "not supported")),
    ("train.strategy=fsdp", ("train.strategy=fsdp", "another tokenizer")),
    ("loss.cross_tokenizer.mode=wasserstein", ("cross_tokenizer.mode",)),
    ("loss.cross_tokenizer.uld_weight=-1", ("uld_weight",)),
])
def test_what_a_cross_tokenizer_run_cannot_do(pair, tmp_path, override, fragments):
    root, data = pair
    cfg = cross_config(root, data, tmp_path / "run")
    proc = run_cli("distill", cfg, override, "--no-progress", check=False)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run" / "student").exists()


def test_a_tokenizer_without_offsets_is_one_line(pair, tmp_path):
    """A slow (Python) tokenizer has no character offsets: the data step says so in one line."""
    from transformers import BertTokenizerLegacy

    from potstill import DistillConfig, distill
    from potstill.errors import PotstillError

    root, data = pair
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w.lower().strip(".") for t in synthetic_sentences(50) for w in t.split()})) + "\n", encoding="utf-8")
    slow = BertTokenizerLegacy(str(vocab))
    slow.eos_token = "[SEP]"
    assert not slow.is_fast
    cfg = json.loads(json.dumps(run_config(tmp_path / "run", root / "teacher", data, loss={"ce": {"weight": 0.5}},
                                           max_steps=1)))
    cfg["student"] = {"config": dict(TINY_STUDENT), "tokenizer": slow}
    with pytest.raises(PotstillError) as err:
        distill(DistillConfig.model_validate(cfg))
    message = str(err.value)
    assert "character offsets" in message and "fast tokenizer" in message and "\n" not in message


def test_chat_run_each_model_with_its_own_template(pair, tmp_path):
    """Chat rows: the teacher renders ChatML, the student its Gemma-like template; only the
    assistant's words are aligned (the user's are context), and both parts of the loss work."""
    from tiny import chat_rows

    root, _ = pair
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(60, seed=5))
    cfg = cross_config(root, data, tmp_path / "chat")
    proc = run_cli("distill", cfg, "--no-progress")
    share = float(proc.stderr.split("alignment (first micro-batch): ")[1].split("%")[0])
    assert 30.0 < share <= 100.0
    steps = kd_terms(tmp_path / "chat")
    assert len(steps) == 3 and all(r["loss/kd_exact"] > 0 for r in steps)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_equal_one(pair, tmp_path):
    """Two real processes (gloo) give the steps of one process with grad_accum=2: the aligned
    rows of each micro-batch normalize like every term, by the step's loss tokens everywhere."""
    root, data = pair
    cfg = cross_config(root, data, tmp_path / "two", **{"data.packing": False})
    two = run_torchrun_distill(cfg)
    assert two.returncode == 0, two.stderr[-3000:]
    run_cli("distill", cfg, "train.grad_accum=2", f"output.dir={tmp_path / 'one'}", "--no-progress")
    a, b = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    compared = 0
    for ra, rb in zip(a, b):
        for key in ("loss", "loss/kd_exact", "loss/kd_uld", "loss/ce", "eval/ppl"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5), (ra["step"], key)
                compared += 1
    assert compared >= 12
