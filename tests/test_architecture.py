"""The package's import structure (ARCHITECTURE.md): no import cycle among onnx_lrsd modules,
each folder imports only the folders below it, the passes import relatively."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

import onnx_lrsd
import onnx_lrsd.passes

ROOTS = {"onnx_lrsd": Path(onnx_lrsd.__file__).parent, "onnx_lrsd.passes": Path(onnx_lrsd.passes.__file__).parent}

ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "decompose": set(),
    "model": {"errors", "config", "decompose"},
    "plan": {"errors", "config", "decompose", "model"},
    "report": {"errors", "config", "model"},
    "runtime": {"errors", "config", "decompose", "model", "plan", "report"},
    "parallel": {"errors", "config", "decompose", "model", "plan", "report", "runtime"},
    "testing": {"errors", "config", "model", "runtime"},
    "recover": {"errors", "config", "decompose", "model", "plan", "report", "runtime", "parallel"},
    "passes": {"errors", "config", "decompose", "model", "plan", "report", "runtime", "parallel", "recover"},
    "api": {"errors", "config", "decompose", "model", "plan", "report", "runtime", "parallel", "passes", "recover"},
    "cli": {"errors", "config", "decompose", "model", "plan", "report", "runtime", "parallel", "api", "recover"},
    "__init__": set(),
}
"""Folder (or top-level module) -> the folders it may import (ARCHITECTURE.md)."""


def _modules() -> Dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            relative = path.relative_to(root)
            if package == "onnx_lrsd" and relative.parts[0] == "passes":
                continue  # an in-tree copy never installed as such
            parts = list(relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Set[str]:
    """onnx_lrsd modules `name` imports anywhere in its code (function-local imports too),
    except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_modules_are_found():
    assert {"onnx_lrsd.api", "onnx_lrsd.decompose.stats", "onnx_lrsd.passes.search",
            "onnx_lrsd.passes.context"} <= set(MODULES)
    assert "onnx_lrsd.passes.search" in GRAPH["onnx_lrsd.api"]


def test_no_import_cycle_among_onnx_lrsd_modules():
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_folder_rules(name):
    allowed = ALLOWED[folder(name)] | {folder(name)}
    wrong = sorted(m for m in GRAPH[name] if folder(m) not in allowed)
    assert not wrong, f"{name} imports {wrong}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if folder(m) == "passes"))
def test_passes_import_relatively(name):
    tree = ast.parse(MODULES[name].read_text())
    absolute = [node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("onnx_lrsd")]
    assert not absolute, f"{name}: absolute imports {absolute}"
