"""The layering rule of docs/architecture.md, read from vdit's imports with `ast`: a module
imports only from its own layer or the layers below, and no modules import each other in a
circle (function-local imports count too: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vdit"


def layers() -> list[list[str]]:
    """The `## Layers` block of docs/architecture.md: one line per layer, top first."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"## Layers\n.*?```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ## Layers block"
    return [line.split("#")[0].split() for line in block.group(1).splitlines()
            if line.split("#")[0].strip()]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every vdit module `path` imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vdit"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vdit"):
            for alias in node.names:  # `from vdit.data import physics` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def layer_of(module: str, table: list[list[str]]) -> int:
    """Index from the bottom of the layer holding `module` (the longest matching prefix)."""
    best, depth = None, -1
    for i, names in enumerate(reversed(table)):
        for name in names:
            full = name if name == "vdit" else f"vdit.{name}"
            if (module == full or module.startswith(full + ".")) and len(full) > depth:
                best, depth = i, len(full)
    assert best is not None, f"{module} is in no layer of docs/architecture.md's ## Layers"
    return best


def test_every_module_is_in_a_layer_and_imports_only_down():
    table = layers()
    upward = [f"{m} (layer {layer_of(m, table)}) imports {d} (layer {layer_of(d, table)})"
              for m, deps in sorted(graph().items()) for d in sorted(deps)
              if layer_of(d, table) > layer_of(m, table)]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_modules_import_each_other_in_a_circle():
    assert not cycles(graph()), f"import circles: {cycles(graph())}"


def test_nothing_imports_the_cli():
    users = sorted(m for m, deps in graph().items() if "vdit.cli" in deps)
    assert not users, f"modules importing vdit.cli (a thin face, imported by nobody): {users}"


def test_the_checker_sees_an_upward_import_and_a_circle():
    """The rule can fail: a models module importing data, and a two-module circle."""
    table = [["data"], ["models"]]
    assert layer_of("vdit.data.physics", table) > layer_of("vdit.models.text", table)
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
