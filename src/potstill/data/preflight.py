"""Data checks that run before any model loads, and warnings about data that make a run unlikely
to be what the user meant.

* :func:`check_data` parses every row of the configured sources and checks the fields their
  format needs (one DataError line naming file and line), without tokenizing. A dataset whose
  tokenized cache already exists was checked when it was built and is not read again.
* :func:`warn_about_datasets` looks at the built datasets: a validation split of a handful of
  examples or tokens, and many epochs over a tiny train set.
"""

from __future__ import annotations

import logging

from ..errors import DataError
from . import _Builder, cache_root, formats, plan_datasets, require_eos

log = logging.getLogger("potstill")

# A validation split below either of these measures noise, not the model.
MIN_VALIDATION_ITEMS = 4
MIN_VALIDATION_TOKENS = 256
# More passes than this over fewer items than that: the student memorizes the train set.
MANY_EPOCHS = 20
TINY_TRAIN_ITEMS = 1000


def check_data(cfg, tokenizer=None, *, seed: int = 0, fields: bool = True) -> None:
    """Every row of ``cfg`` (a DataConfig)'s sources parses and, with ``fields``, has the fields
    its format needs. With ``tokenizer``, datasets already in the tokenized-data cache are skipped
    (and the tokenizer must have an EOS token). Hub datasets are opened (downloaded) but their rows
    are not walked: they are a library's own files, and walking millions of rows costs minutes."""
    if tokenizer is not None:
        require_eos(tokenizer)
        builder = _Builder(cfg, tokenizer, progress=False)
    checked: set[int] = set()
    for planned in plan_datasets(cfg, seed):
        source = planned.source
        if id(source) in checked:  # train and validation fractions of one source
            continue
        checked.add(id(source))
        if tokenizer is not None:
            folder = cache_root(cfg) / builder.fingerprint(planned.role, source, planned.plan)
            if (folder / "manifest.json").is_file():
                continue
        if source.kind in ("hub", "builtin"):
            continue
        rows = source.rows()
        if len(rows) == 0:
            raise DataError(f"{source.describe} has no rows: check the file or the split")
        if fields:
            formats.check_rows(rows, cfg, where=source.where, describe=source.describe)


def warn_about_datasets(train_ds, val_ds, *, epochs: float) -> None:
    """One warning line for each setting that probably is not what the user meant."""
    if val_ds is not None and (len(val_ds) < MIN_VALIDATION_ITEMS or val_ds.n_loss_tokens < MIN_VALIDATION_TOKENS):
        log.warning("the validation split holds only %d example(s) with %d loss tokens: its metrics will be mostly "
                    "noise; hold out more (data.validation_fraction, data.validation_source)",
                    len(val_ds), val_ds.n_loss_tokens)
    if epochs > MANY_EPOCHS and len(train_ds) < TINY_TRAIN_ITEMS:
        log.warning("the run passes %.0f times over a train set of %d example(s): the student will memorize it "
                    "rather than learn from the teacher; add data or lower train.max_steps / train.epochs",
                    epochs, len(train_ds))
