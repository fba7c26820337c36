"""Architecture rules for src/potstill, checked by reading the source with ``ast`` (potstill is never imported).

1. Every module belongs to exactly one layer of ``LAYERS`` (lowest first) and imports potstill modules of its own
   layer or of lower layers only.
2. The import graph between potstill modules has no cycle (imports under ``if TYPE_CHECKING:`` are left out here).

The checker is a handful of small functions that take the package folder as a parameter, so the self-tests at the
bottom can run it on fake ``potstill`` trees written into ``tmp_path``.
"""

from __future__ import annotations

import ast
import textwrap
import warnings
from pathlib import Path

PACKAGE = "potstill"
ROOT = Path(__file__).resolve().parents[2] / "src" / PACKAGE
SKIP_DIRS = {"assets"}

# (layer, exact module names, packages whose module and submodules belong to the layer), lowest layer first.
LAYERS: list[tuple[str, frozenset[str], tuple[str, ...]]] = [
    ("ground", frozenset({"potstill.config", "potstill.errors", "potstill.atomic", "potstill.version",
                          "potstill.ownership", "potstill.locking",
                          "potstill.stopping"}), ()),
    ("losses", frozenset(), ("potstill.losses",)),
    ("data", frozenset(), ("potstill.data",)),
    ("models", frozenset(), ("potstill.models",)),
    ("features", frozenset(), ("potstill.features",)),
    ("teachers", frozenset(), ("potstill.teachers",)),
    ("training", frozenset(), ("potstill.training",)),
    ("commands", frozenset(), ("potstill.commands",)),
    ("api", frozenset({"potstill", "potstill.__main__"}), ()),
]
LAYER_RANK = {name: rank for rank, (name, _, _) in enumerate(LAYERS)}

Import = tuple[str, int, bool]  # (target module, line number, only under `if TYPE_CHECKING:`)


# ----------------------------------------------------------------------------------------------------------- checker


def collect_modules(root: Path) -> dict[str, Path]:
    """Map each module name under ``root`` (the ``potstill`` folder) to its file; assets/ and non-.py files skipped."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIP_DIRS or "__pycache__" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([PACKAGE, *parts])] = path
    return modules


def layer_of(name: str) -> str | None:
    """The layer a module name belongs to, or None when it fits none."""
    found = [layer for layer, exact, packages in LAYERS
             if name in exact or any(name == p or name.startswith(p + ".") for p in packages)]
    assert len(found) <= 1, f"LAYERS is ambiguous: {name} is in {found}"
    return found[0] if found else None


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an ``if`` test is ``TYPE_CHECKING`` or ``<something>.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(candidates: list[str], modules: dict[str, Path]) -> str:
    """The first candidate that is a module of the tree, else the last (an import of a module that doesn't exist)."""
    return next((c for c in candidates if c in modules), candidates[-1])


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[Import]:
    """Every potstill module imported anywhere in the file, as (target, lineno, type_checking_only)."""
    with warnings.catch_warnings():  # e.g. invalid escapes in docstrings: not this test's business
        warnings.simplefilter("ignore")
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[Import] = set()

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import potstill.a.b` names potstill.a.b only, not its parent packages
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.add((alias.name, node.lineno, type_checking))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    dots = "." * node.level + (node.module or "")
                    found.add((f"{dots} (relative import above the top-level package)", node.lineno, type_checking))
                    return
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
                if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                    return
            for alias in node.names:  # `from X import y`: the submodule X.y when it exists, else X itself
                candidates = [source] if alias.name == "*" else [f"{source}.{alias.name}", source]
                found.add((_resolve(candidates, modules), node.lineno, type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(tree, False)
    return found


def import_graph(root: Path, *, with_type_checking: bool) -> dict[str, dict[str, list[int]]]:
    """module -> {imported potstill module -> line numbers}; self-imports dropped."""
    modules = collect_modules(root)
    graph: dict[str, dict[str, list[int]]] = {name: {} for name in modules}
    for name, path in modules.items():
        for target, lineno, type_checking_only in imports_of(name, path, modules):
            if target != name and (with_type_checking or not type_checking_only):
                graph[name].setdefault(target, []).append(lineno)
    for targets in graph.values():
        for lines in targets.values():
            lines.sort()
    return graph


def _where(root: Path, name: str, lines: list[int]) -> str:
    """``potstill/x/y.py:3,17`` for an edge's source lines."""
    path = collect_modules(root)[name].relative_to(root.parent).as_posix()
    return f"{path}:{','.join(map(str, lines))}"


def unlayered_modules(root: Path) -> list[str]:
    """One message per module of the tree that fits no layer."""
    layout = ", ".join(f"{layer}" for layer, _, _ in LAYERS)
    return [f"{name} ({path.relative_to(root.parent).as_posix()}) fits no layer: place it in a package of the "
            f"layout ({layout}; see LAYERS in tests/unit/test_architecture.py) instead of growing the flat layout back"
            for name, path in collect_modules(root).items() if layer_of(name) is None]


def layering_violations(root: Path) -> list[str]:
    """One message per import edge that points to a higher layer, to no layer, or to a module that doesn't exist."""
    modules = collect_modules(root)
    messages = []
    for name, targets in import_graph(root, with_type_checking=True).items():
        source_layer = layer_of(name)
        if source_layer is None:
            continue  # reported by test_every_module_has_a_layer
        for target, lines in sorted(targets.items()):
            target_layer = layer_of(target)
            where = _where(root, name, lines)
            if target not in modules:
                messages.append(f"{name} -> {target} (no such module in src/potstill) at {where}")
            elif target_layer is None:
                messages.append(f"{name} -> {target} ({source_layer} -> no layer) at {where}")
            elif LAYER_RANK[target_layer] > LAYER_RANK[source_layer]:
                messages.append(f"{name} -> {target} ({source_layer} -> {target_layer}) at {where}")
    return messages


def strongly_connected(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (self-edges are already dropped)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, {})):
            if succ not in graph:
                continue
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def _shortest_cycle(graph: dict[str, dict[str, list[int]]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as [a, b, ..., a] (breadth-first search)."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if succ in members and succ not in parent:
                    parent[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def import_cycles(root: Path) -> list[str]:
    """One message per import cycle (one cycle per strongly connected component), TYPE_CHECKING imports left out."""
    graph = import_graph(root, with_type_checking=False)
    messages = []
    for component in strongly_connected(graph):
        cycle = _shortest_cycle(graph, component)
        edges = "\n".join(f"    {a} -> {b} at {_where(root, a, graph[a][b])}" for a, b in zip(cycle, cycle[1:]))
        also = sorted(set(component) - set(cycle))
        tail = f"\n    (the same knot also holds: {', '.join(also)})" if also else ""
        messages.append(f"cycle: {' -> '.join(cycle)}\n{edges}{tail}")
    return messages


# ------------------------------------------------------------------------------------------------ the real tree


def test_every_module_has_a_layer():
    problems = unlayered_modules(ROOT)
    assert not problems, "modules outside the layout:\n" + "\n".join(problems)


def test_imports_point_down_the_layers():
    order = " < ".join(layer for layer, _, _ in LAYERS)
    problems = layering_violations(ROOT)
    assert not problems, (f"imports must point to the same or a lower layer ({order}):\n" + "\n".join(problems))


def test_no_import_cycles():
    problems = import_cycles(ROOT)
    assert not problems, "import cycles between potstill modules:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------- self-tests of the checker


def make_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """Write a fake ``potstill`` package into tmp_path and return its folder."""
    root = tmp_path / "src" / PACKAGE
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root


CLEAN = {
    "__init__.py": """
        from .config import Config
        from .errors import PotstillError

        def distill(config):
            from .training.loop import distill as _distill
            return _distill(config)
    """,
    "__main__.py": "from .commands.cli import main\nfrom . import distill\n",
    "config.py": "from .errors import ConfigError\nfrom potstill import atomic\n",
    "errors.py": "class PotstillError(Exception): ...\n",
    "atomic.py": "import os\n",
    "losses/__init__.py": "from potstill.losses.chunked import ROW_FACTOR\nfrom .x import loss\n",
    "losses/chunked.py": "ROW_FACTOR = 4\nfrom .x import loss\n",
    "losses/x.py": "import torch\n\ndef loss(): ...\n",
    "data/__init__.py": "from ..errors import DataError\n",
    "data/reader.py": "from ..losses import x\nfrom ..losses import ROW_FACTOR\n",
    "models/__init__.py": "from . import bitnet\nfrom .bitnet import BitLinear\n",
    "models/bitnet.py": """
        from typing import TYPE_CHECKING
        from ..errors import ModelError

        if TYPE_CHECKING:
            from .heads import HeadParams  # would close a cycle at run time; it doesn't under TYPE_CHECKING

        class BitLinear: ...
    """,
    "models/heads.py": "from .bitnet import BitLinear\n",
    "features/hooks.py": "import potstill.models.bitnet\nfrom ..data import reader\n",
    "teachers/cache.py": "from ..features.hooks import capture\n",
    "teachers/capture.py": """
        from . import cache
        try:
            from ..models import heads
        except ImportError:
            heads = None
    """,
    "training/loop.py": """
        class Loop:
            def run(self):
                if True:
                    from ..teachers.capture import cache_teacher
    """,
    "commands/cli.py": "from .. import errors\nfrom ..training import loop\n",
    "assets/demo/tool.py": "from potstill.commands import cli  # assets are not modules of the layout\n",
    "assets/demo/notes.txt": "not python\n",
}


def test_checker_passes_a_clean_tree(tmp_path):
    root = make_tree(tmp_path, CLEAN)
    modules = collect_modules(root)
    assert "potstill" in modules and "potstill.__main__" in modules and "potstill.losses" in modules
    assert not any(name.startswith("potstill.assets") for name in modules)
    assert unlayered_modules(root) == []
    assert layering_violations(root) == []
    assert import_cycles(root) == []


def test_checker_resolves_imports(tmp_path):
    root = make_tree(tmp_path, {
        **CLEAN,
        "teachers/other.py": "from . import signal\n",  # no teachers/signal.py: the package potstill.teachers
        "teachers/__init__.py": "",
        "training/__init__.py": "from .loop import Loop\nfrom . import loop\n",
        "data/nested.py": """
            import json, potstill.models.heads as h
            from potstill.data import reader, nothing_here
            from .reader import x

            def f():
                for _ in range(1):
                    with open("x"):
                        from potstill.losses.chunked import ROW_FACTOR
        """,
        "features/typing_only.py": """
            import typing
            if typing.TYPE_CHECKING:
                from ..models import heads
            else:
                from ..models import bitnet
        """,
    })
    modules = collect_modules(root)

    def imports(name):
        return imports_of(name, modules[name], modules)

    assert imports("potstill.data.reader") == {("potstill.losses.x", 1, False), ("potstill.losses", 2, False)}
    assert imports("potstill.teachers.capture") == {("potstill.teachers.cache", 1, False),
                                                    ("potstill.models.heads", 3, False)}
    assert imports("potstill.teachers.other") == {("potstill.teachers", 1, False)}
    # a package __init__'s own package is itself
    assert imports("potstill.models") == {("potstill.models.bitnet", 1, False), ("potstill.models.bitnet", 2, False)}
    assert imports("potstill.training") == {("potstill.training.loop", 1, False), ("potstill.training.loop", 2, False)}
    assert imports("potstill.commands.cli") == {("potstill.errors", 1, False), ("potstill.training.loop", 2, False)}
    assert imports("potstill.__main__") == {("potstill.commands.cli", 1, False), ("potstill", 2, False)}
    # `import potstill.a.b` names potstill.a.b only: no edges to its parent packages
    assert imports("potstill.features.hooks") == {("potstill.models.bitnet", 1, False),
                                                  ("potstill.data.reader", 2, False)}
    assert imports("potstill.data.nested") == {
        ("potstill.models.heads", 1, False), ("potstill.data.reader", 2, False), ("potstill.data", 2, False),
        ("potstill.data.reader", 3, False), ("potstill.losses.chunked", 8, False)}
    assert imports("potstill.features.typing_only") == {("potstill.models.heads", 3, True),
                                                        ("potstill.models.bitnet", 5, False)}
    assert imports("potstill.training.loop") == {("potstill.teachers.capture", 4, False)}
    assert imports("potstill.losses.x") == set()


def test_checker_flags_an_upward_import(tmp_path):
    root = make_tree(tmp_path, {
        **CLEAN,
        "losses/x.py": "from potstill.models import bitnet\n\ndef loss(): ...\n",
        "models/heads.py": """
            from typing import TYPE_CHECKING
            from .bitnet import BitLinear
            if TYPE_CHECKING:
                from ..training.loop import Loop  # counts for layering even though it is typing-only
        """,
        "errors.py": "class PotstillError(Exception): ...\n\ndef hint():\n    from .commands import cli\n",
    })
    problems = layering_violations(root)
    assert problems == [
        "potstill.errors -> potstill.commands.cli (ground -> commands) at potstill/errors.py:4",
        "potstill.losses.x -> potstill.models.bitnet (losses -> models) at potstill/losses/x.py:1",
        "potstill.models.heads -> potstill.training.loop (models -> training) at potstill/models/heads.py:4",
    ]
    assert unlayered_modules(root) == []


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    root = make_tree(tmp_path, {
        **CLEAN,
        "models/a.py": "from . import b\n",
        "models/b.py": "def f():\n    from .a import thing\n    return thing\n",
    })
    assert layering_violations(root) == []  # same layer: only the cycle check can catch it
    problems = import_cycles(root)
    assert len(problems) == 1
    assert problems[0].splitlines() == [
        "cycle: potstill.models.a -> potstill.models.b -> potstill.models.a",
        "    potstill.models.a -> potstill.models.b at potstill/models/a.py:1",
        "    potstill.models.b -> potstill.models.a at potstill/models/b.py:2",
    ]


def test_checker_counts_package_init_edges_and_skips_type_checking_for_cycles(tmp_path):
    root = make_tree(tmp_path, {
        **CLEAN,
        "losses/x.py": "from potstill.losses import ROW_FACTOR  # back into the package __init__\n",
        "models/heads.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .bitnet import BitLinear\n",
        "models/bitnet.py": "from .heads import HeadParams\n",
    })
    problems = import_cycles(root)
    assert len(problems) == 1
    assert problems[0].startswith("cycle: potstill.losses -> potstill.losses.x -> potstill.losses\n")
    assert "potstill.losses.chunked" in problems[0]  # the rest of the knot is named too


def test_checker_flags_modules_outside_the_layout_and_missing_targets(tmp_path):
    root = make_tree(tmp_path, {
        **CLEAN,
        "utils.py": "from .errors import PotstillError\n",
        "helpers/__init__.py": "",
        "__init__.py": "from .train import distill\nfrom .utils import thing\n",
        "data/reader.py": "from ...elsewhere import x\n",
    })
    problems = unlayered_modules(root)
    assert [p.split(" ")[0] for p in problems] == ["potstill.helpers", "potstill.utils"]
    assert all("place it in a package of the layout" in p for p in problems)
    assert layering_violations(root) == [
        "potstill -> potstill.train (no such module in src/potstill) at potstill/__init__.py:1",
        "potstill -> potstill.utils (api -> no layer) at potstill/__init__.py:2",
        "potstill.data.reader -> ...elsewhere (relative import above the top-level package) "
        "(no such module in src/potstill) at potstill/data/reader.py:1",
    ]
