"""Feature distillation terms: hidden states and attention relations, added to the objective.

Built once per run from ``loss.hidden`` / ``loss.attention`` and the two models:

    features = FeatureDistiller.build(cfg.loss, teacher, student, seed=...)   # None if both weights are 0
    if features.needs_fit:                                 # loss.hidden.preprocess standardize / whitening
        features.fit(teacher, first_train_batches, autocast=..., progress=...)
    with capture_teacher(features, teacher) as t:   teacher forward
    with capture_student(features, student) as s:  student forward
    features.terms(s, t, labels, attention_mask)   # {'hidden': sum, 'attention': sum}: the objective weighs
                                                   # them (training/objective.py); logged as loss/hidden, loss/attention

Each term is the mean over its layer pairs of a per-token loss summed over the tokens that
count (those whose next-token label is not -100: the same tokens as the logit term), so the
objective's single normalization by the step's valid tokens applies to it unchanged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..config import LossConfig
from ..errors import ConfigError, ModelError, RunDirError
from ..losses.features import FITTED, attention_relation_loss, hidden_loss
from .hooks import Captured, capture, model_name, num_decoder_layers, projection_widths
from .layer_map import map_layers
from .preprocess import CHECKPOINT_NAME as STATS_CHECKPOINT_NAME, FeatureStats, fit_feature_stats
from .projectors import Projectors

CHECKPOINT_NAME = "projectors"   # <checkpoint>/projectors.pt (optimizer state sits in optimizer.pt)
RUN_DIR_NAME = "projectors"      # <run>/projectors/ beside <run>/student/


def hidden_width(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def feature_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose output predicts a label that counts (one shift, one mask)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def fit_mask(batch) -> torch.Tensor:
    """(B, T) bool: the tokens the teacher's statistics are fitted on: those the hidden term
    counts (:func:`feature_mask`), never padding."""
    mask = feature_mask(batch["labels"])
    attention_mask = batch.get("attention_mask")
    return mask if attention_mask is None else mask & attention_mask.bool()


class FeatureDistiller:
    """Layer pairs, projectors and the two feature terms of one run."""

    def __init__(self, cfg: LossConfig, teacher: nn.Module, student: nn.Module, *, seed: int = 0):
        self.cfg = cfg
        n_t, n_s = num_decoder_layers(teacher), num_decoder_layers(student)
        self.hidden_pairs = self._pairs("hidden", n_t, n_s) if cfg.hidden.weight > 0 else []
        self.attention_pairs = self._pairs("attention", n_t, n_s) if cfg.attention.weight > 0 else []
        hc = cfg.hidden
        try:
            self.projectors = Projectors(self.hidden_pairs, hidden_width(student), hidden_width(teacher),
                                         kind=hc.projector, orthogonal=hc.projector_init == "orthogonal", seed=seed)
        except ValueError as err:
            raise ConfigError(f"loss.hidden.projector: {err}") from None
        # standardize / whitening: the teacher's statistics, fitted by fit() before training
        self.preprocess = hc.preprocess
        self.stats: FeatureStats | None = None
        self._device = torch.device("cpu")
        self.relation_heads = cfg.attention.relation_heads or int(student.config.get_text_config().num_attention_heads)
        self._check_relation_heads(teacher, student)

    @classmethod
    def build(cls, cfg: LossConfig, teacher: nn.Module | None, student: nn.Module, *, seed: int = 0):
        if not cfg.uses_features:
            return None
        if teacher is None:
            raise ModelError("feature distillation (loss.hidden / loss.attention) needs the teacher model")
        return cls(cfg, teacher, student, seed=seed)

    def _pairs(self, section: str, n_t: int, n_s: int):
        c = getattr(self.cfg, section)
        try:
            return map_layers(c.mapping, n_t, n_s, k=c.k, pairs=c.pairs)
        except ValueError as err:
            raise ConfigError(f"loss.{section}.mapping={c.mapping}: {err}") from None

    def _check_relation_heads(self, teacher: nn.Module, student: nn.Module) -> None:
        r = self.relation_heads
        for t, s in self.attention_pairs:
            for who, model, layer in (("teacher", teacher, t), ("student", student, s)):
                widths = projection_widths(model, layer)
                if any(w % r for w in widths):
                    raise ConfigError(
                        f"loss.attention.relation_heads={r} does not divide the q/k/v widths {list(widths)} of "
                        f"{who} layer {layer} ({model_name(model)}); set loss.attention.relation_heads to a "
                        "common divisor of the teacher's and the student's widths")

    # -- the teacher's statistics (loss.hidden.preprocess) -----------------------------------
    @property
    def needs_fit(self) -> bool:
        return bool(self.hidden_pairs) and self.preprocess in FITTED

    def fit(self, teacher: nn.Module, batches, *, autocast=contextlib.nullcontext, progress: bool = False,
            accelerator=None) -> None:
        """Fit the teacher's statistics on ``batches`` (the first ``loss.hidden.fit_batches`` train
        batches, the same on every process) with the teacher placed for training. Under several
        processes the main process's statistics are broadcast, so every process holds the same bits."""
        if not self.needs_fit:
            return
        layers = [t for t, _ in self.hidden_pairs]
        stats = fit_feature_stats(teacher, batches, layers, fit_mask, kind=self.preprocess, autocast=autocast,
                                  progress=progress)
        device = self.projectors_device()
        stats.to(device)
        if accelerator is not None and accelerator.num_processes > 1:
            import torch.distributed as dist

            for buffer in stats.buffers():
                dist.broadcast(buffer, src=0)
        self.stats = stats
        self.projectors.companions = [stats]  # written beside them in <run>/projectors/

    def projectors_device(self) -> torch.device:
        p = next(self.projectors.parameters(), None)
        return p.device if p is not None else self._device

    # -- capture --------------------------------------------------------------------------
    @property
    def student_layers(self) -> tuple[list[int], list[int]]:
        return [s for _, s in self.hidden_pairs], [s for _, s in self.attention_pairs]

    @property
    def teacher_layers(self) -> tuple[list[int], list[int]]:
        return [t for t, _ in self.hidden_pairs], [t for t, _ in self.attention_pairs]

    # -- the terms ------------------------------------------------------------------------
    def terms(self, student: Captured, teacher: Captured, labels: torch.Tensor,
              attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Unweighted sums over the micro-batch's valid tokens: {'hidden': ..., 'attention': ...}."""
        mask = feature_mask(labels)
        out = {}
        if self.hidden_pairs:
            hc = self.cfg.hidden
            if self.needs_fit and self.stats is None:
                raise RuntimeError(f"loss.hidden.preprocess={self.preprocess}: FeatureDistiller.fit was not called")
            total = sum(hidden_loss(hc.loss, self.projectors((t, s), student.hidden[s]), teacher.hidden[t], mask,
                                    preprocess=self.preprocess,
                                    stats=self.stats.layer(t) if self.stats is not None else None)[0]
                        for t, s in self.hidden_pairs)
            out["hidden"] = total / len(self.hidden_pairs)
        if self.attention_pairs:
            total = sum(attention_relation_loss(student.qkv[s], teacher.qkv[t], mask, heads=self.relation_heads,
                                                key_mask=attention_mask)[0] for t, s in self.attention_pairs)
            out["attention"] = total / len(self.attention_pairs)
        return out

    # -- training state -------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return list(self.projectors.parameters())

    def to(self, device) -> "FeatureDistiller":
        self.projectors.to(device)
        self._device = torch.device(device)
        if self.stats is not None:
            self.stats.to(device)
        return self

    def sync_gradients(self, accelerator) -> None:
        """Average projector gradients over processes (they are outside the DDP-wrapped student)."""
        params = self.parameters()
        if accelerator.num_processes == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """For :func:`potstill.training.checkpoint.write_main_state` (``extra_modules``)."""
        modules = {CHECKPOINT_NAME: self.projectors} if self.hidden_pairs else {}
        if self.stats is not None:
            modules[STATS_CHECKPOINT_NAME] = self.stats
        return modules

    def load_checkpoint(self, ckpt: Path) -> None:
        self._load_stats(Path(ckpt))
        path = Path(ckpt) / f"{CHECKPOINT_NAME}.pt"
        if not path.is_file():
            if not self.parameters():
                return
            raise RunDirError(f"checkpoint {ckpt} has no {path.name}: it was written without these feature "
                              "projectors (loss.hidden changed?); resume with the same loss config")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.projectors.load_state_dict(state)
        except RuntimeError as err:
            raise RunDirError(f"checkpoint {ckpt}: its projectors do not match loss.hidden "
                              f"({str(err).splitlines()[0]}); resume with the same loss config") from None

    def _load_stats(self, ckpt: Path) -> None:
        """The statistics the first session fitted replace this session's fit (the same data give
        the same values; a checkpoint keeps them whatever happens to the data)."""
        if self.stats is None:
            return
        path = ckpt / f"{STATS_CHECKPOINT_NAME}.pt"
        if not path.is_file():
            raise RunDirError(f"checkpoint {ckpt} has no {path.name}: it was written without the teacher's statistics "
                              f"of loss.hidden.preprocess={self.preprocess}; resume with the same loss config")
        try:
            self.stats.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except RuntimeError as err:
            raise RunDirError(f"checkpoint {ckpt}: its {path.name} does not match loss.hidden "
                              f"({str(err).splitlines()[0]}); resume with the same loss config") from None


def capture_student(features: FeatureDistiller | None, raw_student: nn.Module):
    """Hooks on the student's mapped layers around one forward (a null context without features)."""
    if features is None:
        return contextlib.nullcontext()
    hidden, attention = features.student_layers
    return capture(raw_student, hidden, attention)


def capture_teacher(features: FeatureDistiller | None, teacher: nn.Module):
    if features is None:
        return contextlib.nullcontext()
    hidden, attention = features.teacher_layers
    return capture(teacher, hidden, attention)
