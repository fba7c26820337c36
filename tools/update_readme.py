"""Regenerate the config reference in docs/config.md from potstill/config.py: python tools/update_readme.py"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
# The file that holds the generated reference between START and END.
TARGET = ROOT / "docs" / "config.md"


def rendered(text: str) -> str:
    from potstill.config import reference_markdown

    block = f"{START}\n{reference_markdown()}\n{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)


if __name__ == "__main__":
    TARGET.write_text(rendered(TARGET.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"{TARGET.relative_to(ROOT)} config reference updated")
