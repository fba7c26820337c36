"""Projectors: student hidden width -> teacher hidden width, one per mapped layer pair.

Trained with the student (their parameters join the optimizer), saved beside it: in each
checkpoint as ``projectors.pt`` and after the run in ``<run>/projectors/`` (safetensors +
``projectors.json``), never inside the exported student, which stays a plain
``transformers`` model. Resume loads them back. ``companions`` (the hidden term's fitted
statistics, :mod:`.preprocess`) are written into the same folder by :meth:`Projectors.save`.

Kinds: ``identity`` (equal widths only), ``linear`` (optionally orthogonally initialized),
``mlp`` (linear -> GELU -> linear, hidden width = the teacher's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

PROJECTORS = ("auto", "identity", "linear", "mlp")
WEIGHTS_FILE = "projectors.safetensors"
SPEC_FILE = "projectors.json"


def pair_key(teacher_layer: int, student_layer: int) -> str:
    return f"t{teacher_layer}_s{student_layer}"


def make_projector(kind: str, student_width: int, teacher_width: int, *, orthogonal: bool) -> nn.Module:
    if kind == "auto":
        kind = "identity" if student_width == teacher_width else "linear"
    if kind == "identity":
        if student_width != teacher_width:
            raise ValueError(f"projector 'identity' needs equal widths, but the student's hidden size is "
                             f"{student_width} and the teacher's {teacher_width}; use linear or mlp")
        return nn.Identity()
    if kind == "linear":
        proj = nn.Linear(student_width, teacher_width, bias=False)
        if orthogonal:
            nn.init.orthogonal_(proj.weight)
        return proj
    if kind == "mlp":
        first, second = nn.Linear(student_width, teacher_width), nn.Linear(teacher_width, teacher_width)
        if orthogonal:
            nn.init.orthogonal_(first.weight)
            nn.init.orthogonal_(second.weight)
        return nn.Sequential(first, nn.GELU(), second)
    raise ValueError(f"unknown projector '{kind}': one of {', '.join(PROJECTORS)}")


class Projectors(nn.Module):
    """``forward(pair, student_hidden (B, T, Hs)) -> (B, T, Ht)`` in float32."""

    def __init__(self, pairs, student_width: int, teacher_width: int, *, kind: str = "auto",
                 orthogonal: bool = False, seed: int = 0):
        super().__init__()
        self.companions: list = []  # other state saved beside them (the hidden term's fitted statistics)
        self.spec = {"kind": kind, "orthogonal": orthogonal, "student_width": student_width,
                     "teacher_width": teacher_width, "pairs": [list(p) for p in pairs]}
        # A private RNG: adding projectors does not change the student's or the data's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.by_pair = nn.ModuleDict({pair_key(t, s): make_projector(kind, student_width, teacher_width,
                                                                         orthogonal=orthogonal)
                                          for t, s in pairs})

    def forward(self, pair: tuple[int, int], student_hidden: torch.Tensor) -> torch.Tensor:
        proj = self.by_pair[pair_key(*pair)]
        weight = next(proj.parameters(), None)
        return proj(student_hidden.to(weight.dtype if weight is not None else torch.float32))

    def save(self, folder: Path) -> None:
        """``projectors.safetensors`` + ``projectors.json`` in ``folder`` (created)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        (folder / SPEC_FILE).write_text(json.dumps(self.spec, indent=2), encoding="utf-8")
        for companion in self.companions:
            companion.save(folder)

    @classmethod
    def load(cls, folder: Path) -> "Projectors":
        """Rebuild saved projectors (e.g. to continue distilling a finished student)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
        proj = cls([tuple(p) for p in spec["pairs"]], spec["student_width"], spec["teacher_width"],
                   kind=spec["kind"], orthogonal=spec["orthogonal"])
        proj.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return proj
