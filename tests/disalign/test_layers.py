"""The import graph of the installed package: no circle, and no module imports a floor above its own.

The floors, top to bottom, are written once, in the docstring of ``disalign/__init__.py``; this test reads
them from there. Every ``import`` counts — module level, inside functions, under ``TYPE_CHECKING`` — since
each is a dependency a reader has to hold in mind.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import disalign

PACKAGE_DIRS = {"disalign": "disalign", "disalign.calib": "calib", "disalign.feature_extract": "feature_extract",
                "disalign.service": "service"}
REPO = Path(__file__).resolve().parents[2]


def floors() -> list[str]:
    """The floors named in the package docstring, top first (lines ``    disalign.x   what it is``)."""
    block = disalign.__doc__.split("Floors, top to bottom")[1].split("\n\n")[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def modules() -> dict[str, Path]:
    """Every module of the distribution → its file, named as installed (``calib/core/head.py`` → ``disalign.calib.core.head``)."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if package == "disalign" and parts[0] != "cli" and len(parts) > 1:
                continue
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known and t != name}


def floor_of(module: str, order: list[str]) -> int:
    """Index of the longest floor prefix of ``module`` (0 is the top)."""
    matches = [f for f in order if module == f or module.startswith(f + ".")]
    assert matches, f"{module} is on no floor of disalign/__init__.py's docstring"
    return order.index(max(matches, key=len))


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, name, set(found)) for name, path in found.items()}


def test_the_floors_cover_the_three_folders_and_the_command_line():
    order = floors()
    assert order[:2] == ["disalign", "disalign.cli"] and order[-1] == "disalign.calib"
    assert order.index("disalign.service") < order.index("disalign.feature_extract") < order.index("disalign.calib.data")
    for module in modules():
        floor_of(module, order)


def test_no_module_imports_a_floor_above_its_own():
    order = floors()
    upward = sorted(f"{m} -> {t}" for m, targets in graph().items() for t in targets
                    if floor_of(t, order) < floor_of(m, order))
    assert upward == []


def test_the_import_graph_has_no_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_graph_sees_function_level_and_type_checking_imports(tmp_path):
    # the checker itself: an import inside a function and one under TYPE_CHECKING are edges
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a.b import X\n\ndef f():\n    import a.c\n")
    assert imports_of(source, "a.m", {"a.b", "a.c", "a.m"}) == {"a.b", "a.c"}
    assert re.fullmatch(r"[a-z_.]+", floors()[0])
