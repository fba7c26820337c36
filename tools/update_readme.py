"""Regenerate the README's config reference from potstill/config.py: python tools/update_readme.py"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def rendered(readme: str) -> str:
    from potstill.config import reference_markdown

    block = f"{START}\n{reference_markdown()}\n{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(rendered(path.read_text(encoding="utf-8")), encoding="utf-8")
    print("README.md config reference updated")
