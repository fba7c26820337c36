"""Tiny real components for tests: a trained byte-level BPE tokenizer and small Llama models.

Nothing here downloads. Models are built from config and saved with ``save_pretrained``
so that the real loading code (``AutoModelForCausalLM.from_pretrained`` on a folder) runs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a teacher student model learns from large small data token layer weight loss gradient "
    "python function returns value list string number file read write open close import module "
    "class method object attribute error raise except try return yield print format join split "
    "distill knowledge softmax logits temperature divergence sequence batch step epoch train eval"
).split()


def synthetic_sentences(n: int, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences with some structure a model can learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(5, 16)
        start = rng.randrange(len(_WORDS))
        # Mostly consecutive words (learnable bigrams), some random ones.
        words = [_WORDS[(start + i) % len(_WORDS)] if rng.random() < 0.8 else rng.choice(_WORDS) for i in range(k)]
        out.append(" ".join(words).capitalize() + ".")
    return out


def build_tokenizer(path: str | Path, vocab_size: int = 384, chat_template: str | None = CHATML_TEMPLATE):
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(synthetic_sentences(2000, seed=1) + ["user assistant system"] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:])
    if chat_template is not None:
        fast.chat_template = chat_template
    path = Path(path)
    fast.save_pretrained(path)
    return fast


def build_llama(path: str | Path | None, vocab_size: int, *, hidden_size: int = 32, layers: int = 2,
                heads: int = 4, intermediate: int = 64, seed: int = 0, **extra):
    """A tiny random Llama, saved to ``path`` when given. Returns the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256, tie_word_embeddings=False, **extra)
    model = LlamaForCausalLM(cfg)
    if path is not None:
        model.save_pretrained(Path(path))
    return model


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """OpenAI-style ``messages`` rows with system/user/assistant turns."""
    sents = synthetic_sentences(3 * n, seed=seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": sents[3 * i]}, {"role": "assistant", "content": sents[3 * i + 1]}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Be brief."}] + msgs + [
                {"role": "user", "content": "More."}, {"role": "assistant", "content": sents[3 * i + 2]}]
        rows.append({"messages": msgs})
    return rows


def run_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m potstill ARGS`` as a real subprocess; on failure (with ``check``) the output is shown."""
    proc = subprocess.run([sys.executable, "-m", "potstill", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def run_torchrun_distill(config_path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m potstill distill CONFIG [OVERRIDES]`` on CPU (gloo), one thread per process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["torchrun", "--nproc_per_node", str(nproc), "-m", "potstill", "distill", str(config_path),
                           *overrides, "--no-progress"], env=env, capture_output=True, text=True, timeout=400)


# A tiny llama student for run tests: built from config, so a run needs no student folder.
TINY_STUDENT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def run_config(out, teacher_dir, data, *, loss: dict | None = None, eval: dict | None = None, **train) -> dict:
    """A few-second distillation config: the tiny student from config, fp32, a log record every
    step, evaluation on one batch; keywords override ``train`` keys. No report and card at the end
    (matplotlib's plots cost a tiny run 1-3 s; tests/integration/test_report_runs.py and the runs
    that turn ``output.report`` on cover them)."""
    return {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"config": dict(TINY_STUDENT)},
        "data": {"source": str(data), "max_length": 48, "validation_fraction": 0.1},
        "loss": loss if loss is not None else {"ce": {"weight": 0.2}},
        "train": {"max_steps": 6, "batch_size": 2, "lr": 3e-3, "precision": "fp32", "log_every": 1, **train},
        "eval": eval if eval is not None else {"max_batches": 1},
        "output": {"dir": str(out), "tensorboard": False, "report": False},
    }


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str, code: int | None = None) -> str:
    """A failed CLI call printed exactly one ``potstill: error:`` line holding every fragment, no traceback."""
    assert proc.returncode != 0 if code is None else proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("potstill: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def kill_at_checkpoint(config_path, run_dir, name: str, timeout: float = 240) -> None:
    """Start ``potstill distill CONFIG`` and SIGKILL it once ``run_dir/checkpoints/<name>`` (or a later
    one) exists; fails if the run ends first. Nothing of the student is written by then."""
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "potstill", "distill", str(config_path), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = Path(run_dir) / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(p.name >= name for p in ckpts.iterdir() if p.name.startswith("step-")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def build_unigram_tokenizer(path: str | Path, vocab_size: int = 2000, texts: list[str] | None = None):
    """Train a SentencePiece-style Unigram tokenizer (NFKC, Metaspace '▁', byte fallback) and save it
    as a transformers tokenizer folder; a tokenizer unlike :func:`build_tokenizer`'s byte-level BPE,
    for cross-tokenizer tests.

    Trained on ``texts``, by default the first 2000 train texts of the shipped python-docs corpus
    (read straight from the snapshot, nothing unpacked). Its own specials: ``<unk>`` ``<s>`` ``</s>``
    ``<pad>`` ``<start_of_turn>`` ``<end_of_turn>`` (ids 0-5); ``<s>`` is prepended by the
    post-processor; a Gemma-like chat template. With byte fallback, the 256 pieces ``<0x00>`` ..
    ``<0xFF>`` are part of ``vocab_size`` and the decoder turns them back into bytes.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        from potstill.data.corpus import snapshot_texts

        texts = snapshot_texts("train", 2000)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    try:
        models.Unigram([("<unk>", 0.0)], unk_id=0, byte_fallback=True)
        byte_fallback = True
    except TypeError:  # a tokenizers release without byte fallback
        byte_fallback = False
    n_bytes = len(byte_pieces) if byte_fallback else 0
    if vocab_size <= len(specials) + n_bytes + 50:
        raise ValueError(f"vocab_size {vocab_size} is too small for a unigram tokenizer with byte fallback")
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    # A smaller seed and faster pruning than the defaults: ~2x quicker, the same kind of vocabulary.
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - n_bytes, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False, seed_size=50_000, shrinking_factor=0.5, max_piece_length=12)
    tok.train_from_iterator(texts, trainer=trainer)
    if byte_fallback:
        # The trainer knows nothing of byte pieces: rebuild the model with them appended (least likely).
        model = json.loads(tok.to_str())["model"]
        vocab = [(piece, score) for piece, score in model["vocab"]]
        floor = min((score for _, score in vocab if score < 0), default=0.0) - 1.0
        known = {piece for piece, _ in vocab}
        vocab += [(piece, floor) for piece in byte_pieces if piece not in known]
        tok.model = models.Unigram(vocab, unk_id=model["unk_id"], byte_fallback=True)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="always")])
    else:
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=specials[4:])
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    fast.save_pretrained(Path(path))
    return fast
