"""Shared fixtures: a tokenizer and tiny teacher/student saved to disk once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own tokenized-data cache, never the user's."""
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path_factory.getbasetemp() / "potstill-cache"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tiny.build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """A tiny Llama teacher (4 layers, width 48) with its tokenizer beside it."""
    path = tmp_path_factory.mktemp("teacher")
    tiny.build_llama(path, len(tokenizer), hidden_size=48, layers=4, heads=4, intermediate=96, seed=1)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama student (2 layers, width 32) with the same tokenizer."""
    path = tmp_path_factory.mktemp("student")
    tiny.build_llama(path, len(tokenizer), hidden_size=32, layers=2, heads=4, intermediate=64, seed=2)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    return tiny.write_jsonl(path, [{"text": s} for s in tiny.synthetic_sentences(400, seed=3)])


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    return tiny.write_jsonl(path, tiny.chat_rows(120, seed=4))
