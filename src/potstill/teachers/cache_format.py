"""The teacher-logit cache on disk: encoding, shards, manifest, checksums.

A cache folder (written by ``potstill cache-teacher``, read by ``teacher.cache: PATH``)::

    <dir>/manifest.json        what was captured and how, one entry per complete shard
          shard-00000.npz      examples [0, E) of the tokenized train dataset
          shard-00001.npz      examples [E, 2E) ...

Rows: one per *valid token* (a position whose next-token label is not -100), per example in
position order, examples in index order, so the rows of a collated batch are exactly
``logits[:, :-1][labels[:, 1:] != -100]`` (row-major). ``offsets`` (E + 1,) int64 gives each
example's rows inside the shard.

Shard arrays (uncompressed ``.npz``):

* ``ids``: uint8 (R, ceil(K * b / 8)): K token ids per row, each in b = ceil(log2 V) bits,
  big-endian bit order, rows padded to whole bytes (:func:`pack_ids`).
* top-k (``kind: topk``): ``logp`` (R, K) and ``rest`` (R,) uint8 or uint16: teacher
  log-probabilities of the ids, sorted descending, and the log of the mass outside them,
  both quantized linearly on [logp_min, 0]: code = round((x - logp_min) / (-logp_min) * (2^bits - 1)),
  x = logp_min + code * step; values at or below logp_min get code 0, which decodes to
  -inf (probability 0: a mass under e^-20 is not worth a bucket, and a rest of exactly 0
  when k = V must stay 0) (:func:`quantize_logp`). logp_min is -20 for 8 bits (step 0.078, so each probability is
  kept within ±4%) and -40 for 16 bits (step 0.0006).
* sampled (``kind: sampled``): ``ids`` holds K draws (with repeats) from the teacher's
  distribution; ``entropy`` float16 (R,) is the teacher's entropy, for an unbiased KL.

The manifest names the teacher (and revision, vocabulary size), the sha256 of the tokenizer
state, the tokenized dataset's fingerprint and size, kind, K, temperature, the value
encoding, and per shard its file, examples, rows, bytes and sha256. A shard is written to a
temporary name, fsynced and renamed, and only then entered into the manifest (rewritten
atomically), so the manifest never lists a partial shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text, fsync_dir
from ..errors import PotstillError

FORMAT = "potstill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
LOGP_MIN = {8: -20.0, 16: -40.0}
# Manifest fields that must agree for a capture to continue into an existing folder.
HEADER_KEYS = ("format", "version", "teacher", "tokenizer_sha256", "dataset", "kind", "k", "temperature",
               "encoding", "examples_per_shard", "seed")


class CacheError(PotstillError):
    """A teacher cache is missing, incomplete, corrupt, or belongs to another run."""


# ----------------------------------------------------------------------------------------
# Encoding


def id_bits(vocab_size: int) -> int:
    """Bits per token id: ceil(log2 V), at least 1."""
    return max(1, int(vocab_size - 1).bit_length())


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """(R, K) non-negative ints < 2**bits -> uint8 (R, ceil(K * bits / 8))."""
    ids = np.asarray(ids)
    rows, k = ids.shape
    as_bytes = ids.astype(">u4").reshape(rows, k, 1).view(np.uint8)          # (R, K, 4) big-endian
    bit_array = np.unpackbits(as_bytes, axis=-1)[..., 32 - bits:]             # (R, K, bits)
    return np.packbits(bit_array.reshape(rows, k * bits), axis=-1)


def unpack_ids(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: uint8 (R, B) -> int64 (R, K)."""
    rows = packed.shape[0]
    bit_array = np.unpackbits(np.asarray(packed), axis=-1)[:, : k * bits].reshape(rows, k, bits)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return bit_array.astype(np.int64) @ weights


def quantize_logp(logp: np.ndarray, value_bits: int) -> np.ndarray:
    """Log-probabilities (<= 0, -inf allowed) -> uint8 / uint16 codes on [LOGP_MIN, 0]."""
    lo = LOGP_MIN[value_bits]
    levels = (1 << value_bits) - 1
    x = np.clip(np.nan_to_num(np.asarray(logp, np.float64), neginf=lo), lo, 0.0)
    codes = np.rint((x - lo) / -lo * levels)
    return codes.astype(np.uint8 if value_bits == 8 else np.uint16)


def dequantize_logp(codes: np.ndarray, value_bits: int) -> np.ndarray:
    """Codes -> float32 log-probabilities (max error half a step above LOGP_MIN; code 0 -> -inf)."""
    lo = LOGP_MIN[value_bits]
    x = (lo + codes.astype(np.float32) * (-lo / ((1 << value_bits) - 1))).astype(np.float32)
    x[codes == 0] = -np.inf
    return x


def bytes_per_row(kind: str, k: int, vocab_size: int, value_bits: int) -> float:
    """Payload bytes per cached token, without file headers and offsets."""
    ids = -(-k * id_bits(vocab_size) // 8)
    if kind == "sampled":
        return ids + 2.0
    return ids + (k + 1) * value_bits / 8


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------
# Shards and manifest


def write_shard(folder: Path, index: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write one shard atomically; its manifest entry (file, bytes, sha256) is returned."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    data = buf.getvalue()
    final = folder / shard_name(index)
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(folder)
    return {"file": final.name, "bytes": len(data), "sha256": sha256_bytes(data)}


def read_shard(folder: Path, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """A shard's arrays after checking its size and sha256 against the manifest entry."""
    path = folder / entry["file"]
    if not path.is_file():
        raise CacheError(f"teacher cache {folder}: shard {entry['file']} is missing; capture it again with "
                         "potstill cache-teacher")
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        raise CacheError(f"teacher cache {folder}: shard {entry['file']} is truncated or changed ({len(data)} bytes, "
                         f"the manifest says {entry['bytes']}); delete it and run potstill cache-teacher again")
    if sha256_bytes(data) != entry["sha256"]:
        raise CacheError(f"teacher cache {folder}: shard {entry['file']} fails its checksum (sha256 differs from "
                         "the manifest): it was changed or damaged; delete it and run potstill cache-teacher again")
    try:
        with np.load(io.BytesIO(data)) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:  # checksum matched but the file is not a shard: a bug or a forged manifest
        raise CacheError(f"teacher cache {folder}: shard {entry['file']} cannot be read ({err})") from None


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{folder} is not a teacher cache (no {MANIFEST}): create one with potstill cache-teacher")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CacheError(f"teacher cache {folder}: {MANIFEST} cannot be read ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"teacher cache {folder}: format {manifest.get('format')} v{manifest.get('version')} is not "
                         f"{FORMAT} v{VERSION}: capture it again with this potstill")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=1))


def header_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in HEADER_KEYS if a.get(k) != b.get(k)]


class CacheReader:
    """Per-example access to a complete cache; each shard is verified on first use.

    ``rows(i)`` gives example ``i``'s decoded rows: ``ids`` int64 (R_i, K) and, for top-k,
    ``logp`` float32 (R_i, K) and ``rest`` float32 (R_i,), for sampled ``entropy`` float32 (R_i,).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        if not m.get("complete"):
            raise CacheError(f"teacher cache {self.folder} is incomplete ({len(m.get('shards', []))} of "
                             f"{m.get('n_shards')} shards): finish it by running potstill cache-teacher again")
        self.kind, self.k = m["kind"], int(m["k"])
        self.bits = int(m["encoding"]["id_bits"])
        self.value_bits = int(m["encoding"].get("value_bits", 0))
        self.per_shard = int(m["examples_per_shard"])
        self.n_examples = int(m["dataset"]["n_examples"])
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._shards:
            entry = self.manifest["shards"][s]
            arrays = read_shard(self.folder, entry)
            lo, hi = entry["examples"]
            offsets = arrays.get("offsets")
            if offsets is None or len(offsets) != hi - lo + 1 or int(offsets[-1]) != len(arrays["ids"]):
                raise CacheError(f"teacher cache {self.folder}: shard {entry['file']} is inconsistent (offsets)")
            self._shards[s] = arrays
        return self._shards[s]

    def shard_file(self, i: int) -> str:
        return self.manifest["shards"][i // self.per_shard]["file"]

    def rows(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.n_examples:
            raise CacheError(f"teacher cache {self.folder}: example {i} is outside its {self.n_examples} examples")
        arrays = self._shard(i // self.per_shard)
        j = i % self.per_shard
        a, b = int(arrays["offsets"][j]), int(arrays["offsets"][j + 1])
        out = {"ids": unpack_ids(arrays["ids"][a:b], self.k, self.bits)}
        if self.kind == "topk":
            out["logp"] = dequantize_logp(arrays["logp"][a:b], self.value_bits)
            out["rest"] = dequantize_logp(arrays["rest"][a:b], self.value_bits)
        else:
            out["entropy"] = arrays["entropy"][a:b].astype(np.float32)
        return out
