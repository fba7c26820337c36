"""The cross-tokenizer benchmarks' pair: the quickstart's demo teacher (byte-level BPE, 8192
tokens) and a student of the quickstart's size with a tokenizer of another kind, a
SentencePiece-style Unigram of 8192 tokens trained here on the python-docs train split.

    prepare(out) -> {"tokenizer": out/student-tokenizer, "init": out/student-init}

Both are built once (seeded) and reused: every run of a benchmark starts from the same
random init. The Unigram recipe is the tests' (``tests/tiny.py``: ``build_unigram_tokenizer``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8192
TOKENIZER_TEXTS = 6000  # python-docs train texts the student tokenizer is trained on


def prepare(out: Path) -> dict[str, Path]:
    """The student's tokenizer and random init under ``out`` (built when missing)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from potstill.commands.quickstart import SEED, STUDENT
    from potstill.data.corpus import snapshot_texts

    out.mkdir(parents=True, exist_ok=True)
    tok_dir, init_dir = out / "student-tokenizer", out / "student-init"
    if not (tok_dir / "tokenizer.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import build_unigram_tokenizer

        # Line by line: the Unigram trainer's likelihood overflows on very long sentences.
        lines = [line[:400] for text in snapshot_texts("train", TOKENIZER_TEXTS) for line in text.splitlines() if line.strip()]
        build_unigram_tokenizer(tok_dir, vocab_size=VOCAB, texts=lines)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if not (init_dir / "config.json").is_file():
        torch.manual_seed(SEED)
        cfg = AutoConfig.for_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **STUDENT)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(init_dir, safe_serialization=True)
        tok.save_pretrained(init_dir)
    return {"tokenizer": tok_dir, "init": init_dir}


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/xtok-bench")))
