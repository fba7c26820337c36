"""The README and docs stay true: the config reference (docs/config.md) matches the code, the
README's test command is CI's, and every relative link in README.md, docs/ and bench/README.md
points to a file (and heading) that exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "tools" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current():
    module = _update_readme()
    assert module.TARGET == ROOT / "docs" / "config.md"
    text = module.TARGET.read_text(encoding="utf-8")
    # Both markers, once each: without them the table is not regenerated and the comparison proves nothing.
    assert text.count(module.START) == 1 and text.count(module.END) == 1, "the config reference lost a marker"
    assert module.rendered(text) == text, "run: python tools/update_readme.py"
    # The block holds the generated table itself, not an empty or stale stub.
    assert "| `train.lr` |" in text and "| `output.dir` |" in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = 'python -m pytest -q -m "not gpu"'
    assert command in readme
    assert command.replace("python ", "python3 ") in ci


def test_readme_installs_what_its_test_command_needs():
    """Followed literally, the README installs pytest before running the tests."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tests = readme[readme.index("## Tests"):]
    assert tests.index('pip install -e ".[test]"') < tests.index('python -m pytest -q -m "not gpu"')


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # a code span is not a link; [`name`](path) still is
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_link_check_sees_links():
    """The link check is not vacuous: it finds the README's links to docs/ and bench/."""
    links = _links(ROOT / "README.md")
    assert "docs/config.md" in links and "bench/README.md" in links
    assert "fsdppy-fsdp-against-ddp" in _anchors(ROOT / "bench" / "README.md")
