#!/usr/bin/env python
"""Rebuild the shipped ``python-docs`` corpus snapshot from the documentation installed here.

    python scripts/snapshot_python_docs.py          # writes src/potstill/assets/python-docs/

Builds (or reuses from the cache) the corpus with :func:`potstill.data.corpus.build_python_docs`
from the docstrings of the standard library and of the fixed dependency list at their
installed versions, then writes it as ``corpus.jsonl.xz`` (one ``{"split", "text"}`` row per
text) and ``manifest.json`` (sha256 of the uncompressed content, texts and characters per
split, the sources and versions it was built from) with
:func:`potstill.data.corpus.write_snapshot`.

Other installed versions give a different corpus: the texts every user gets change only when
this script is run again and its output committed. After that, the figures that were measured
on the old corpus (the quickstart's table in the README, the demo teacher's test perplexity)
must be measured again.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "potstill" / "assets" / "python-docs"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="snapshot folder to write (default: %(default)s)")
    p.add_argument("--cache", default=None, help="build cache root (default: $POTSTILL_CACHE or ~/.cache/potstill)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows the build's summary line

    from potstill.data.corpus import build_python_docs, write_snapshot

    old = None
    if (args.out / "manifest.json").is_file():
        old = json.loads((args.out / "manifest.json").read_text(encoding="utf-8")).get("sha256")
    folder = build_python_docs(args.cache)
    start = time.perf_counter()
    manifest = write_snapshot(folder, args.out)
    texts = {s: c["texts"] for s, c in manifest["splits"].items()}
    print(f"python-docs snapshot -> {args.out}: {sum(texts.values()):,} texts {texts}, "
          f"{manifest['bytes'] / 1e6:.1f} MB -> {manifest['xz_bytes'] / 1e6:.2f} MB xz "
          f"in {time.perf_counter() - start:.0f}s, sha256 {manifest['sha256'][:16]}")
    if old is not None:
        print("unchanged" if old == manifest["sha256"] else
              f"CHANGED (was {old[:16]}): re-measure the figures made on the old corpus")


if __name__ == "__main__":
    main()
