"""lightwatch's modules import one way only, from higher layers to lower ones, and never in a cycle.

Layers, lowest first (a module may import its own layer and those below):

0. ``lightwatch.metrics``: statistics, no Lightning;
1. ``lightwatch.core`` and ``lightwatch.profile``: the machinery the callbacks share;
2. ``lightwatch.checks``: the diagnoses as small classes;
3. ``lightwatch.callbacks``: the Lightning adapters;
4. everything else: ``lightwatch`` itself, ``lightwatch.hydra``, ``lightwatch.lightning``, ``__main__``, a CLI.

``lightwatch.conf`` (Hydra configs) and ``lightwatch._version`` are data: any module may import them, and they
import no other lightwatch module.

Every import counts: at module level, inside functions, under ``if TYPE_CHECKING:`` (a type-only import is still a
dependency on the higher layer, and would be the first to turn into a real one), and ``importlib.import_module``
with a literal name. An import names its target module only: ``from lightwatch.core import actions`` depends on
``lightwatch.core.actions``, ``from lightwatch.core import Alert`` on the package ``lightwatch.core``; the parent
packages Python initialises on the way are not counted as dependencies.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
PACKAGE = "lightwatch"

LAYERS: Dict[str, int] = {"metrics": 0, "core": 1, "profile": 1, "checks": 2, "callbacks": 3}
TOP = 4
DATA = {"conf", "_version"}  # imported by anyone, importing nothing of lightwatch
LAYER_NAMES = {0: "metrics", 1: "core/profile", 2: "checks", 3: "callbacks", 4: "top level"}


def module_files(src: str, package: str = PACKAGE) -> Dict[str, str]:
    """Module name -> file path, for every ``.py`` file of ``package`` under ``src``."""
    out: Dict[str, str] = {}
    root = os.path.join(src, package)
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(directory, name), src)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(directory, name)
    return out


def layer_of(module: str) -> Optional[int]:
    """The layer of a lightwatch module; ``None`` for data modules."""
    parts = module.split(".")
    if len(parts) < 2:
        return TOP
    if parts[1] in DATA:
        return None
    return LAYERS.get(parts[1], TOP)


def _resolve_relative(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: str, known: Set[str]) -> Iterator[Tuple[int, str, str]]:
    """``(line, target module, statement)`` for every import of a lightwatch module in ``path``."""
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    tree = ast.parse(source, filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    lines = source.splitlines()

    def text(node: ast.AST) -> str:
        return " ".join(" ".join(lines[node.lineno - 1: node.end_lineno]).split())

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield node.lineno, alias.name, text(node)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import submodule` depends on the submodule, `from pkg import name` on pkg
                yield node.lineno, (sub if sub in known else base), text(node)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) and node.args[0].value.startswith(PACKAGE):
                yield node.lineno, node.args[0].value, text(node)


def import_graph(src: str = SRC) -> Tuple[Dict[str, str], Dict[str, List[Tuple[int, str, str]]]]:
    files = module_files(src)
    known = set(files)
    return files, {m: list(imports_of(m, p, known)) for m, p in files.items()}


def layer_violations(src: str = SRC) -> List[str]:
    """One line per import from a higher layer: file, line, the statement and the two layers."""
    files, graph = import_graph(src)
    out = []
    for module, edges in sorted(graph.items()):
        own = layer_of(module)
        for line, target, text in edges:
            theirs = layer_of(target)
            if theirs is None:
                continue
            if own is None:
                problem = f"data module {module} imports {target}"
            elif theirs > own:
                problem = (f"{module} (layer {own}, {LAYER_NAMES[own]}) imports {target} "
                           f"(layer {theirs}, {LAYER_NAMES[theirs]})")
            else:
                continue
            rel = os.path.relpath(files[module], os.path.join(src, ".."))
            out.append(f"{rel}:{line}: {problem}: `{text}`")
    return out


def import_cycles(src: str = SRC) -> List[List[str]]:
    """Strongly connected components of more than one module in the import graph (Tarjan's algorithm)."""
    files, graph = import_graph(src)
    edges = {m: sorted({t for _, t, _ in e if t in files and t != m}) for m, e in graph.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return components


def _cycle_path(component: List[str], graph: Dict[str, List[Tuple[int, str, str]]], files: Dict[str, str]) -> str:
    """One concrete loop through ``component``, with the line of each import, for the failure message."""
    members = set(component)
    start = component[0]
    path, seen, node = [start], {start}, start
    lines = []
    while True:
        nxt = next(((ln, t) for ln, t, _ in graph[node] if t in members and (t == start or t not in seen)), None)
        if nxt is None:
            break
        lines.append(f"{os.path.relpath(files[node], os.path.join(SRC, '..'))}:{nxt[0]}")
        if nxt[1] == start:
            path.append(start)
            break
        path.append(nxt[1])
        seen.add(nxt[1])
        node = nxt[1]
    return " -> ".join(path) + f" (imports at {', '.join(lines)})"


def test_every_import_points_down_the_layers() -> None:
    problems = layer_violations()
    assert not problems, ("imports from a higher layer (metrics < core/profile < checks < callbacks < top level; "
                          "move the shared code down, or pass it in):\n" + "\n".join(problems))


def test_no_import_cycles() -> None:
    files, graph = import_graph()
    cycles = import_cycles()
    assert not cycles, ("modules that import each other, directly or through others (split the shared part "
                        "into a lower module):\n" + "\n".join(_cycle_path(c, graph, files) for c in cycles))


def test_the_graph_sees_every_kind_of_import(tmp_path: "os.PathLike[str]") -> None:
    pkg = os.path.join(str(tmp_path), PACKAGE)
    for sub in ("metrics", "core", "callbacks"):
        os.makedirs(os.path.join(pkg, sub))
        open(os.path.join(pkg, sub, "__init__.py"), "w").close()
    open(os.path.join(pkg, "__init__.py"), "w").close()
    with open(os.path.join(pkg, "metrics", "stats.py"), "w") as fh:
        fh.write("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lightwatch.core import a\n")
    with open(os.path.join(pkg, "core", "a.py"), "w") as fh:
        fh.write("def f():\n    from . import b\n")
    with open(os.path.join(pkg, "core", "b.py"), "w") as fh:
        fh.write("import importlib\nimport lightwatch.core.a\n"
                 "def g():\n    importlib.import_module('lightwatch.callbacks.x')\n")
    with open(os.path.join(pkg, "callbacks", "x.py"), "w") as fh:
        fh.write("from lightwatch.core import Alert\n")
    problems = layer_violations(str(tmp_path))
    assert len(problems) == 2, problems
    assert os.path.join(PACKAGE, "core", "b.py") + ":4: lightwatch.core.b (layer 1" in problems[0]
    assert "imports lightwatch.callbacks.x (layer 3" in problems[0]
    assert os.path.join(PACKAGE, "metrics", "stats.py") + ":3: " in problems[1]
    assert "`from lightwatch.core import a`" in problems[1]
    assert import_cycles(str(tmp_path)) == [["lightwatch.core.a", "lightwatch.core.b"]]


@pytest.mark.parametrize("module, layer", [("lightwatch", TOP), ("lightwatch.metrics.base", 0),
                                           ("lightwatch.core.checkpoint.store", 1), ("lightwatch.profile", 1),
                                           ("lightwatch.checks.data", 2), ("lightwatch.callbacks", 3),
                                           ("lightwatch.hydra", TOP), ("lightwatch.__main__", TOP),
                                           ("lightwatch.conf", None)])
def test_layer_of(module: str, layer: Optional[int]) -> None:
    assert layer_of(module) == layer
