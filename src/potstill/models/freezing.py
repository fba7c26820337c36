"""Which of the student's parameters train: ``student.freeze``, ``student.train_only``, ``student.spectrum``.

Method. Each setting is a list of regular expressions, matched with :func:`re.search` against the
names of ``model.named_parameters()`` (``model.layers.3.mlp.down_proj.weight``, ``lm_head.weight``):

1. ``student.train_only`` / ``student.spectrum`` (a Spectrum YAML, whose ``unfrozen_parameters:``
   lists the patterns): every parameter that matches none of their patterns is frozen;
2. ``student.freeze``: every parameter that matches one of its patterns is frozen. It runs after
   1, so ``freeze`` wins over ``train_only``;
3. ``requires_grad`` is only ever turned off: a parameter frozen before (by LoRA, by
   ``embeddings_from_teacher.freeze``) stays frozen, whatever the patterns say.

Why: training part of a student costs less optimizer memory and keeps what it already knows
where that is wanted (the embeddings, the first layers). Spectrum (Hartford et al., 2024) picks
the layers with the highest signal-to-noise ratio and writes the YAML that DistillKit and
Axolotl accept; this reads the same file.

``re.search`` versus ``re.match``: DistillKit matches Spectrum's patterns with ``re.match``, i.e.
anchored at the start of the name. An anchored pattern (``^model\\.layers\\.3\\.``) and a pattern
spelling the name from its start (Spectrum's ``model.layers.1.mlp.down_proj``) select the same
parameters under both; only a pattern for the middle of a name (``mlp.down_proj``) selects more
here (every layer's), where ``re.match`` would select nothing.

A pattern that matches no parameter is an error (a typo would otherwise train the wrong set
silently), as is a set of settings that leaves nothing to train. A LoRA student keeps its names
(the adapters are injected in place: :mod:`.lora`), so patterns written for the bare model apply.

Tied weights: a tied output head and input embeddings are one tensor, which
``named_parameters()`` lists once (as ``model.embed_tokens.weight``). Patterns are matched
against all of a tensor's names, so ``lm_head`` still selects it, and freezing ``lm_head`` of a
tied model freezes the input embeddings too; that is said in the log.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from ..errors import ConfigError, one_line

log = logging.getLogger("potstill")

SPECTRUM_KEY = "unfrozen_parameters"


@dataclass
class FrozenReport:
    """What :func:`apply_freezing` left: elements that train and that are frozen (tied tensors
    counted once), and the names of the frozen tensors (``named_parameters()`` names)."""

    trainable: int
    frozen: int
    frozen_names: list[str]

    def describe(self) -> str:
        """E.g. ``training 1.20M of 3.40M parameters (35.3%); 14 tensors frozen``."""
        total = self.trainable + self.frozen
        share = 100.0 * self.trainable / total if total else 0.0
        return (f"training {_count(self.trainable)} of {_count(total)} parameters ({share:.1f}%); "
                f"{len(self.frozen_names)} tensors frozen")


@dataclass(frozen=True)
class _Rule:
    setting: str  # the config setting the pattern comes from, for messages
    pattern: str
    regex: re.Pattern


def read_spectrum(path: str | Path) -> list[str]:
    """The patterns of a Spectrum YAML: its top-level ``unfrozen_parameters:`` list of regexes.
    Each problem with the file is a one-line :class:`ConfigError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"student.spectrum: no file at {path}: give the path of a Spectrum YAML "
                          f"(a top-level '{SPECTRUM_KEY}:' list of regexes)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"student.spectrum: cannot read {path} ({one_line(err)}): "
                          "give the path of a readable YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"student.spectrum: {path} is not valid YAML ({one_line(err)}): "
                          "fix the file or write it again with Spectrum") from None
    if not isinstance(data, dict) or SPECTRUM_KEY not in data:
        raise ConfigError(f"student.spectrum: {path} has no top-level '{SPECTRUM_KEY}' key: a Spectrum YAML "
                          "lists the regexes of the parameters to train under it")
    patterns = data[SPECTRUM_KEY]
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"student.spectrum: '{SPECTRUM_KEY}' in {path} must be a non-empty list of regex "
                          f"strings, got {' '.join(repr(patterns).split())[:80]}: list the patterns to train")
    _compile("student.spectrum", patterns)
    return patterns


def apply_freezing(model: nn.Module, *, freeze: Iterable[str] = (), train_only: Iterable[str] = (),
                   spectrum: str | Path | None = None) -> FrozenReport:
    """Set ``requires_grad`` of ``model``'s parameters in place from the three settings (see the
    module doc for the order and the matching) and return what trains. One-line ConfigErrors:
    an invalid regex, a pattern that matches no parameter, nothing left to train."""
    keep = _compile("student.train_only", train_only)
    if spectrum is not None:
        keep += _compile("student.spectrum", read_spectrum(spectrum))
    drop = _compile("student.freeze", freeze)
    tensors = _tensors(model)
    _check_all_match(keep + drop, tensors)
    off = [param for param, names in tensors if param.requires_grad and _turns_off(keep, drop, names)]
    if (keep or drop) and len(off) == sum(param.requires_grad for param, _ in tensors):
        settings = " and ".join(dict.fromkeys(rule.setting for rule in keep + drop))
        raise ConfigError(f"{settings}: nothing left to train (all {len(tensors)} parameter tensors would be "
                          "frozen): freeze fewer parameters or select more to train")
    for param in off:
        param.requires_grad_(False)
    return _report(tensors)


def _compile(setting: str, patterns: Iterable[str]) -> list[_Rule]:
    """The patterns as rules; an invalid regex is a ConfigError naming ``setting``."""
    rules = []
    for pattern in patterns:
        try:
            rules.append(_Rule(setting, pattern, re.compile(pattern)))
        except re.error as err:
            raise ConfigError(f"{setting}: '{pattern}' is not a valid regular expression ({one_line(err)}): "
                              "fix the pattern (escape a literal dot or bracket with a backslash)") from None
    return rules


def _tensors(model: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Each parameter tensor once, with all its names (a tied tensor has several, the first being
    the one ``named_parameters()`` gives), in ``named_parameters()`` order."""
    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(name)
    return list(groups.values())


def _hits(rule: _Rule, names: list[str]) -> list[str]:
    """The names (of one tensor) that ``rule`` matches."""
    return [name for name in names if rule.regex.search(name)]


def _turns_off(keep: list[_Rule], drop: list[_Rule], names: list[str]) -> bool:
    """Whether the settings freeze a tensor: train_only / spectrum given and none of theirs
    selects it, or a freeze pattern does (both are evaluated, so the log sees both)."""
    kept = _selects(keep, names, "train") if keep else True
    dropped = _selects(drop, names, "stay frozen")
    return dropped or not kept


def _selects(rules: list[_Rule], names: list[str], verb: str) -> bool:
    """Whether any rule matches one of a tensor's names; a tied tensor matched through some of
    its names only is reported in the log (the others go with it)."""
    selected = False
    for rule in rules:
        hit = _hits(rule, names)
        if hit and len(hit) < len(names):
            others = ", ".join(n for n in names if n not in hit)
            log.info("%s: '%s' matches %s, tied to %s (one tensor): both %s", rule.setting, rule.pattern,
                     ", ".join(hit), others, verb)
        selected = selected or bool(hit)
    return selected


def _check_all_match(rules: list[_Rule], tensors: list[tuple[nn.Parameter, list[str]]]) -> None:
    """A ConfigError for the first pattern that matches no parameter, with example names and the
    closest name part when one is close."""
    for rule in rules:
        if any(_hits(rule, names) for _, names in tensors):
            continue
        canonical = [names[0] for _, names in tensors]
        examples = ", ".join(dict.fromkeys(canonical[i] for i in (0, len(canonical) // 2, -1))) if canonical else "none"
        close = _closest(rule.pattern, canonical)
        hint = f"; did you mean '{close}'?" if close else ""
        raise ConfigError(f"{rule.setting}: '{rule.pattern}' matches no parameter of the student "
                          f"(names look like {examples}): fix the pattern or remove it{hint}")


def _closest(pattern: str, names: list[str]) -> str | None:
    """The run of dotted name parts (``model.layers.1.mlp``, ``q_proj``, a whole name) closest to
    ``pattern`` read as plain text, if any is close."""
    parts = {".".join(pieces[i:j]) for pieces in (n.split(".") for n in names)
             for i in range(len(pieces)) for j in range(i + 1, len(pieces) + 1)}
    text = pattern.replace("\\", "").strip("^$")
    close = difflib.get_close_matches(text, sorted(parts), n=1, cutoff=0.6)
    return close[0] if close else None


def _report(tensors: list[tuple[nn.Parameter, list[str]]]) -> FrozenReport:
    trainable = sum(p.numel() for p, _ in tensors if p.requires_grad)
    frozen = [(p, names[0]) for p, names in tensors if not p.requires_grad]
    return FrozenReport(trainable=trainable, frozen=sum(p.numel() for p, _ in frozen),
                        frozen_names=[name for _, name in frozen])


def _count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
