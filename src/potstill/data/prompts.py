"""The prompt part of each tokenized example, for on-policy distillation.

An example's *completion* is its last run of loss tokens (the final assistant turn of a chat
and its end-of-turn token, or a prompt/completion pair's completion and EOS); its *prompt* is
every token before that run: the conversation so far, rendered by the chat template up to and
including the generation prompt (``<|im_start|>assistant\\n``), exactly as the data's own
tokenization has it. A sampled completion replaces the tokens from there on.

Computed once over the flat arrays of a :class:`~potstill.data.tokenized.TokenizedDataset`
(vectorized, no Python loop over examples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError


@dataclass
class Prompts:
    """Per item ``i`` of a per-example (unpacked) dataset.

    ``length`` (I,) int64: tokens before the item's last completion (0: the item has no prompt);
    ``stop_ids``: the ids that end a completion in these data (the tokenizer's EOS and the token
    that ends the data's completions where it is a special token, e.g. ChatML's ``<|im_end|>``).
    """

    length: np.ndarray
    stop_ids: list[int]

    @property
    def n_without(self) -> int:
        """Items with no prompt part (their completion starts at their first token)."""
        return int((self.length == 0).sum())


def find_prompts(ds, *, eos_id: int, special_ids: set[int], describe: str = "the training data") -> Prompts:
    """The prompts of ``ds`` (see the module doc); one DataError line when the data have none.

    ``ds``: a per-example TokenizedDataset (``ds.packing`` false); ``special_ids``: the
    tokenizer's special token ids (which tokens may end a completion besides EOS)."""
    fmt = ds.manifest.get("format")
    if fmt == "text":
        raise DataError(f"{describe} is plain text (format text): on-policy distillation needs a prompt to sample a "
                        "completion for; use chat (messages, sharegpt) or prompt/completion data")
    if ds.packing:
        raise DataError(f"{describe} is packed: on-policy distillation needs one example per sequence "
                        "(data.packing=false)")
    offsets = np.asarray(ds.offsets, dtype=np.int64)
    loss = np.asarray(ds.loss).astype(bool)
    tokens = np.asarray(ds.tokens)
    starts = offsets[:-1]
    pos = np.arange(len(loss), dtype=np.int64)
    run_start = loss.copy()
    run_start[1:] &= ~loss[:-1]
    run_start[starts] = loss[starts]  # a run never continues across an item boundary
    last_run = np.maximum.reduceat(np.where(run_start, pos, -1), starts)
    last_loss = np.maximum.reduceat(np.where(loss, pos, -1), starts)
    if (last_run < 0).any():  # pack() drops items without loss tokens; a hand-made dataset may not
        raise DataError(f"{describe}: item {int(np.argmax(last_run < 0))} has no completion (no loss tokens)")
    length = last_run - starts
    if not length.any():
        raise DataError(f"{describe} has no prompt part: every example's loss starts at its first token (format "
                        f"{fmt}); on-policy distillation needs prompts: use chat or prompt/completion data with "
                        "data.assistant_only_loss=true")
    enders = {int(t) for t in np.unique(tokens[last_loss]) if int(t) in special_ids}
    return Prompts(length=length, stop_ids=sorted({int(eos_id)} | enders))
