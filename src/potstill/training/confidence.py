"""The teacher's confidence on the data: CAKLD's weight (BitDistiller, arXiv 2402.10631).

CAKLD mixes reverse and forward KL as ``gamma * KL(p_s || p_t) + (1 - gamma) * KL(p_t || p_s)``
with ``gamma`` the teacher's mean probability of the data's next tokens: a confident teacher
(mass on the right token) gets the mode-seeking reverse KL, an unsure one the mass-covering
forward KL. :func:`measure_confidence` takes that mean over the valid tokens of the first
``loss.logits.cakld_batches`` train batches (the same on every process, and the same after a
resume), at temperature 1, from whatever dense signal the teacher gives.
"""

from __future__ import annotations

import logging

import torch

from ..data.batching import MicroBatch
from ..errors import ConfigError
from ..teachers.signal import TeacherSignal

log = logging.getLogger("potstill")
ROWS_PER_BLOCK = 256  # teacher logits of this many rows at a time on the chunked path


def label_probabilities(signal: TeacherSignal, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's probability of each valid next token: (R,) float64, R = valid positions of
    ``labels`` (B, T) after the shift. Needs a dense signal (hidden states + head, or logits)."""
    targets = labels[:, 1:]
    mask = targets != -100
    if signal.form == "dense-logits":
        logits = signal.logits[:, :-1][mask].double()
        return torch.log_softmax(logits, -1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1).exp()
    if signal.form == "dense-hidden":
        hidden, head = signal.hidden[:, :-1][mask], signal.head
        rows = targets[mask]
        out = []
        for lo in range(0, len(rows), ROWS_PER_BLOCK):
            h = hidden[lo:lo + ROWS_PER_BLOCK].to(head.weight.dtype)
            z = (h @ head.weight.T).double()
            if head.bias is not None:
                z = z + head.bias.double()
            if head.softcap is not None:
                z = head.softcap * torch.tanh(z / head.softcap)
            logp = torch.log_softmax(z, -1)
            out.append(logp.gather(-1, rows[lo:lo + ROWS_PER_BLOCK].unsqueeze(-1)).squeeze(-1).exp())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    raise ConfigError(f"loss.logits.divergence=cakld cannot measure the teacher's confidence from a {signal.form} "
                      "signal (a cache or a server keeps only some log-probs): set loss.logits.cakld_confidence")


@torch.no_grad()
def measure_confidence(teacher, train_ds, *, batches: int, batch_size: int, pad_token_id: int | None,
                       device: torch.device) -> float:
    """Mean teacher probability of the data's next tokens over the first ``batches`` train batches."""
    total, count = 0.0, 0
    for start in range(0, min(batches * batch_size, len(train_ds)), batch_size):
        batch = MicroBatch.collate(train_ds, list(range(start, min(start + batch_size, len(train_ds)))),
                                   pad_token_id).to(device)
        probs = label_probabilities(teacher.signal(batch), batch.labels)
        total += float(probs.sum())
        count += probs.numel()
    if count == 0:
        raise ConfigError("loss.logits.divergence=cakld: the first train batches hold no token that counts; set "
                          "loss.logits.cakld_confidence")
    gamma = total / count
    log.info("cakld: the teacher's mean probability of the data's tokens is %.4f (%d tokens of the first %d "
             "batches): reverse KL weighs %.4f, forward KL %.4f", gamma, count, batches, gamma, 1 - gamma)
    return gamma
