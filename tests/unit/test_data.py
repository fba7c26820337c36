"""The data pipeline end to end with the real tiny BPE tokenizer and real files."""

from __future__ import annotations

import csv
import json
import logging
import pickle

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

import tiny
from potstill.config import DataConfig
from potstill.data import build_datasets, collate, count_loss_tokens, formats, load_rows
from potstill.errors import DataError

EOS = "<|endoftext|>"
END = "<|im_end|>"


def cfg_for(source, tmp_path, **kw) -> DataConfig:
    kw.setdefault("validation_fraction", 0.0)
    kw.setdefault("max_length", 512)
    return DataConfig(source=source, cache_dir=str(tmp_path / "cache"), **kw)


def build(source, tokenizer, tmp_path, **kw):
    return build_datasets(cfg_for(source, tmp_path, **kw), tokenizer, progress=False)


def items(ds) -> list[tuple[list[int], list[int]]]:
    return [(ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()) for i in range(len(ds))]


def loss_runs(tokenizer, item) -> list[str]:
    """Decoded runs of consecutive tokens that carry loss."""
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer_dir):
    """The same tokenizer without a chat template."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def chat_rows():
    return tiny.chat_rows(12, seed=5)


# ----------------------------------------------------------------------------------------
# Formats


def test_text_examples_are_tokenized_texts_plus_eos(tokenizer, text_jsonl, tmp_path):
    train, val = build(text_jsonl, tokenizer, tmp_path, packing=False)
    texts = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()]
    assert val is None and len(train) == len(texts)
    for text, (ids, labels) in zip(texts, items(train)):
        assert ids == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        assert labels == ids  # loss on every token, EOS included
    assert train.n_tokens == train.n_loss_tokens == sum(len(ids) for ids, _ in items(train))


def test_packing_cuts_the_concatenation_into_full_blocks(tokenizer, text_jsonl, tmp_path):
    train, _ = build(text_jsonl, tokenizer, tmp_path, max_length=32)
    texts = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()]
    stream = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    assert len(train) == len(stream) // 32 and train.max_length == 32
    assert all(train[i]["input_ids"].shape == (32,) for i in range(len(train)))
    joined = torch.cat([train[i]["input_ids"] for i in range(len(train))]).tolist()
    assert joined == stream[: len(joined)]
    assert train.n_tokens == len(joined) == train.n_loss_tokens
    assert train[-1]["input_ids"].dtype == torch.long


def test_packing_keeps_one_short_block_when_there_is_less_than_one(tokenizer, tmp_path):
    train, _ = build(["Hello model.", "A small student."], tokenizer, tmp_path, max_length=512)
    assert len(train) == 1
    expected = (tokenizer("Hello model.")["input_ids"] + [0] + tokenizer("A small student.")["input_ids"] + [0])
    assert train[0]["input_ids"].tolist() == expected


def test_no_packing_truncates_to_max_length(tokenizer, tmp_path):
    long_text = " ".join(tiny.synthetic_sentences(30, seed=9))
    train, _ = build([long_text, "Short one."], tokenizer, tmp_path, packing=False, max_length=16)
    assert [len(train[i]["input_ids"]) for i in range(2)] == [16, len(tokenizer("Short one.")["input_ids"]) + 1]
    assert train[0]["input_ids"].tolist() == tokenizer(long_text)["input_ids"][:16]
    assert train.stats["truncated"] == 1
    batch = collate([train[0], train[1]], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["attention_mask"][1].sum() == len(train[1]["input_ids"])
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()


def test_messages_assistant_only_loss_covers_exactly_assistant_content(tokenizer, chat_jsonl, tmp_path):
    train, _ = build(chat_jsonl, tokenizer, tmp_path, packing=False)
    rows = [json.loads(line) for line in chat_jsonl.read_text().splitlines()]
    assert len(train) == len(rows)
    for row, i in zip(rows, range(len(train))):
        item = train[i]
        msgs = row["messages"]
        expected_text = tokenizer.apply_chat_template(msgs, tokenize=False)
        assert tokenizer.decode(item["input_ids"]) == expected_text + EOS
        assert loss_runs(tokenizer, item) == [m["content"] + END for m in msgs if m["role"] == "assistant"]
        assert item["labels"][-1] == -100  # the separator EOS is not a target
    assert 0 < train.n_loss_tokens < train.n_tokens


def test_messages_all_tokens_without_assistant_only_loss(tokenizer, chat_rows, tmp_path):
    train, _ = build(chat_rows, tokenizer, tmp_path, packing=False, assistant_only_loss=False)
    for ids, labels in items(train):
        assert labels == ids
    assert train.n_loss_tokens == train.n_tokens


def test_sharegpt_equals_the_equivalent_messages(tokenizer, chat_rows, tmp_path):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    share = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]}
             for r in chat_rows]
    a, _ = build(chat_rows, tokenizer, tmp_path, packing=False)
    b, _ = build(share, tokenizer, tmp_path, packing=False)
    assert b.manifest["format"] == "sharegpt" and a.manifest["format"] == "messages"
    assert items(a) == items(b) and len(a) == len(chat_rows)


def test_prompt_completion_with_chat_template(tokenizer, tmp_path):
    rows = [{"prompt": "Softmax logits?", "completion": "Temperature divergence."},
            {"prompt": "Read file.", "completion": "Write file close."}]
    train, _ = build(rows, tokenizer, tmp_path, packing=False)
    for row, i in zip(rows, range(2)):
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        assert tokenizer.decode(train[i]["input_ids"]) == tokenizer.apply_chat_template(msgs, tokenize=False) + EOS
        assert loss_runs(tokenizer, train[i]) == [row["completion"] + END]


def test_prompt_completion_plain_without_template(plain_tokenizer, tmp_path):
    tok = plain_tokenizer
    rows = [{"prompt": "Softmax logits", "completion": " temperature divergence."}]
    train, _ = build(rows, tok, tmp_path, packing=False)
    p, c = tok("Softmax logits")["input_ids"], tok(" temperature divergence.")["input_ids"]
    ids, labels = items(train)[0]
    assert ids == p + c + [tok.eos_token_id]
    assert labels == [-100] * len(p) + c + [tok.eos_token_id]
    everything, _ = build(rows, tok, tmp_path, packing=False, assistant_only_loss=False)
    assert items(everything)[0][1] == ids


def test_cfg_chat_template_replaces_the_tokenizers(plain_tokenizer, chat_rows, tmp_path):
    template = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant: {% endif %}")
    train, _ = build(chat_rows[:3], plain_tokenizer, tmp_path, packing=False, chat_template=template)
    first = chat_rows[0]["messages"]
    assert plain_tokenizer.decode(train[0]["input_ids"]).startswith(f"### system: {first[0]['content']}<|im_end|>")
    assert loss_runs(plain_tokenizer, train[0]) == [m["content"] + END for m in first if m["role"] == "assistant"]
    assert plain_tokenizer.chat_template is None  # the tokenizer was not modified


def test_conversations_without_assistant_are_skipped_and_counted(tokenizer, chat_rows, tmp_path):
    rows = chat_rows[:4] + [[{"role": "user", "content": "Hello model."}]] * 2
    convs = [r["messages"] if isinstance(r, dict) else r for r in rows]
    train, _ = build(convs, tokenizer, tmp_path, packing=False)
    assert len(train) == 4 and train.stats["no_assistant"] == 2 and train.stats["rows"] == 6


# ----------------------------------------------------------------------------------------
# Sources


def test_in_memory_list_of_strings_and_of_conversations(tokenizer, chat_rows, tmp_path):
    texts = ["Hello model.", "A small student."]
    assert load_rows(texts, cfg=cfg_for(texts, tmp_path))["text"] == texts
    train, _ = build(texts, tokenizer, tmp_path, packing=False)
    assert [ids for ids, _ in items(train)] == [tokenizer(t)["input_ids"] + [0] for t in texts]
    convs = [r["messages"] for r in chat_rows]
    rows = load_rows(convs, cfg=cfg_for(convs, tmp_path))
    assert rows.column_names == ["messages"] and len(rows) == len(convs)
    a, _ = build(convs, tokenizer, tmp_path, packing=False)
    b, _ = build(datasets.Dataset.from_list(chat_rows), tokenizer, tmp_path, packing=False)
    assert items(a) == items(b)


def test_glob_of_two_files_and_folder(tokenizer, tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    tiny.write_jsonl(d / "b.jsonl", [{"text": "Second file."}])
    tiny.write_jsonl(d / "a.jsonl", [{"text": "First file."}, {"text": "Still first."}])
    (d / "notes.md").write_text("ignored")
    expected = ["First file.", "Still first.", "Second file."]
    assert load_rows(str(d / "*.jsonl"), cfg=DataConfig())["text"] == expected
    assert load_rows(d, cfg=DataConfig())["text"] == expected
    assert load_rows([d / "b.jsonl", d / "a.jsonl"], cfg=DataConfig())["text"] == expected[2:] + expected[:2]
    assert load_rows(str(d / "*.jsonl"), cfg=DataConfig(max_examples=2))["text"] == expected[:2]
    assert load_rows(str(d / "*.jsonl"), cfg=DataConfig(max_examples=3))["text"] == expected
    train, _ = build(str(d / "*.jsonl"), tokenizer, tmp_path, packing=False)
    assert len(train) == 3


def test_csv_parquet_txt_json(tokenizer, tmp_path):
    texts = ["Hello model, with a comma.", "A small student."]
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        w.writerows([[i, t] for i, t in enumerate(texts)])
    pq.write_table(pa.table({"text": texts, "id": [0, 1]}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text(f"{texts[0]}\n\n   \n{texts[1]}\n")
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"text": t} for t in texts], "version": 1}))
    for name in ("d.csv", "d.parquet", "d.txt", "d.json"):
        assert load_rows(tmp_path / name, cfg=DataConfig())["text"] == texts, name
        train, _ = build(tmp_path / name, tokenizer, tmp_path, packing=False)
        assert [ids for ids, _ in items(train)] == [tokenizer(t)["input_ids"] + [0] for t in texts], name


def test_max_examples_takes_the_first_rows(text_jsonl):
    rows = load_rows(text_jsonl, cfg=DataConfig(max_examples=7))
    first = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()[:7]]
    assert rows["text"] == first


def test_dataset_dict_and_validation_split(tokenizer, tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["Train one.", "Train two."]}),
                               "test": datasets.Dataset.from_dict({"text": ["Held out."]})})
    train, val = build(dd, tokenizer, tmp_path, packing=False, validation_split="test")
    assert len(train) == 2 and tokenizer.decode(val[0]["input_ids"]) == "Held out." + EOS


def test_validation_source(tokenizer, text_jsonl, tmp_path):
    train, val = build(text_jsonl, tokenizer, tmp_path, packing=False, validation_source=["Held out text."])
    assert len(train) == 400 and len(val) == 1
    assert val[0]["input_ids"].tolist() == tokenizer("Held out text.")["input_ids"] + [0]


def test_validation_fraction_is_deterministic_and_disjoint(tokenizer, tmp_path):
    texts = [f"{s} {i}" for i, s in enumerate(tiny.synthetic_sentences(60, seed=11))]

    def split(seed):
        cfg = cfg_for(texts, tmp_path, packing=False, validation_fraction=0.2)
        train, val = build_datasets(cfg, tokenizer, seed=seed, progress=False)
        dec = lambda ds: [tokenizer.decode(ds[i]["input_ids"][:-1]) for i in range(len(ds))]  # noqa: E731
        return dec(train), dec(val)

    train, val = split(0)
    assert len(val) == 12 and len(train) == 48
    assert not set(train) & set(val) and sorted(train + val) == sorted(texts)
    assert split(0) == (train, val)
    assert split(1)[1] != val


# ----------------------------------------------------------------------------------------
# Cache


def test_cache_hit_rebuild_on_change_and_no_duplicates(tokenizer, tokenizer_dir, tmp_path, monkeypatch, caplog):
    path = tiny.write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in tiny.synthetic_sentences(50, seed=2)])
    cfg = cfg_for(path, tmp_path, max_length=32)
    first, _ = build_datasets(cfg, tokenizer, progress=False)
    assert first.cache_path is not None and first.cache_path.parent == tmp_path / "cache"
    assert isinstance(first.tokens, np.memmap)

    def boom(*a, **k):
        raise AssertionError("re-tokenized on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(formats, "tokenize_rows", boom)
        with caplog.at_level(logging.INFO, logger="potstill"):
            again, _ = build_datasets(cfg, AutoTokenizer.from_pretrained(tokenizer_dir), progress=False)
    assert "cache hit" in caplog.text
    assert again.fingerprint == first.fingerprint and items(again) == items(first)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.fingerprint]

    data = bytearray(path.read_bytes())
    data[10] = ord("Z") if data[10] != ord("Z") else ord("Y")
    path.write_bytes(bytes(data))
    changed, _ = build_datasets(cfg, tokenizer, progress=False)
    assert changed.fingerprint != first.fingerprint and items(changed) != items(first)
    assert len(list((tmp_path / "cache").iterdir())) == 2

    other, _ = build_datasets(cfg_for(path, tmp_path, max_length=16), tokenizer, progress=False)
    assert other.fingerprint != changed.fingerprint and other[0]["input_ids"].shape == (16,)


def test_cache_key_includes_the_chat_template(tokenizer, tokenizer_dir, chat_rows, tmp_path):
    a, _ = build(chat_rows, tokenizer, tmp_path, packing=False)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = tiny.CHATML_TEMPLATE.replace("\n{{ m['content'] }}", "\n\n{{ m['content'] }}")
    b, _ = build(chat_rows, tok, tmp_path, packing=False)
    assert a.fingerprint != b.fingerprint and a.n_tokens != b.n_tokens


def test_dataset_pickles_by_cache_path(tokenizer, text_jsonl, tmp_path):
    train, _ = build(text_jsonl, tokenizer, tmp_path)
    clone = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 10_000 and torch.equal(clone[3]["input_ids"], train[3]["input_ids"])


# ----------------------------------------------------------------------------------------
# Collate


def test_collate_pads_to_the_longest():
    examples = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
                {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert count_loss_tokens(batch["labels"]) == 2
    assert collate(examples, pad_token_id=None)["input_ids"][1].tolist() == [8, 0, 0]


# ----------------------------------------------------------------------------------------
# Errors: one clear line each


def _error(fn) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_error_missing_file(tokenizer, tmp_path):
    msg = _error(lambda: build(str(tmp_path / "nope.jsonl"), tokenizer, tmp_path))
    assert "not found" in msg and "nope.jsonl" in msg


def test_error_malformed_jsonl_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "fine"}\n')
    msg = _error(lambda: build(path, tokenizer, tmp_path))
    assert f"{path}:3:" in msg and "malformed JSON" in msg


def test_error_missing_field_names_field_row_and_source(tokenizer, tmp_path):
    path = tiny.write_jsonl(tmp_path / "rows.jsonl", [{"text": "One."}, {"text": "Two."}, {"body": "Three."}])
    msg = _error(lambda: build(path, tokenizer, tmp_path))
    assert f"{path}:3 (row 2)" in msg and "'text'" in msg and "text_field" in msg
    other = tiny.write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "answer": "a"}])
    msg = _error(lambda: build(other, tokenizer, tmp_path, format="prompt_completion"))
    assert "'completion'" in msg and "row 0" in msg and "completion_field" in msg


def test_error_no_chat_template(plain_tokenizer, chat_rows, tmp_path):
    msg = _error(lambda: build(chat_rows, plain_tokenizer, tmp_path))
    assert "no chat template" in msg and "data.chat_template" in msg


def test_error_empty_after_filtering(tokenizer, tmp_path):
    convs = [[{"role": "user", "content": f"Question {i}."}] for i in range(12)]
    msg = _error(lambda: build(convs, tokenizer, tmp_path))
    assert "all 12 conversations lacked an assistant turn" in msg and "assistant_only_loss" in msg


def test_error_unknown_columns(tokenizer, tmp_path):
    msg = _error(lambda: build([{"question": "q", "answer": "a"}], tokenizer, tmp_path))
    assert "question, answer" in msg and "data.text_field" in msg and "data.messages_field" in msg


def test_error_template_not_prefix_consistent(tokenizer, chat_rows, tmp_path):
    template = tiny.CHATML_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] }}{% if loop.last %}.{% endif %}")
    msg = _error(lambda: build(chat_rows, tokenizer, tmp_path, chat_template=template))
    assert "prefix-consistent" in msg and "assistant_only_loss=false" in msg
    train, _ = build(chat_rows, tokenizer, tmp_path, chat_template=template, assistant_only_loss=False)
    assert train.n_loss_tokens == train.n_tokens


def test_error_hub_name_not_found_offline(tokenizer, tmp_path):
    msg = _error(lambda: build("nobody/no-such-dataset", tokenizer, tmp_path))
    assert "nobody/no-such-dataset" in msg and "nor on the Hugging Face Hub" in msg and ".jsonl" in msg


def test_error_validation_split_on_a_file_and_too_few_rows(tokenizer, text_jsonl, tmp_path):
    msg = _error(lambda: build(text_jsonl, tokenizer, tmp_path, validation_split="validation"))
    assert "validation_source" in msg
    msg = _error(lambda: build(["Only one."], tokenizer, tmp_path, validation_fraction=0.1))
    assert "validation_fraction=0" in msg


def test_error_all_loss_truncated_away(tokenizer, tmp_path):
    convs = [[{"role": "user", "content": " ".join(tiny.synthetic_sentences(6, seed=1))},
              {"role": "assistant", "content": "Yes."}]]
    msg = _error(lambda: build(convs, tokenizer, tmp_path, packing=False, max_length=16))
    assert "max_length=16" in msg and "truncation" in msg


QWEN_STYLE = (  # a default system prompt when none is given, as in Qwen2.5's template; no generation markers
    "{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful model.<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_assistant_spans_with_a_default_system_prompt_and_assistant_first(tokenizer, tmp_path):
    convs = [[{"role": "user", "content": "Read file."}, {"role": "assistant", "content": "Write file close."}],
             [{"role": "assistant", "content": "Hello model."}, {"role": "user", "content": "Train."},
              {"role": "assistant", "content": "Batch step epoch."}]]
    train, _ = build(convs, tokenizer, tmp_path, packing=False, chat_template=QWEN_STYLE)
    assert tokenizer.decode(train[0]["input_ids"]).startswith("<|im_start|>system\nYou are a helpful model.")
    assert loss_runs(tokenizer, train[0]) == ["Write file close." + END]
    assert loss_runs(tokenizer, train[1]) == ["Hello model." + END, "Batch step epoch." + END]


def test_row_location_across_files_of_a_glob(tokenizer, tmp_path):
    tiny.write_jsonl(tmp_path / "a.jsonl", [{"text": "One."}, {"text": "Two."}])
    (tmp_path / "b.jsonl").write_text('{"text": "Three."}\n\n{"body": "Four."}\n')
    msg = _error(lambda: build(str(tmp_path / "*.jsonl"), tokenizer, tmp_path))
    assert f"{tmp_path / 'b.jsonl'}:3 (row 3)" in msg and "'text'" in msg
    tiny.write_jsonl(tmp_path / "b.jsonl", [{"text": "Three."}, {"text": 4}])
    msg = _error(lambda: build(str(tmp_path / "*.jsonl"), tokenizer, tmp_path))
    assert str(tmp_path / "b.jsonl") in msg and "inconsistent field types" in msg


def test_cache_root_from_environment(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "env-cache"))
    train, _ = build_datasets(DataConfig(source=["Hello model."], validation_fraction=0), tokenizer, progress=False)
    assert train.cache_path.parent == tmp_path / "env-cache"


# ----------------------------------------------------------------------------------------
# Damaged inputs: torn files, damaged tokenized-data caches


def test_error_torn_last_line_says_the_file_was_cut(tokenizer, tmp_path):
    path = tmp_path / "torn.jsonl"
    path.write_bytes(b'{"text": "One."}\n{"text": "Two."}\n{"text": "Thr')
    msg = _error(lambda: build(path, tokenizer, tmp_path))
    assert f"{path}:3:" in msg and "ends in the middle of this row" in msg


def test_error_non_utf8_jsonl_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "One."}\n{"text": "caf\xe9"}\n')
    msg = _error(lambda: build(path, tokenizer, tmp_path))
    assert f"{path}:2:" in msg and "not UTF-8" in msg


def _damage_cache_and_rebuild(tokenizer, tmp_path, caplog, damage):
    """Build, damage the cache folder with ``damage(folder)``, build again: the rebuilt data equal the first."""
    path = tiny.write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in tiny.synthetic_sentences(40, seed=4)])
    first, _ = build(path, tokenizer, tmp_path, max_length=32)
    expected = items(first)
    folder = first.cache_path
    del first
    damage(folder)
    with caplog.at_level(logging.WARNING, logger="potstill"):
        again, _ = build(path, tokenizer, tmp_path, max_length=32)
    assert items(again) == expected and again.cache_path == folder
    assert f"ignoring the damaged data cache {folder}" in caplog.text
    third, _ = build(path, tokenizer, tmp_path, max_length=32)  # the rebuilt folder is whole again
    assert items(third) == expected


def _truncate(name):
    def damage(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return damage


def _out_of_vocab_ids(folder):
    tokens = np.load(folder / "tokens.npy")
    tokens[3] = 10**6
    np.save(folder / "tokens.npy", tokens)


def _garbage_manifest(folder):
    (folder / "manifest.json").write_bytes(b"\x00\x00\x00garbage")


def _offsets_past_the_end(folder):
    offsets = np.load(folder / "offsets.npy")
    offsets[1] = offsets[-1] + 5
    np.save(folder / "offsets.npy", offsets)


@pytest.mark.parametrize("damage", [_truncate("tokens.npy"), _truncate("offsets.npy"), _out_of_vocab_ids,
                                    _garbage_manifest, _offsets_past_the_end],
                         ids=["truncated-tokens", "truncated-offsets", "ids-outside-vocab", "garbage-manifest",
                              "offsets-past-end"])
def test_damaged_cache_is_rebuilt(tokenizer, tmp_path, caplog, damage):
    _damage_cache_and_rebuild(tokenizer, tmp_path, caplog, damage)


def test_damaged_cache_holding_user_files_is_left_alone(tokenizer, tmp_path):
    path = tiny.write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in tiny.synthetic_sentences(40, seed=4)])
    first, _ = build(path, tokenizer, tmp_path, max_length=32)
    folder = first.cache_path
    del first
    _truncate("loss.npy")(folder)
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    msg = _error(lambda: build(path, tokenizer, tmp_path, max_length=32))
    assert str(folder) in msg and "notes.txt" in msg and "data.cache_dir" in msg
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
