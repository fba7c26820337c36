"""What verified checkpoints cost: writing a checkpoint, the sha256 of its files, verifying it.

    python bench/checkpoint.py [--hidden 512 --layers 8 --vocab 32000] [--repeats 3]

Builds a Llama student from config (no download), gives it AdamW state (one optimizer step),
then times, on the same machine and in the same run:

  write    the checkpoint files as a run writes them (safetensors weights, optimizer, scheduler),
           fsynced, as publishing a checkpoint does
  hash     the size and sha256 of every file (what state.json records since issue #12)
  verify   what a resume checks before it trusts the checkpoint

and prints each with the ratio hash / write and verify / write. Timings are the median of
``--repeats`` rounds in a fresh temporary folder each (page cache warm, as right after a save).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=max(1, hidden // 64), intermediate_size=hidden * 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=10)
    ids = torch.randint(0, vocab, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def main() -> None:
    from potstill.atomic import fsync_tree
    from potstill.training import checkpoint as ckpt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, optimizer, scheduler = build(args.hidden, args.layers, args.vocab)
    n_params = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {"write": [], "hash": [], "verify": []}
    size = 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name) / "step-000001"
            tmp.mkdir()
            ckpt.write_process_state(tmp, 0)
            t0 = time.perf_counter()
            model.save_pretrained(tmp / "student", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            fsync_tree(tmp)
            t1 = time.perf_counter()
            files = {rel: {"size": (tmp / rel).stat().st_size, "sha256": ckpt.sha256_of(tmp / rel)}
                     for rel in ckpt.checkpoint_files(tmp)}
            t2 = time.perf_counter()
            (tmp / ckpt.STATE_FILE).write_text(json.dumps({"step": 1, ckpt.FILES_KEY: files}))
            t3 = time.perf_counter()
            problem = ckpt.verify_checkpoint(tmp)
            t4 = time.perf_counter()
            assert problem is None, problem
            size = sum(f["size"] for f in files.values())
            times["write"].append(t1 - t0)
            times["hash"].append(t2 - t1)
            times["verify"].append(t4 - t3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"student {n_params / 1e6:.1f}M parameters; checkpoint {size / 1e6:.0f} MB; median of {args.repeats}")
    print("| step | seconds | MB/s | / write |")
    print("| --- | --- | --- | --- |")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {size / 1e6 / v:.0f} | {v / med['write']:.2f} |")
    out = Path(__file__).parent / "results" / "checkpoint.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"parameters": n_params, "bytes": size, "repeats": args.repeats,
                               "median_seconds": med, "all_seconds": times}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
