"""Teacher-cache encoding: id bit-packing, log-prob quantization, shard checksums."""

from __future__ import annotations

import errno
import io
import os

import numpy as np
import pytest

from potstill.teachers import cache_format as fmt
from potstill.teachers.cache_format import CacheError


@pytest.mark.parametrize("vocab", [2, 3, 383, 384, 8192, 50257, 151936])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_ids_round_trip_in_the_fewest_bits(vocab, k):
    rng = np.random.default_rng(vocab + k)
    ids = rng.integers(0, vocab, size=(37, k))
    ids[0] = vocab - 1  # the largest id must fit
    bits = fmt.id_bits(vocab)
    assert 2 ** bits >= vocab > 2 ** (bits - 1) or (vocab == 2 and bits == 1)
    packed = fmt.pack_ids(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (37, -(-k * bits // 8))
    np.testing.assert_array_equal(fmt.unpack_ids(packed, k, bits), ids)
    # Rows are byte-aligned: any slice of rows decodes alone.
    np.testing.assert_array_equal(fmt.unpack_ids(packed[5:9], k, bits), ids[5:9])


@pytest.mark.parametrize("value_bits", [8, 16])
def test_logp_quantization_error_is_at_most_half_a_step(value_bits):
    lo = fmt.LOGP_MIN[value_bits]
    step = -lo / (2 ** value_bits - 1)
    x = np.concatenate([np.linspace(lo + step / 2 + 1e-4, 0.0, 10001), [-0.0, 0.0, -1e-9]])
    codes = fmt.quantize_logp(x, value_bits)
    assert codes.dtype == (np.uint8 if value_bits == 8 else np.uint16)
    err = np.abs(fmt.dequantize_logp(codes, value_bits) - x)
    assert err.max() <= step / 2 + 1e-5
    # At or below the floor, and -inf: code 0, read back as probability 0; 0 stays 0.
    below = fmt.dequantize_logp(fmt.quantize_logp(np.array([lo - 5.0, lo, -np.inf, 0.0]), value_bits), value_bits)
    np.testing.assert_array_equal(below, [-np.inf, -np.inf, -np.inf, 0.0])
    # Relative error of the probabilities: within exp(step / 2) - 1 (about 4% at 8 bits, 0.03% at 16).
    p, q = np.exp(x), np.exp(fmt.dequantize_logp(codes, value_bits))
    assert np.max(np.abs(q / p - 1)) <= np.expm1(step / 2) + 1e-4


def test_bytes_per_row():
    assert fmt.bytes_per_row("topk", 12, 8192, 8) == 20 + 13  # 12 x 13 bits -> 20 bytes, 12 values + rest
    assert fmt.bytes_per_row("topk", 12, 8192, 16) == 20 + 26
    assert fmt.bytes_per_row("sampled", 32, 8192, 8) == 52 + 2  # 32 x 13 bits, float16 entropy


def _entry(tmp_path):
    arrays = {"offsets": np.array([0, 2, 3], np.int64), "ids": np.arange(6, dtype=np.uint8).reshape(3, 2)}
    return arrays, fmt.write_shard(tmp_path, 0, arrays)


def test_shard_round_trip_and_checks_name_the_shard(tmp_path):
    arrays, entry = _entry(tmp_path)
    assert entry["file"] == "shard-00000.npz" and entry["bytes"] == (tmp_path / entry["file"]).stat().st_size
    back = fmt.read_shard(tmp_path, entry)
    np.testing.assert_array_equal(back["ids"], arrays["ids"])
    path = tmp_path / entry["file"]
    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF  # same length, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard shard-00000\.npz fails its checksum"):
        fmt.read_shard(tmp_path, entry)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheError, match=r"shard shard-00000\.npz is truncated"):
        fmt.read_shard(tmp_path, entry)
    path.unlink()
    with pytest.raises(CacheError, match=r"shard shard-00000\.npz is missing"):
        fmt.read_shard(tmp_path, entry)


def test_manifest_errors(tmp_path):
    with pytest.raises(CacheError, match="is not a teacher cache"):
        fmt.read_manifest(tmp_path)
    fmt.write_manifest(tmp_path, {"format": "something-else", "version": 1})
    with pytest.raises(CacheError, match="is not potstill-teacher-cache"):
        fmt.read_manifest(tmp_path)
    fmt.write_manifest(tmp_path, {"format": fmt.FORMAT, "version": fmt.VERSION, "complete": False, "shards": [{}],
                                  "n_shards": 3})
    with pytest.raises(CacheError, match=r"incomplete \(1 of 3 shards\)"):
        fmt.CacheReader(tmp_path)


# ----------------------------------------------------------------------------------------
# Damaged caches: one CacheError line that names the file, never a json / zipfile / numpy traceback


def _small_cache(folder, *, n=3, per_shard=2, vocab=10, k=2):
    """A complete top-k cache of ``n`` examples (1 + i rows each) written by the real shard writer."""
    manifest = {"format": fmt.FORMAT, "version": fmt.VERSION, "teacher": {"name": "t", "vocab_size": vocab},
                "tokenizer_sha256": "0" * 64, "dataset": {"fingerprint": "f" * 16, "n_examples": n},
                "kind": "topk", "k": k, "temperature": 1.0,
                "encoding": {"id_bits": fmt.id_bits(vocab), "value_bits": 8}, "examples_per_shard": per_shard,
                "seed": None, "n_shards": -(-n // per_shard), "shards": [], "complete": True, "bytes_per_token": 3.0}
    rng = np.random.default_rng(0)
    for s in range(manifest["n_shards"]):
        lo, hi = s * per_shard, min((s + 1) * per_shard, n)
        counts = [1 + i for i in range(lo, hi)]
        rows = sum(counts)
        arrays = {"ids": fmt.pack_ids(rng.integers(0, vocab, (rows, k)), fmt.id_bits(vocab)),
                  "logp": fmt.quantize_logp(-rng.random((rows, k)), 8), "rest": fmt.quantize_logp(-rng.random(rows), 8),
                  "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}
        entry = fmt.write_shard(folder, s, arrays)
        manifest["shards"].append({**entry, "examples": [lo, hi], "rows": rows})
    fmt.write_manifest(folder, manifest)
    return manifest


def _read_all(folder):
    reader = fmt.CacheReader(folder)
    return [reader.rows(i) for i in range(reader.n_examples)]


def _one_line_cache_error(folder, *fragments):
    with pytest.raises(CacheError) as info:
        _read_all(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_small_cache_reads_back(tmp_path):
    _small_cache(tmp_path)
    assert [len(r["ids"]) for r in _read_all(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("text, says", [
    ("{\"format\": \"potstill-teacher-cache\", ", "manifest.json is not valid JSON"),
    ("\xff\xfe not text", "manifest.json is not text"),
    ("[1, 2, 3]", "manifest.json holds a JSON list, not an object"),
    ("\"potstill-teacher-cache\"", "manifest.json holds a JSON string, not an object"),
])
def test_manifest_that_is_not_a_json_object_is_named(tmp_path, text, says):
    _small_cache(tmp_path)
    (tmp_path / "manifest.json").write_text(text, encoding="latin-1")
    _one_line_cache_error(tmp_path, says, "cache.overwrite=true")


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.pop("kind"), "(kind is missing)"),
    (lambda m: m["dataset"].pop("fingerprint"), "(dataset.fingerprint is missing)"),
    (lambda m: m.update(teacher="t"), "(teacher is a JSON string, not an object)"),
    (lambda m: m.update(k="2"), "(k is a JSON string, not an integer)"),
    (lambda m: m.update(complete="yes"), "(complete is a JSON string, not true or false)"),
    (lambda m: m["encoding"].update(id_bits=True), "(encoding.id_bits is a JSON boolean, not an integer)"),
    (lambda m: m.update(kind="dense"), "kind is 'dense'"),
    (lambda m: m["encoding"].update(id_bits=9), "encoding.id_bits is 9, but 10 ids take 4 bits"),
    (lambda m: m.update(n_shards=5), "n_shards is 5, but 3 examples at 2 per shard make 2"),
    (lambda m: m["shards"].pop(), "a complete cache of 2 shards lists 1"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), "a complete cache of 2 shards lists 3"),
    (lambda m: m["shards"].reverse(), "shards[0].file is 'shard-00001.npz', not 'shard-00000.npz'"),
    (lambda m: m["shards"][1].update(file="../../elsewhere.npz"), "shards[1].file is '../../elsewhere.npz'"),
    (lambda m: m["shards"][1].update(examples=[2, 4]), "shards[1].examples is [2, 4], not [2, 3]"),
    (lambda m: m["shards"][0].pop("sha256"), "shards[0].sha256 is missing"),
    (lambda m: m["shards"][0].update(sha256="abc"), "shards[0].sha256 is not a sha256 hex digest"),
    (lambda m: m["shards"].__setitem__(0, "shard-00000.npz"), "shards[0] is a JSON string, not an object"),
    (lambda m: m.update(bytes_per_token="many"), "bytes_per_token is a JSON string, not a number"),
])
def test_manifest_with_missing_keys_wrong_types_or_an_inconsistent_shard_list_is_named(tmp_path, edit, says):
    manifest = _small_cache(tmp_path)
    edit(manifest)
    fmt.write_manifest(tmp_path, manifest)
    _one_line_cache_error(tmp_path, "manifest.json is damaged", says)


def _replace_shard(folder, manifest, index, data: bytes):
    """Put other bytes in a shard and make the manifest agree (size and checksum): only the content is wrong."""
    (folder / fmt.shard_name(index)).write_bytes(data)
    manifest["shards"][index].update(bytes=len(data), sha256=fmt.sha256_bytes(data))
    fmt.write_manifest(folder, manifest)


@pytest.mark.parametrize("content", ["garbage", "zip-like", "npy", "cut-npz"])
def test_shard_that_is_not_an_npz_archive_is_named(tmp_path, content):
    manifest = _small_cache(tmp_path)
    good = (tmp_path / "shard-00001.npz").read_bytes()
    npy = io.BytesIO()
    np.save(npy, np.zeros(3))
    data = {"garbage": b"not a shard at all", "zip-like": b"PK\x03\x04" + b"\x00" * 40, "npy": npy.getvalue(),
            "cut-npz": good[: len(good) // 2]}[content]
    _replace_shard(tmp_path, manifest, 1, data)
    _one_line_cache_error(tmp_path, "shard shard-00001.npz is not a valid .npz archive", "cache.overwrite=true")


@pytest.mark.parametrize("change, says", [
    (lambda a: a.pop("rest"), "no 'rest' array"),
    (lambda a: a.update(logp=a["logp"].astype(np.uint16)), "'logp' is uint16 (3, 2), expected uint8 (3, 2)"),
    (lambda a: a.update(ids=a["ids"][:, :0]), "'ids' is uint8 (3, 0), expected uint8 (3, 1)"),
    (lambda a: a.update(offsets=np.array([0, 2, 1], np.int64)), "'offsets' do not run from 0 up to its 3 rows"),
    (lambda a: a.update(offsets=np.array([0, 1, 2], np.int64)), "'offsets' do not run from 0 up to its 3 rows"),
])
def test_shard_arrays_that_do_not_match_the_manifest_are_named(tmp_path, change, says):
    manifest = _small_cache(tmp_path)
    with np.load(tmp_path / "shard-00000.npz") as z:  # shard 0: example 0 (1 row), example 1 (2 rows)
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _replace_shard(tmp_path, manifest, 0, buf.getvalue())
    _one_line_cache_error(tmp_path, "shard shard-00000.npz does not match manifest.json", says)


def test_failed_shard_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while a shard is written: the error goes up, and only complete shards stay."""
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    arrays = {"offsets": np.array([0, 1], np.int64), "ids": np.zeros((1, 1), np.uint8)}
    fmt.write_shard(tmp_path, 0, arrays)
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fmt.write_shard(tmp_path, 1, arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.npz"]


def test_written_files_are_only_what_a_capture_writes(tmp_path):
    _small_cache(tmp_path)
    for name in ("notes.txt", "shard-1.npz", "my-manifest.json", ".shard-00004.npz.tmp-12x"):
        (tmp_path / name).write_text("mine")
    (tmp_path / "shard-00009.npz").mkdir()
    (tmp_path / "shard-00007.npz").symlink_to(tmp_path / "notes.txt")
    (tmp_path / ".shard-00002.npz.tmp-4242").write_bytes(b"half")
    (tmp_path / ".manifest.json.tmp-4242").write_text("{")
    names = [p.name for p in fmt.written_files(tmp_path)]
    assert names == ["manifest.json", ".manifest.json.tmp-4242", ".shard-00002.npz.tmp-4242",
                     "shard-00000.npz", "shard-00001.npz"]
