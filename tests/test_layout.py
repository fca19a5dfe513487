"""The package's shape: no import cycle, the product never imports the test and demo infrastructure, and the
README's Layout names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import ratatouille_hub

PACKAGE = Path(ratatouille_hub.__file__).parent
INFRASTRUCTURE = ("ratatouille_hub.localhub", "ratatouille_hub.toy", "ratatouille_hub.testing")
ENTRY_POINTS = {"ratatouille_hub.cli"}  # the `demo` and `local-hub` commands start the infrastructure


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module's imports of other package modules, at any depth of its code (functions included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            imported |= {c for c in candidates if c in modules and c != name}
        graph[name] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return stack[stack.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 20 and "ratatouille_hub.recipe.plan" in graph  # the walk sees the whole package
    assert find_cycle(graph) is None


def test_the_product_never_imports_test_or_demo_infrastructure():
    graph = import_graph()
    product = [m for m in graph if not m.startswith(INFRASTRUCTURE) and m not in ENTRY_POINTS]
    leaks = {m: sorted(i for i in graph[m] if i.startswith(INFRASTRUCTURE)) for m in product}
    assert {m: found for m, found in leaks.items() if found} == {}


def test_the_readme_layout_names_every_module_and_subpackage():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"[\w/]+\.py|\w+/", layout))
    modules = {p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    packages = {f"{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    assert sorted((modules | packages) - named) == []
