#!/usr/bin/env python
"""Train the bundled demo teacher: a byte-level BPE tokenizer and a small Llama on python-docs.

    python scripts/train_demo_teacher.py            # reproduces src/potstill/assets/demo-teacher

Steps, in order: build (or reuse) the ``python-docs`` corpus; train an 8192-token
byte-level BPE tokenizer on its train split; pack the train split (texts joined with EOS)
into blocks; train a ~17M-parameter Llama with AdamW, warmup + cosine, bf16 autocast and
fp32 master weights; evaluate per-token perplexity on the test split against a unigram
model (add-one smoothed train token counts) on exactly the same target tokens; save the
model in bfloat16 safetensors with its tokenizer, a model card (README.md) and
``training.json``. The defaults are the committed model's settings (about 30 minutes on 2
CPU cores with AMX).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "potstill" / "assets" / "demo-teacher"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; <|endoftext|> is EOS and pad
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCH = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
            intermediate_size=1024, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False, initializer_range=0.02)
# Prompts end inside a word: a trailing "\n\n" is pre-tokenized as one token that training never
# saw before text (there it is split "\n", "\n"), which derails the first sampled tokens.
PROMPTS = ["json.dumps\n\nSerialize", "torch.nn.Module.to\n\nMove", "Return the number of",
           "The \"for\" statement\n*******************\n\nThe"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write (replaced)")
    p.add_argument("--steps", type=int, default=1800, help="optimizer steps")
    p.add_argument("--minutes", type=float, default=None,
                   help="instead of --steps: measure the speed over the first steps, then fit the run in this "
                        "many minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda where there is one")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="train eagerly, without torch.compile (slower)")
    p.add_argument("--cache", default=None, help="corpus cache root (default: $POTSTILL_CACHE or ~/.cache/potstill)")
    return p.parse_args(argv)


def read_split(folder: Path, split: str) -> list[str]:
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                   additional_special_tokens=SPECIALS[1:],
                                   model_max_length=ARCH["max_position_embeddings"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """EOS, text, EOS, text, EOS, ...: every text is predicted from a document boundary."""
    eos = tokenizer.eos_token_id
    ids = [eos]
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def blocks(tokens: np.ndarray, seq: int) -> torch.Tensor:
    """(n, seq + 1) windows with stride seq: consecutive windows share one token, so every
    token but the first is a target exactly once."""
    n = (len(tokens) - 1) // seq
    idx = np.arange(seq + 1)[None, :] + seq * np.arange(n)[:, None]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def portable_tokenizer_config(folder: Path) -> None:
    """Name the class and special tokens the way transformers 4.x also reads them.

    transformers 5 writes ``TokenizersBackend`` and a list under ``extra_special_tokens``,
    which 4.x (still allowed by potstill's requirements) cannot load; 5.x reads both forms.
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif extra is not None:
        config["extra_special_tokens"] = extra
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def build_model(vocab_size: int, seed: int, eos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **ARCH)
    return LlamaForCausalLM(config)


@torch.no_grad()
def nll(model, tokens: np.ndarray, seq: int, device, batch: int = 16) -> tuple[float, int]:
    """Summed next-token NLL (nats) and target count over all of ``tokens`` (tail included)."""
    model.eval()
    data = blocks(tokens, seq)
    parts = [data[i:i + batch] for i in range(0, len(data), batch)]
    tail = tokens[len(data) * seq:]
    if len(tail) > 1:
        parts.append(torch.from_numpy(tail.astype(np.int64))[None])
    total, count = 0.0, 0
    for x in parts:
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return total, count


def unigram_nll(train_tokens: np.ndarray, test_tokens: np.ndarray, vocab_size: int) -> tuple[float, int]:
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    targets = test_tokens[1:]  # the same targets as nll(): every token but the first
    return float(-logp[targets].sum()), len(targets)


def train(model, data: torch.Tensor, args, device) -> dict:
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    plan = {"steps": args.steps}  # --minutes sets it after measuring, still inside the warmup

    def lr_at(step):  # linear warmup, then cosine down to 10% of the peak
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, plan["steps"] - args.warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    forward = torch.compile(model) if args.compile else model
    rng = np.random.default_rng(args.seed)
    order, cursor = rng.permutation(len(data)), 0
    tokens_per_step = args.batch * args.seq
    model.train()
    bar = tqdm(total=plan["steps"], desc="teacher", unit="step", dynamic_ncols=True)
    start, cpu_start, rate_from, losses, ema = time.perf_counter(), time.process_time(), None, [], None
    step = 0
    while step < plan["steps"]:
        if cursor + args.batch > len(order):  # a new epoch, a new order
            order, cursor = rng.permutation(len(data)), 0
        x = data[order[cursor:cursor + args.batch]].to(device)
        cursor += args.batch
        with torch.autocast(device.type, dtype=torch.bfloat16):
            try:
                logits = forward(input_ids=x[:, :-1]).logits
            except Exception as exc:  # compilation fails on the first call, e.g. without a C++ compiler
                if forward is model or step > 0:
                    raise
                print(f"torch.compile failed ({type(exc).__name__}); training eagerly, slower", file=sys.stderr)
                forward = model
                logits = forward(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        value = loss.item()
        losses.append(value)
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if step == 5:  # the first steps include compilation: measure the rate after them
            rate_from = (time.perf_counter(), step)
        rate = None
        if rate_from and step > rate_from[1]:
            rate = (step - rate_from[1]) * tokens_per_step / (time.perf_counter() - rate_from[0])
        if args.minutes and step == 25 and rate:
            left = args.minutes * 60 - (time.perf_counter() - start)
            plan["steps"] = max(step + 1, step + int(left * rate / tokens_per_step))
            bar.total = plan["steps"]
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rate:.0f}" if rate else "-", lr=f"{sched.get_last_lr()[0]:.2e}")
        bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    # CPU time over wall time x threads: well under 1 when other jobs shared the cores.
    cpu_share = (time.process_time() - cpu_start) / (seconds * torch.get_num_threads())
    rate = (plan["steps"] - rate_from[1]) * tokens_per_step / (time.perf_counter() - rate_from[0]) if rate_from \
        else plan["steps"] * tokens_per_step / seconds
    return {"steps": plan["steps"], "tokens": plan["steps"] * tokens_per_step, "seconds": seconds,
            "cpu_share": cpu_share,
            "tokens_per_second": rate, "epochs": plan["steps"] * args.batch / len(data),
            "loss_curve": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)]}


def samples(folder: Path, seed: int) -> list[str]:
    """Load the saved folder as a user would and let it write from a few prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        torch.manual_seed(seed)
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            gen = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.7, top_k=40,
                                 pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [potstill, demo, llama]
---

# potstill demo teacher

A small Llama-architecture causal LM that ships with potstill so that `potstill quickstart`
runs offline, right after install. It was trained from scratch on the `python-docs` corpus
(docstrings of the Python standard library and of potstill's dependencies); it writes
docstring-like English about Python APIs, and nothing more. It is a teacher for demos and
tests, not a useful assistant.

## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM`: {layers} layers, hidden {hidden}, {heads} heads, MLP {inter}, RoPE, untied embeddings |
| parameters | {params:,} ({params_m:.1f}M; {nonemb:,} outside the embeddings and LM head) |
| context | {max_pos} positions (trained on {seq}-token blocks) |
| tokenizer | byte-level BPE, {vocab} tokens, trained on the train split; `<|endoftext|>` is EOS and padding; ChatML chat template (`<|im_start|>`, `<|im_end|>`) |
| weights | safetensors, bfloat16 |

## Training

| | |
|---|---|
| data | `python-docs` train split: {train_texts:,} texts, {train_chars:,} characters, {train_tokens:,} tokens |
| steps | {steps:,} steps of {batch} x {seq} tokens = {tokens:,} training tokens ({epochs:.2f} epochs) |
| optimizer | AdamW (betas 0.9/0.95, weight decay 0.1), peak lr {lr}, {warmup} warmup steps, cosine to 10%, clip 1.0, seed {seed} |
| precision | bf16 autocast, fp32 master weights{compiled} |
| wall time | {minutes:.1f} minutes of training ({tok_s:,.0f} tokens/s), {total_minutes:.1f} minutes in all{shared} |
| machine | {cpu}, {cores} cores used ({device}), torch {torch}, transformers {transformers} |

## Held-out perplexity (test split)

Per token, same tokenizer, on the same {test_tokens:,} target tokens of the `python-docs`
test split ({test_texts} texts, never seen in training):

| model | perplexity |
|---|---|
| this teacher | **{ppl:.2f}** |
| unigram (train token counts, add-one) | {uni_ppl:.1f} |

Validation split: {val_ppl:.2f}.

## Reproduce

```
{command}
```

The corpus is the `python-docs` snapshot that ships with potstill (built from the docstrings of
Python {python} and the package versions in `training.json`), so every machine trains on the
same texts.

## Sample (prompt `{prompt}`, temperature 0.7)

```
{sample}
```

## Corpus and licenses

`python-docs` ships with potstill as a compressed snapshot
(`potstill/assets/python-docs/corpus.jsonl.xz`, made by `scripts/snapshot_python_docs.py`):
the docstrings (module, class, function) of the Python standard library and of transformers,
torch, numpy, datasets, accelerate, huggingface_hub, tokenizers, safetensors, tqdm, PyYAML and
pydantic, read with `ast` from their installed sources, plus the `pydoc_data.topics` reference
pages; deduplicated, split by a hash of each text (about 98% train, 1.2% validation, 1.2%
test). The texts keep their own licenses: the
Python Software Foundation License for the standard library and `pydoc_data`, and each
package's license for its docstrings (BSD-3-Clause for torch and numpy, Apache-2.0 for
transformers, datasets, accelerate, huggingface_hub, tokenizers and safetensors, MIT for
PyYAML, pydantic and tqdm (MPL-2.0 for parts of tqdm)). The weights are released with potstill
under Apache-2.0.
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows the corpus build's summary line
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from potstill.data.corpus import python_docs
    from potstill.training.metrics import cpu_name

    corpus = python_docs(args.cache)  # the shipped snapshot: the same texts on every machine
    manifest = json.loads((corpus / "manifest.json").read_text())
    train_texts, val_texts, test_texts = (read_split(corpus, s) for s in ("train", "validation", "test"))
    print(f"corpus {corpus}: {len(train_texts):,} / {len(val_texts):,} / {len(test_texts):,} texts", flush=True)

    tokenizer = train_tokenizer(train_texts, args.vocab)
    train_tokens, val_tokens, test_tokens = (encode(tokenizer, t) for t in (train_texts, val_texts, test_texts))
    print(f"tokens: train {len(train_tokens):,}, validation {len(val_tokens):,}, test {len(test_tokens):,} "
          f"({sum(map(len, train_texts)) / len(train_tokens):.2f} chars/token)", flush=True)

    model = build_model(len(tokenizer), args.seed, tokenizer.eos_token_id).to(device)
    params = sum(p.numel() for p in model.parameters())
    nonemb = params - model.model.embed_tokens.weight.numel() - model.lm_head.weight.numel()
    print(f"model: {params / 1e6:.2f}M parameters", flush=True)
    stats = train(model, blocks(train_tokens, args.seq), args, device)

    tmp = args.out.with_name(f".tmp-{args.out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    portable_tokenizer_config(tmp)
    # Evaluate what is saved: the bf16 weights, reloaded as a user would load them.
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)
    test_sum, test_n = nll(saved, test_tokens, args.seq, device)
    val_sum, val_n = nll(saved, val_tokens, args.seq, device)
    uni_sum, uni_n = unigram_nll(train_tokens, test_tokens, len(tokenizer))
    assert test_n == uni_n, (test_n, uni_n)
    ppl, uni_ppl, val_ppl = math.exp(test_sum / test_n), math.exp(uni_sum / uni_n), math.exp(val_sum / val_n)
    print(f"test perplexity: teacher {ppl:.2f}, unigram {uni_ppl:.1f} ({test_n:,} tokens); validation {val_ppl:.2f}")
    texts = samples(tmp, args.seed)

    import transformers

    command = "python scripts/train_demo_teacher.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    total_minutes = (time.perf_counter() - t0) / 60
    record = {
        "architecture": {"type": "LlamaForCausalLM", **ARCH, "vocab_size": len(tokenizer)},
        "parameters": params, "non_embedding_parameters": nonemb,
        "corpus": {"name": "python-docs", "fingerprint": corpus.name, "sources": manifest["sources"],
                   "python": manifest["python"], "splits": manifest["splits"],
                   "tokens": {"train": len(train_tokens), "validation": len(val_tokens), "test": len(test_tokens)}},
        "training": {"steps": stats["steps"], "batch": args.batch, "seq": args.seq, "tokens": stats["tokens"],
                     "epochs": round(stats["epochs"], 3), "lr": args.lr, "warmup": args.warmup, "seed": args.seed,
                     "seconds": round(stats["seconds"], 1), "cpu_share": round(stats["cpu_share"], 3),
                     "tokens_per_second": round(stats["tokens_per_second"]),
                     "compiled": args.compile, "loss_curve_every_50_steps": stats["loss_curve"]},
        "evaluation": {"test_perplexity": round(ppl, 3), "unigram_test_perplexity": round(uni_ppl, 3),
                       "validation_perplexity": round(val_ppl, 3), "test_target_tokens": test_n,
                       "weights": "bfloat16, computed under bf16 autocast"},
        "machine": {"cpu": cpu_name(), "threads": args.threads, "device": str(device), "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version()},
        "total_minutes": round(total_minutes, 1), "command": command, "samples": texts,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    card = CARD.format(
        layers=ARCH["num_hidden_layers"], hidden=ARCH["hidden_size"], heads=ARCH["num_attention_heads"],
        inter=ARCH["intermediate_size"], params=params, params_m=params / 1e6, nonemb=nonemb,
        max_pos=ARCH["max_position_embeddings"], seq=args.seq, vocab=len(tokenizer),
        train_texts=len(train_texts), train_chars=manifest["splits"]["train"]["chars"], train_tokens=len(train_tokens),
        steps=stats["steps"], batch=args.batch, tokens=stats["tokens"], epochs=stats["epochs"], lr=args.lr,
        warmup=args.warmup, seed=args.seed, compiled=", torch.compile" if args.compile else "",
        shared="" if stats["cpu_share"] > 0.85 else
        f"; the cores were shared with other jobs (this process had {stats['cpu_share']:.0%} of them)",
        minutes=stats["seconds"] / 60, tok_s=stats["tokens_per_second"], total_minutes=total_minutes,
        cpu=cpu_name(), cores=args.threads, device=device, torch=torch.__version__,
        transformers=transformers.__version__, test_tokens=test_n, test_texts=len(test_texts), ppl=ppl,
        uni_ppl=uni_ppl, val_ppl=val_ppl, command=command, python=platform.python_version(),
        prompt=PROMPTS[0].replace("\n", "\\n"), sample=texts[0])
    (tmp / "README.md").write_text(card)
    if args.out.exists():
        shutil.rmtree(args.out)
    for path in tmp.iterdir():  # some writers create 0600 files; the folder ships in the package
        path.chmod(0o644)
    os.replace(tmp, args.out)
    print(f"saved {args.out} in {total_minutes:.1f} minutes")
    if not ppl < uni_ppl / 2:
        print(f"warning: the teacher ({ppl:.1f}) is not clearly better than unigram ({uni_ppl:.1f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
