"""Packed or per-example token arrays, their on-disk cache, and the batch collator.

On disk, one folder per fingerprint under the cache root::

    <root>/<fingerprint>/tokens.npy   int32 (N,)   token ids of all items, back to back
                         loss.npy     uint8 (N,)   1 where the token is a training target
                         offsets.npy  int64 (I+1,) item i is tokens[offsets[i]:offsets[i+1]]
                         spans.npy    int32 (N, 4) only for cross-tokenizer runs: each token's
                                      example, canonical character span, first/last flags
                         manifest.json             counts, settings, format version

Items are blocks of exactly ``max_length`` tokens (packing) or single truncated examples.
Folders are written to a temporary name in the same parent, fsynced and renamed, so a
folder that exists is complete; arrays are memory-mapped on load. A folder damaged later
(truncated or overwritten files, ids outside the tokenizer's vocabulary) is found on load
and rebuilt; one that also holds files potstill did not write is left alone, with one line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import fsync_dir
from ..errors import DataError
from .formats import Encoded

FORMAT_VERSION = 1
IGNORE_INDEX = -100
_ARRAYS = ("tokens", "loss", "offsets")
CACHE_FILES = frozenset({f"{name}.npy" for name in _ARRAYS} | {"manifest.json", "spans.npy"})  # what write_cache puts in a folder
log = logging.getLogger("potstill")


class TokenizedDataset(torch.utils.data.Dataset):
    """Token items ready for a causal LM.

    ``ds[i]`` is ``{"input_ids": LongTensor (L,), "labels": LongTensor (L,)}`` with
    ``labels == -100`` where no loss applies (prompts, role headers, separators).
    ``n_tokens`` counts every token of every item, ``n_loss_tokens`` the tokens whose label
    is not -100 (before the one-position shift that the loss applies).
    """

    def __init__(self, tokens: np.ndarray, loss: np.ndarray, offsets: np.ndarray, manifest: dict[str, Any],
                 cache_path: Path | None = None, spans: np.ndarray | None = None):
        self.tokens, self.loss, self.offsets = tokens, loss, offsets
        self.spans = spans  # (N, 4) int32 or None: see potstill.data.formats.token_spans
        self.manifest = manifest
        self.cache_path = cache_path
        self.fingerprint: str = manifest["fingerprint"]
        self.max_length: int = int(manifest["max_length"])
        self.packing: bool = bool(manifest["packing"])
        self.n_tokens: int = int(manifest["n_tokens"])
        self.n_loss_tokens: int = int(manifest["n_loss_tokens"])
        self.stats: dict[str, Any] = manifest.get("stats", {})

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for {n} items")
        i %= n
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        input_ids = torch.from_numpy(np.asarray(self.tokens[a:b], dtype=np.int64))
        labels = input_ids.clone()
        labels[torch.from_numpy(np.asarray(self.loss[a:b]) == 0)] = IGNORE_INDEX
        if self.spans is not None:
            return {"input_ids": input_ids, "labels": labels, "spans": np.asarray(self.spans[a:b])}
        return {"input_ids": input_ids, "labels": labels}

    @classmethod
    def load(cls, path: Path, *, vocab_size: int | None = None) -> "TokenizedDataset":
        """Memory-map a cache folder. Raises ValueError (or OSError) on anything incomplete, from
        another version, or damaged: a truncated or garbage file, arrays that disagree with each other
        or the manifest, and (with ``vocab_size``) token ids outside the vocabulary or loss flags
        other than 0/1, which would otherwise crash or silently corrupt training."""
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"manifest.json is not UTF-8 ({err.reason})") from None
        if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"cache format {manifest.get('version') if isinstance(manifest, dict) else None} "
                             f"!= {FORMAT_VERSION}")
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _ARRAYS}
        check_arrays(arrays, manifest)
        spans = None
        if manifest.get("spans"):
            spans = np.load(path / "spans.npy", mmap_mode="r", allow_pickle=False)
            if spans.dtype != np.int32 or spans.shape != (len(arrays["tokens"]), 4):
                raise ValueError(f"spans.npy holds {spans.dtype} {spans.shape}, not int32 ({len(arrays['tokens'])}, 4)")
        if vocab_size is not None:
            check_values(arrays, manifest, vocab_size)
        return cls(arrays["tokens"], arrays["loss"], arrays["offsets"], manifest, cache_path=path, spans=spans)

    # Workers started with spawn get the folder to re-map, not a copy of the arrays.
    def __getstate__(self):
        state = dict(self.__dict__)
        if self.cache_path is not None:
            state.update(tokens=None, loss=None, offsets=None, spans=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.tokens is None:
            for name in _ARRAYS:
                setattr(self, name, np.load(Path(self.cache_path) / f"{name}.npy", mmap_mode="r"))
            if self.manifest.get("spans"):
                self.spans = np.load(Path(self.cache_path) / "spans.npy", mmap_mode="r")


_DTYPES = {"tokens": np.int32, "loss": np.uint8, "offsets": np.int64}
# Token-id and loss-flag scans of a cache hit read every byte once; past this many tokens only the
# first and last half of it are read, so that a start is not a minute of disk reads.
SCAN_TOKENS = 1 << 28


def check_arrays(arrays: dict[str, np.ndarray], manifest: dict) -> None:
    """Shapes, dtypes and offsets agree with each other and the manifest (cheap: no token is read)."""
    for name, dtype in _DTYPES.items():
        a = arrays[name]
        if a.dtype != dtype or a.ndim != 1:
            raise ValueError(f"{name}.npy holds {a.dtype} of {a.ndim} dims, not a 1-d {np.dtype(dtype)} array")
    tokens, loss, offsets = arrays["tokens"], arrays["loss"], arrays["offsets"]
    n_items, n_tokens = manifest.get("n_items"), manifest.get("n_tokens")
    if len(tokens) != n_tokens or len(loss) != n_tokens:
        raise ValueError(f"tokens.npy / loss.npy hold {len(tokens)} / {len(loss)} entries, "
                         f"the manifest says {n_tokens}")
    if len(offsets) != (n_items if isinstance(n_items, int) else -2) + 1 or len(offsets) < 2:
        raise ValueError(f"offsets.npy holds {len(offsets)} entries for {n_items} items")
    lengths = np.diff(offsets)
    max_length = manifest.get("max_length")
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_tokens or not isinstance(max_length, int) or (
            lengths.size and (int(lengths.min()) < 1 or int(lengths.max()) > max_length)):
        raise ValueError("offsets.npy does not cut the tokens into items of 1..max_length tokens")
    if not isinstance(manifest.get("fingerprint"), str) or not isinstance(manifest.get("n_loss_tokens"), int):
        raise ValueError("the manifest lacks its fingerprint or n_loss_tokens")


def check_values(arrays: dict[str, np.ndarray], manifest: dict, vocab_size: int) -> None:
    """Token ids inside ``[0, vocab_size)`` and loss flags 0/1 summing to the manifest's count."""
    tokens, loss = arrays["tokens"], arrays["loss"]
    n = len(tokens)
    half = SCAN_TOKENS // 2
    parts = [slice(0, n)] if n <= SCAN_TOKENS else [slice(0, half), slice(n - half, n)]
    for part in parts:
        if n and (int(tokens[part].min()) < 0 or int(tokens[part].max()) >= vocab_size):
            raise ValueError(f"tokens.npy holds ids outside the tokenizer's vocabulary of {vocab_size}")
        if n and int(loss[part].max()) > 1:
            raise ValueError("loss.npy holds values other than 0 and 1")
    if len(parts) == 1 and int(loss.sum(dtype=np.int64)) != manifest["n_loss_tokens"]:
        raise ValueError(f"loss.npy marks {int(loss.sum(dtype=np.int64))} tokens, the manifest says "
                         f"{manifest['n_loss_tokens']}")


def collate(examples: list[dict], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids (B, T) with ``pad_token_id``, labels (B, T)
    with -100, attention_mask (B, T) long, 1 on real tokens.

    Padding is masked out of attention and loss, so a tokenizer without a pad token
    (``pad_token_id=None``) pads with id 0."""
    if not examples:
        raise ValueError("collate() got an empty list of examples")
    longest = max(len(e["input_ids"]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, longest), int(pad_token_id or 0), dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for k, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[k, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[k, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        attention_mask[k, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Positions that count after the shift (``logits[:, :-1]`` predicts ``labels[:, 1:]``)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def pack(enc: Encoded, max_length: int, packing: bool
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int], np.ndarray | None]:
    """Cut examples into items: (tokens int32, loss uint8, offsets int64, counts, spans or None).

    packing: all examples back to back, blocks of exactly ``max_length``, the partial tail
    dropped (unless it is all there is: then one shorter block). Else: one item per
    example, truncated to ``max_length``; examples left without loss tokens are dropped.
    ``enc.spans`` (cross-tokenizer runs) follow their tokens.
    """
    total = len(enc.tokens)
    spans = enc.spans
    if packing:
        n_blocks = total // max_length
        if n_blocks == 0 and total > 0:
            return enc.tokens, enc.loss, np.array([0, total], np.int64), {"dropped_tokens": 0, "truncated": 0}, spans
        keep = n_blocks * max_length
        offsets = np.arange(n_blocks + 1, dtype=np.int64) * max_length
        return (enc.tokens[:keep], enc.loss[:keep], offsets, {"dropped_tokens": total - keep, "truncated": 0},
                None if spans is None else spans[:keep])
    starts = np.concatenate([[0], np.cumsum(enc.lengths)[:-1]]).astype(np.int64)
    kept = np.minimum(enc.lengths, max_length)
    index = np.repeat(starts, kept) + (np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept))
    tokens, loss = enc.tokens[index], enc.loss[index]
    spans = None if spans is None else spans[index]
    item_loss = np.add.reduceat(loss.astype(np.int64), np.cumsum(kept) - kept) if len(kept) else np.zeros(0)
    alive = (kept > 0) & (item_loss > 0)
    if not alive.all():  # truncation cut away every loss token of these examples
        keep_tok = np.repeat(alive, kept)
        tokens, loss, kept = tokens[keep_tok], loss[keep_tok], kept[alive]
        spans = None if spans is None else spans[keep_tok]
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    counts = {"dropped_tokens": int(total - len(tokens)), "truncated": int((enc.lengths > max_length).sum()),
              "no_loss_after_truncation": int((~alive).sum())}
    return tokens.astype(np.int32), loss.astype(np.uint8), offsets, counts, spans


def make_dataset(enc: Encoded, *, fingerprint: str, max_length: int, packing: bool, role: str, describe: str,
                 cache_root: Path | None) -> TokenizedDataset:
    """Pack ``enc``, write it to ``cache_root/fingerprint`` (when possible) and return the dataset."""
    tokens, loss, offsets, counts, spans = pack(enc, max_length, packing)
    if not loss.any():
        raise DataError(f"the {role} data from {describe} has no loss tokens left after truncation to "
                        f"data.max_length={max_length} ({len(enc.lengths)} examples): raise data.max_length, "
                        "shorten the prompts, or set data.packing=true")
    manifest = {
        "version": FORMAT_VERSION, "fingerprint": fingerprint, "role": role, "source": describe,
        "format": enc.format, "max_length": max_length, "packing": packing,
        "n_items": len(offsets) - 1, "n_tokens": int(len(tokens)), "n_loss_tokens": int(loss.sum(dtype=np.int64)),
        "stats": {**enc.stats, **counts}, "spans": spans is not None,
    }
    arrays = {"tokens": tokens, "loss": loss, "offsets": offsets}
    if spans is not None:
        arrays["spans"] = np.ascontiguousarray(spans, dtype=np.int32)
    path = None
    if cache_root is not None:
        try:
            path = write_cache(cache_root, fingerprint, arrays, manifest)
        except OSError as err:
            log.warning("could not write the data cache under %s (%s); keeping the tokens in memory",
                        cache_root, err)
    if path is not None:
        try:
            return TokenizedDataset.load(path)
        except (OSError, ValueError) as err:
            # The arrays are still in memory: train from them and say why the cache was not used.
            log.warning("could not read back the data cache %s (%s); keeping the tokens in memory",
                        path, err)
    return TokenizedDataset(tokens, loss, offsets, manifest, cache_path=None,
                            spans=None if spans is None else arrays["spans"])


def load_cache(cache_root: Path, fingerprint: str, *, vocab_size: int | None = None) -> TokenizedDataset | None:
    """The cached dataset for ``fingerprint``, or None. A damaged folder (truncated or garbage
    files, ids outside ``vocab_size``) is removed so that it is rebuilt, but only when it holds
    nothing but the files potstill writes there; anything else in it is the user's, and the
    damage is one DataError line instead."""
    path = cache_root / fingerprint
    if not path.is_dir():
        return None
    try:
        ds = TokenizedDataset.load(path, vocab_size=vocab_size)
        if ds.fingerprint != fingerprint:
            raise ValueError("fingerprint mismatch")
        return ds
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        foreign = sorted(p.name for p in path.iterdir() if p.name not in CACHE_FILES)
        if foreign:
            raise DataError(f"the tokenized-data cache {path} is damaged ({reason}) and holds files potstill did "
                            f"not write ({', '.join(foreign[:3])}): move that folder away, or set data.cache_dir "
                            "to another folder") from None
        log.warning("ignoring the damaged data cache %s (%s); rebuilding it", path, reason)
        shutil.rmtree(path, ignore_errors=True)
        return None


def write_cache(cache_root: Path, fingerprint: str, arrays: dict[str, np.ndarray], manifest: dict) -> Path:
    """Write the folder atomically: temp dir in the same parent, fsync every file, rename."""
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / fingerprint
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{fingerprint[:16]}-", dir=cache_root))
    try:
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, np.ascontiguousarray(array))
                fh.flush()
                os.fsync(fh.fileno())
        with open(tmp / "manifest.json", "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same folder first
        fsync_dir(cache_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def tokenizer_state(tokenizer) -> str:
    """Everything about a tokenizer that changes token ids: its serialized pipeline (vocab, merges,
    normalizer, pre-tokenizer, post-processor, added tokens), special tokens, chat template."""
    state: dict[str, Any] = {"class": type(tokenizer).__name__}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)  # per-call settings, not identity
        pipeline.pop("padding", None)
        state["backend"] = pipeline
    else:
        state["vocab"] = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    state["added"] = {str(k): repr(v) for k, v in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()}
    state["special"] = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()}
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "add_bos_token", "add_eos_token",
                 "chat_template", "clean_up_tokenization_spaces"):
        state[attr] = getattr(tokenizer, attr, None)
    return json.dumps(state, sort_keys=True, default=repr, ensure_ascii=False)
