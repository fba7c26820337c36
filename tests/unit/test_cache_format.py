"""Teacher-cache encoding: id bit-packing, log-prob quantization, shard checksums."""

from __future__ import annotations

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
