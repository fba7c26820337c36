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

A cache may have been damaged since (a full disk, a copy cut short, a hand edit). Whatever
reads it (training with ``teacher.cache``, or a capture continuing) checks the manifest's
structure (:func:`check_manifest`) and each shard's size, checksum and arrays
(:func:`read_shard`, :func:`check_shard`) first, and reports a problem as one
:class:`CacheError` naming the file, never as a traceback from json, zipfile or numpy.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_text
from ..ownership import read_json_object
from ..errors import PotstillError, one_line

FORMAT = "potstill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
LOGP_MIN = {8: -20.0, 16: -40.0}
# What to do about a damaged cache, said the same way everywhere.
RECAPTURE = "capture the cache again (potstill cache-teacher with cache.overwrite=true)"
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
    """Write one shard atomically; its manifest entry (file, bytes, sha256) is returned.

    On any failure (a full disk, an interrupt) the temporary file is removed, so the folder
    holds complete shards only and a capture continues after the last one the manifest lists."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    data = buf.getvalue()
    final = folder / shard_name(index)
    atomic_write_bytes(final, data)
    return {"file": final.name, "bytes": len(data), "sha256": sha256_bytes(data)}


def read_shard(folder: Path, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """A shard's arrays after checking its size and sha256 against the manifest entry.

    ``entry`` comes from a manifest that passed :func:`check_manifest` (its file name is a shard name)."""
    path = folder / entry["file"]
    where = f"teacher cache {folder}: shard {entry['file']}"
    if not path.is_file():
        raise CacheError(f"{where} is missing; {RECAPTURE}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CacheError(f"{where} cannot be read ({err.strerror or err}); fix its permissions, or "
                         f"{RECAPTURE}") from None
    if len(data) != entry["bytes"]:
        raise CacheError(f"{where} is truncated or changed ({len(data)} bytes, the manifest says {entry['bytes']}); "
                         f"{RECAPTURE}")
    if sha256_bytes(data) != entry["sha256"]:
        raise CacheError(f"{where} fails its checksum (sha256 differs from the manifest): it was changed or "
                         f"damaged; {RECAPTURE}")
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive of them")
        with loaded as z:
            return {k: z[k] for k in z.files}
    # The checksum matched, so the manifest was written for these bytes: a forged or hand-made entry.
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise CacheError(f"{where} is not a valid .npz archive ({one_line(err)}); {RECAPTURE}") from None


def check_shard(folder: Path, manifest: dict[str, Any], index: int, arrays: dict[str, np.ndarray]) -> None:
    """Raise one line unless a shard's arrays have the shapes and types its manifest entry promises."""
    entry = manifest["shards"][index]
    problem = _shard_problem(manifest, entry, arrays)
    if problem:
        raise CacheError(f"teacher cache {folder}: shard {entry['file']} does not match {MANIFEST} ({problem}); "
                         f"{RECAPTURE}")


def _shard_problem(m: dict[str, Any], entry: dict[str, Any], arrays: dict[str, np.ndarray]) -> str | None:
    lo, hi = entry["examples"]
    rows = entry["rows"]
    width = -(-m["k"] * m["encoding"]["id_bits"] // 8)
    value_dtype = np.uint8 if m["encoding"].get("value_bits") == 8 else np.uint16
    expected = {"offsets": (np.int64, (hi - lo + 1,)), "ids": (np.uint8, (rows, width))}
    if m["kind"] == "topk":
        expected.update(logp=(value_dtype, (rows, m["k"])), rest=(value_dtype, (rows,)))
    else:
        expected.update(entropy=(np.float16, (rows,)))
    if m.get("offsets"):  # a cross-tokenizer cache: each row's predicted token and its character span
        expected.update(token=(np.int32, (rows,)), spans=(np.int32, (rows, 4)))
    for name, (dtype, shape) in expected.items():
        if name not in arrays:
            return f"no {name!r} array"
        got = arrays[name]
        if got.dtype != dtype or got.shape != shape:
            return f"{name!r} is {got.dtype} {tuple(got.shape)}, expected {np.dtype(dtype)} {shape}"
    offsets = arrays["offsets"]
    if offsets[0] != 0 or offsets[-1] != rows or np.any(np.diff(offsets) < 0):
        return f"'offsets' do not run from 0 up to its {rows} rows"
    return None


def verify_shards(folder: Path, manifest: dict[str, Any]) -> None:
    """Read back every shard a manifest lists (size, checksum, arrays): before a capture builds on them."""
    for index, entry in enumerate(manifest["shards"]):
        check_shard(folder, manifest, index, read_shard(folder, entry))


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a cache folder, as a dict of this format and version (its structure is checked
    separately by :func:`check_manifest`, so an incomplete cache can still be reported as such)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{folder} is not a teacher cache (no {MANIFEST}): create one with potstill cache-teacher")
    where = f"teacher cache {folder}: {MANIFEST}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CacheError(f"{where} cannot be read ({err.strerror or err}); fix its permissions") from None
    except ValueError as err:  # not UTF-8
        raise CacheError(f"{where} is not text ({one_line(err)}): it was damaged; {RECAPTURE}") from None
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise CacheError(f"{where} is not valid JSON ({one_line(err)}): it was damaged; {RECAPTURE}") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{where} holds a JSON {_type_name(manifest)}, not an object: it was damaged; {RECAPTURE}")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"teacher cache {folder}: format {manifest.get('format')} v{manifest.get('version')} is not "
                         f"{FORMAT} v{VERSION}: capture it again with this potstill")
    return manifest


def check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise one line naming the manifest and the key unless its structure is one this module wrote:
    every key present with its type, and a shard list that agrees with the dataset size and shard size."""
    problem = _manifest_problem(manifest)
    if problem:
        raise CacheError(f"teacher cache {folder}: {MANIFEST} is damaged ({problem}); {RECAPTURE}")


def is_cache_manifest(folder: Path) -> bool:
    """True when ``folder`` holds a manifest that says it is a potstill teacher cache (any version):
    the mark of a cache written before caches carried potstill's ownership mark."""
    return (read_json_object(Path(folder) / MANIFEST) or {}).get("format") == FORMAT


# Key -> type of the manifest's fields (dotted for nested ones); a float field accepts an int.
_FIELDS: dict[str, type] = {
    "teacher": dict, "teacher.name": str, "teacher.vocab_size": int, "tokenizer_sha256": str,
    "dataset": dict, "dataset.fingerprint": str, "dataset.n_examples": int, "kind": str, "k": int,
    "temperature": float, "encoding": dict, "encoding.id_bits": int, "examples_per_shard": int, "n_shards": int,
    "shards": list, "complete": bool,
}
_SHARD_FIELDS: dict[str, type] = {"file": str, "bytes": int, "sha256": str, "examples": list, "rows": int}


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's structure, in a few words, or None."""
    for key, kind in _FIELDS.items():
        problem = _field_problem(m, key, kind)
        if problem:
            return problem
    if m["kind"] not in ("topk", "sampled"):
        return f"kind is {m['kind']!r}, not 'topk' or 'sampled'"
    vocab, n, per_shard = m["teacher"]["vocab_size"], m["dataset"]["n_examples"], m["examples_per_shard"]
    bits = m["encoding"]["id_bits"]
    if vocab < 1 or n < 0 or per_shard < 1 or m["k"] < 1 or not m["temperature"] > 0:
        return "teacher.vocab_size, k, examples_per_shard and temperature must be positive, dataset.n_examples >= 0"
    if bits != id_bits(vocab):
        return f"encoding.id_bits is {bits}, but {vocab} ids take {id_bits(vocab)} bits"
    if m["kind"] == "topk" and m["encoding"].get("value_bits") not in LOGP_MIN:
        return f"encoding.value_bits is {m['encoding'].get('value_bits')!r}, not 8 or 16"
    if m["n_shards"] != -(-n // per_shard):
        return f"n_shards is {m['n_shards']}, but {n} examples at {per_shard} per shard make {-(-n // per_shard)}"
    shards = m["shards"]
    if len(shards) > m["n_shards"] or (m["complete"] and len(shards) != m["n_shards"]):
        state = "a complete" if m["complete"] else "an incomplete"
        return f"{state} cache of {m['n_shards']} shards lists {len(shards)}"
    for index, entry in enumerate(shards):
        problem = _entry_problem(index, entry, n, per_shard)
        if problem:
            return problem
    if "bytes_per_token" in m and _field_problem(m, "bytes_per_token", float):
        return _field_problem(m, "bytes_per_token", float)
    return None


def _entry_problem(index: int, entry: Any, n: int, per_shard: int) -> str | None:
    where = f"shards[{index}]"
    if not isinstance(entry, dict):
        return f"{where} is a JSON {_type_name(entry)}, not an object"
    for key, kind in _SHARD_FIELDS.items():
        problem = _field_problem(entry, key, kind, prefix=f"{where}.")
        if problem:
            return problem
    if entry["file"] != shard_name(index):
        return f"{where}.file is {entry['file']!r}, not {shard_name(index)!r}"
    if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        return f"{where}.sha256 is not a sha256 hex digest"
    span = [index * per_shard, min((index + 1) * per_shard, n)]
    if entry["examples"] != span:
        return f"{where}.examples is {entry['examples']}, not {span}"
    if entry["bytes"] < 0 or entry["rows"] < 0:
        return f"{where}.bytes and .rows must not be negative"
    return None


def _field_problem(m: dict[str, Any], key: str, kind: type, *, prefix: str = "") -> str | None:
    value: Any = m
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return f"{prefix}{key} is missing"
        value = value[part]
    if not _is(value, kind):
        return f"{prefix}{key} is a JSON {_type_name(value)}, not {_JSON_NAMES[kind]}"
    return None


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false"}


def _is(value: Any, kind: type) -> bool:
    """JSON typing: bool is not a number, an integer is a number."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, name in ((dict, "object"), (list, "list"), (str, "string"), (int, "integer"), (float, "number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=1))


def header_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in HEADER_KEYS if a.get(k) != b.get(k)]


# Names of what a capture writes into its folder: the manifest, shards, and their temporaries.
_WRITTEN = re.compile(r"(manifest\.json|shard-\d{5,}\.npz|\.(manifest\.json|shard-\d{5,}\.npz)\.tmp-\d+)")


def written_files(folder: Path) -> list[Path]:
    """The files in ``folder`` that a capture writes (never folders, never other names): what
    ``cache.overwrite`` may delete. The manifest comes first, so a folder cut short while being
    cleared no longer claims shards that are gone."""
    found = [p for p in Path(folder).iterdir() if _WRITTEN.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    return sorted(found, key=lambda p: (p.name != MANIFEST, p.name))


class CacheReader:
    """Per-example access to a complete cache; each shard is verified on first use.

    ``rows(i)`` gives example ``i``'s decoded rows: ``ids`` int64 (R_i, K) and, for top-k,
    ``logp`` float32 (R_i, K) and ``rest`` float32 (R_i,), for sampled ``entropy`` float32 (R_i,).
    A cache captured with offsets (cross-tokenizer) also gives ``token`` (R_i,) the teacher token
    each row predicts and ``spans`` (R_i, 4) its canonical character span.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        if m.get("complete") is False:  # the common case first: a capture that was stopped
            listed = len(m["shards"]) if isinstance(m.get("shards"), list) else "?"
            raise CacheError(f"teacher cache {self.folder} is incomplete ({listed} of "
                             f"{m.get('n_shards')} shards): finish it by running potstill cache-teacher again")
        check_manifest(self.folder, m)
        self.kind, self.k = m["kind"], int(m["k"])
        self.bits = int(m["encoding"]["id_bits"])
        self.value_bits = int(m["encoding"].get("value_bits", 0))
        self.per_shard = int(m["examples_per_shard"])
        self.n_examples = int(m["dataset"]["n_examples"])
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._shards:
            arrays = read_shard(self.folder, self.manifest["shards"][s])
            check_shard(self.folder, self.manifest, s, arrays)
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
        if self.manifest.get("offsets"):
            out["token"] = arrays["token"][a:b].astype(np.int64)
            out["spans"] = arrays["spans"][a:b].astype(np.int64)
        return out
