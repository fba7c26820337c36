"""Which teacher layer teaches which student layer: pure functions of the two depths.

Layers are numbered from 1: layer ``i`` is the output of decoder layer ``i`` (before the
model's final norm), what Hugging Face returns as ``hidden_states[i]`` for ``i < L`` (its
``hidden_states[L]`` has the final norm applied on Llama-like models and GPT-2; ours does not).
A mapping returns ``(teacher_layer, student_layer)`` pairs, sorted, without repeats.

Strategies follow "A Comparative Analysis of Task-Agnostic Distillation Methods for
Compressing Transformer Language Models" (arXiv 2310.08797):

1-to-1 (each student layer gets at most one teacher layer)
  ``last``      the last teacher layer -> the last student layer (MiniLM)
  ``last_k``    the last k layers of each, in order: teacher ``L_T-k+j`` -> student ``L_S-k+j``, j = 1..k
  ``all``       teacher layer i -> student layer i; the depths must be equal
  ``uniform``   teacher layer ``ceil(i * L_T / L_S)`` -> student layer i, i = 1..L_S (ends on the last layers)

1-to-N (a student layer gets several teacher layers)
  ``uniform_consecutive``  student layer i gets teacher layers ``k(i-1)+1 .. ki``, k = ceil(L_T / L_S);
                           student layers past the teacher's depth (e.g. 28 -> 9: k = 4 covers 7 student
                           layers) get the last teacher layer, so every student layer has a target
  ``uniform_last``         student layer i gets the uniform teacher layer ``ceil(i * L_T / L_S)`` and
                           the i-th of the teacher's last L_S layers, ``L_T - L_S + i`` (layer i when L_T < L_S)

``pairs``: explicit ``[[teacher_layer, student_layer], ...]`` from the config.
"""

from __future__ import annotations

MAPPINGS = ("last", "last_k", "all", "uniform", "uniform_consecutive", "uniform_last", "pairs")

Pairs = list[tuple[int, int]]


def _check_depths(n_teacher: int, n_student: int) -> None:
    if n_teacher < 1 or n_student < 1:
        raise ValueError(f"layer mapping needs at least one layer on each side (teacher {n_teacher}, student {n_student})")


def _uniform(i: int, n_teacher: int, n_student: int) -> int:
    # Integer ceil(i * L_T / L_S): exact, never 0, and student layer L_S always gets teacher layer L_T.
    return -(-i * n_teacher // n_student)


def _sorted_unique(pairs) -> Pairs:
    return sorted(set((int(t), int(s)) for t, s in pairs), key=lambda p: (p[1], p[0]))


def map_last(n_teacher: int, n_student: int) -> Pairs:
    _check_depths(n_teacher, n_student)
    return [(n_teacher, n_student)]


def map_last_k(n_teacher: int, n_student: int, k: int) -> Pairs:
    _check_depths(n_teacher, n_student)
    if not 1 <= k <= min(n_teacher, n_student):
        raise ValueError(f"last_k needs 1 <= k <= min(teacher layers, student layers) = {min(n_teacher, n_student)} "
                         f"(got k={k})")
    return [(n_teacher - k + j, n_student - k + j) for j in range(1, k + 1)]


def map_all(n_teacher: int, n_student: int) -> Pairs:
    _check_depths(n_teacher, n_student)
    if n_teacher != n_student:
        raise ValueError(f"mapping 'all' pairs layer i with layer i and needs equal depths, but the teacher has "
                         f"{n_teacher} layers and the student {n_student}; use uniform, uniform_last, last_k or pairs")
    return [(i, i) for i in range(1, n_student + 1)]


def map_uniform(n_teacher: int, n_student: int) -> Pairs:
    _check_depths(n_teacher, n_student)
    return _sorted_unique((_uniform(i, n_teacher, n_student), i) for i in range(1, n_student + 1))


def map_uniform_consecutive(n_teacher: int, n_student: int) -> Pairs:
    _check_depths(n_teacher, n_student)
    k = -(-n_teacher // n_student)
    pairs = []
    for i in range(1, n_student + 1):
        block = range(k * (i - 1) + 1, min(k * i, n_teacher) + 1)
        pairs.extend((t, i) for t in block) if len(block) else pairs.append((n_teacher, i))
    return _sorted_unique(pairs)


def map_uniform_last(n_teacher: int, n_student: int) -> Pairs:
    _check_depths(n_teacher, n_student)
    pairs = []
    for i in range(1, n_student + 1):
        pairs.append((_uniform(i, n_teacher, n_student), i))
        pairs.append((max(1, n_teacher - n_student + i) if n_teacher >= n_student else min(i, n_teacher), i))
    return _sorted_unique(pairs)


def check_pairs(pairs, n_teacher: int, n_student: int) -> Pairs:
    """Explicit pairs, checked against the depths (layers count from 1)."""
    _check_depths(n_teacher, n_student)
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"each pair is [teacher_layer, student_layer], got {list(pair)}")
        t, s = int(pair[0]), int(pair[1])
        if not 1 <= t <= n_teacher or not 1 <= s <= n_student:
            raise ValueError(f"pair [{t}, {s}] is out of range: teacher layers are 1..{n_teacher}, "
                             f"student layers 1..{n_student} (layer i = output of decoder layer i)")
        out.append((t, s))
    if not out:
        raise ValueError("mapping 'pairs' needs at least one [teacher_layer, student_layer] pair")
    return _sorted_unique(out)


def map_layers(mapping: str, n_teacher: int, n_student: int, *, k: int | None = None, pairs=None) -> Pairs:
    """(teacher_layer, student_layer) pairs for a named mapping. ValueError says what is wrong."""
    if mapping == "last":
        return map_last(n_teacher, n_student)
    if mapping == "last_k":
        if k is None:
            raise ValueError("mapping 'last_k' needs k")
        return map_last_k(n_teacher, n_student, k)
    if mapping == "all":
        return map_all(n_teacher, n_student)
    if mapping == "uniform":
        return map_uniform(n_teacher, n_student)
    if mapping == "uniform_consecutive":
        return map_uniform_consecutive(n_teacher, n_student)
    if mapping == "uniform_last":
        return map_uniform_last(n_teacher, n_student)
    if mapping == "pairs":
        return check_pairs(pairs or [], n_teacher, n_student)
    raise ValueError(f"unknown layer mapping '{mapping}': one of {', '.join(MAPPINGS)}")
