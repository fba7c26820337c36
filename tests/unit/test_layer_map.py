"""Layer mappings: pure functions of (teacher depth, student depth), on odd and uneven counts."""

from __future__ import annotations

import pytest

from potstill.features.layer_map import MAPPINGS, map_layers

DEPTHS = [(28, 9), (7, 3), (6, 4), (9, 9), (5, 1), (3, 5)]


def _valid(pairs, n_t, n_s):
    assert pairs == sorted(set(pairs), key=lambda p: (p[1], p[0]))
    assert all(1 <= t <= n_t and 1 <= s <= n_s for t, s in pairs)


def test_last():
    assert map_layers("last", 28, 9) == [(28, 9)]
    assert map_layers("last", 7, 3) == [(7, 3)]


def test_last_k():
    assert map_layers("last_k", 28, 9, k=3) == [(26, 7), (27, 8), (28, 9)]
    assert map_layers("last_k", 7, 3, k=3) == [(5, 1), (6, 2), (7, 3)]
    assert map_layers("last_k", 6, 4, k=1) == map_layers("last", 6, 4)
    with pytest.raises(ValueError, match=r"k <= min.*= 3 \(got k=4\)"):
        map_layers("last_k", 7, 3, k=4)
    with pytest.raises(ValueError, match="needs k"):
        map_layers("last_k", 7, 3)


def test_all_needs_equal_depth():
    assert map_layers("all", 9, 9) == [(i, i) for i in range(1, 10)]
    with pytest.raises(ValueError, match="equal depths, but the teacher has 28 layers and the student 9"):
        map_layers("all", 28, 9)


def test_uniform():
    assert map_layers("uniform", 28, 9) == [(4, 1), (7, 2), (10, 3), (13, 4), (16, 5), (19, 6), (22, 7), (25, 8), (28, 9)]
    assert map_layers("uniform", 7, 3) == [(3, 1), (5, 2), (7, 3)]
    assert map_layers("uniform", 6, 4) == [(2, 1), (3, 2), (5, 3), (6, 4)]
    assert map_layers("uniform", 12, 4) == [(3, 1), (6, 2), (9, 3), (12, 4)]  # TinyBERT's g(m) = 3m
    assert map_layers("uniform", 9, 9) == map_layers("all", 9, 9)


def test_uniform_consecutive():
    # k = ceil(28 / 9) = 4: student layer i gets teacher layers 4(i-1)+1 .. 4i; blocks past 28 get layer 28.
    pairs = map_layers("uniform_consecutive", 28, 9)
    by_student = {s: [t for t, s2 in pairs if s2 == s] for s in range(1, 10)}
    for i in range(1, 8):
        assert by_student[i] == list(range(4 * (i - 1) + 1, 4 * i + 1))
    assert by_student[8] == by_student[9] == [28]
    assert sorted({t for t, _ in pairs}) == list(range(1, 29))  # every teacher layer teaches
    # k = ceil(7 / 3) = 3
    assert map_layers("uniform_consecutive", 7, 3) == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2), (7, 3)]
    assert map_layers("uniform_consecutive", 6, 4) == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3), (6, 4)]


def test_uniform_last():
    pairs = map_layers("uniform_last", 28, 9)
    uniform = set(map_layers("uniform", 28, 9))
    last = {(28 - 9 + i, i) for i in range(1, 10)}  # the teacher's last 9 layers, in order
    assert set(pairs) == uniform | last
    assert map_layers("uniform_last", 7, 3) == [(3, 1), (5, 1), (5, 2), (6, 2), (7, 3)]
    assert map_layers("uniform_last", 6, 4) == [(2, 1), (3, 1), (3, 2), (4, 2), (5, 3), (6, 4)]


def test_explicit_pairs():
    assert map_layers("pairs", 28, 9, pairs=[[28, 9], [14, 5], [14, 5]]) == [(14, 5), (28, 9)]
    with pytest.raises(ValueError, match=r"pair \[29, 9\] is out of range: teacher layers are 1..28"):
        map_layers("pairs", 28, 9, pairs=[[29, 9]])
    with pytest.raises(ValueError, match="out of range"):
        map_layers("pairs", 28, 9, pairs=[[0, 1]])  # layers count from 1
    with pytest.raises(ValueError, match="at least one"):
        map_layers("pairs", 28, 9, pairs=[])


@pytest.mark.parametrize("n_t,n_s", DEPTHS)
@pytest.mark.parametrize("mapping", [m for m in MAPPINGS if m not in ("all", "pairs", "last_k")])
def test_every_mapping_is_in_range_and_ends_on_the_last_layers(mapping, n_t, n_s):
    pairs = map_layers(mapping, n_t, n_s)
    _valid(pairs, n_t, n_s)
    assert (n_t, n_s) in pairs
    if mapping != "last":
        assert {s for _, s in pairs} == set(range(1, n_s + 1))  # every student layer is taught


def test_unknown_mapping():
    with pytest.raises(ValueError, match="unknown layer mapping 'middle'"):
        map_layers("middle", 4, 2)
