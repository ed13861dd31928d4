"""Layering of ``src/plinius`` (issue 12): data flows down, no cycles, no private names shared.

Run as a script to print the import graph's cycles and the violations::

    python tests/test_layering.py

The graph is built from the source (``ast``), not by importing: every
``import`` and ``from ... import`` counts, also those inside functions (a lazy
import is still a dependency), except under ``if TYPE_CHECKING:``; ``importlib``
with a string (the lazy exports of ``plinius`` and ``plinius.counters``) is not
seen. Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``, so those
count too, except a module's own ancestors (a submodule importing from its
package is how packages work). A name is private when it starts with one underscore; taking one from
another module (``from x import _y``, or ``x._y`` on an imported module) is a
violation, unless ``_y`` is a private submodule of the importer's own package
or of one above it (``from . import _state``, ``from .. import _fsutil``).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "plinius"

# Violations in areas other engineers are cleaning up in parallel (issue 12).
# The integrator empties this list once their branches are merged; nothing in
# tee/, counters/, crypto, _fsutil, pmem or bench/_common belongs here.
KNOWN_ELSEWHERE: frozenset[str] = frozenset({})


def _modules() -> dict[str, tuple[Path, bool]]:
    mods: dict[str, tuple[Path, bool]] = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (f, is_pkg)
    return mods


MODULES = _modules()


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def _base(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <base> import ...`` in module ``name``."""
    if not node.level:
        return node.module or ""
    pkg = (name if is_pkg else name.rpartition(".")[0]).split(".")
    base = pkg[: len(pkg) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Each plinius module and the plinius modules importing it runs (see the docstring)."""
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in MODULES.items():
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = _base(name, is_pkg, node)
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
            if node.module is not None or len(subs) < len(node.names):
                targets.add(base)  # names taken from the module itself
            targets |= subs
        mine = _ancestors(name)
        graph[name] = {a for t in targets for a in _ancestors(t) if a in MODULES and a not in mine}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports() -> list[str]:
    """``"importer: source._name"`` for each private name taken from another module."""
    found: list[str] = []
    for name, (path, is_pkg) in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mine = _ancestors(name if is_pkg else name.rpartition(".")[0])
        bound: dict[str, str] = {}  # local name -> plinius module it refers to
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        bound[a.asname] = a.name
                continue
            base = _base(name, is_pkg, node)
            if base not in MODULES:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:
                    bound[a.asname or a.name] = sub
                if not _private(a.name):
                    continue
                if sub in MODULES and base in mine:
                    continue  # a private submodule of the importer's own package (or above)
                found.append(f"{name}: {base}.{a.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and _private(node.attr)
            ):
                module = bound[node.value.id]
                if f"{module}.{node.attr}" in MODULES and module in mine:
                    continue
                found.append(f"{name}: {module}.{node.attr}")
    return sorted(set(found))


def test_the_checks_see_what_they_look_for() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    # the package run by importing its submodule
    assert "plinius.tee._wire" in graph["plinius.counters.keyserver"]
    assert "plinius.tee" in graph["plinius.counters.keyserver"]
    assert "plinius.pmem" in graph["plinius.bench._common"]  # inside a function


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles among plinius modules:\n" + "\n".join(
        "  " + " <-> ".join(c) for c in found
    )


def test_no_private_names_across_modules() -> None:
    found = [v for v in private_imports() if v not in KNOWN_ELSEWHERE]
    assert not found, (
        "private names used outside their module (rename them, or move the helper "
        "to the module that uses it):\n" + "\n".join("  " + v for v in found)
    )


def test_the_allow_list_holds_only_live_violations() -> None:
    stale = sorted(KNOWN_ELSEWHERE - set(private_imports()))
    assert not stale, "fixed, remove from KNOWN_ELSEWHERE:\n" + "\n".join("  " + v for v in stale)


# The layers, lowest first (docs/ARCHITECTURE.md draws them). A module may import
# its own layer's modules and those of layers below, never one above. Within a
# layer the cycle check keeps the order honest.
LAYERS: list[tuple[str, ...]] = [
    (
        "plinius.errors",
        "plinius._magic",
        "plinius._hexutil",
        "plinius._runtime",
        "plinius._lazy",
        "plinius.limits",
        "plinius._workers",
    ),
    ("plinius._fsutil", "plinius.crypto", "plinius.pmem"),
    ("plinius.testing", "plinius.rng", "plinius.tee", "plinius.darknet"),
    ("plinius.counters", "plinius.data", "plinius.models"),
    ("plinius.mirror", "plinius.dcp", "plinius.replica"),
    ("plinius.dist",),
    ("plinius.train",),
    ("plinius.job", "plinius.standby"),
    ("plinius.integrations",),
    ("plinius.bench",),
    ("plinius.cli", "plinius.__main__"),
]


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the layer ``module`` belongs to."""
    best = (-1, -1)  # (prefix length, layer)
    for i, members in enumerate(LAYERS):
        for m in members:
            if (module == m or module.startswith(m + ".")) and len(m) > best[0]:
                best = (len(m), i)
    if best[1] < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[1]


def upward_imports() -> list[str]:
    """``"importer -> imported"`` for each import of a module in a higher layer."""
    graph = import_graph()
    return sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        if a != "plinius"
        for b in targets
        if b != "plinius" and layer_of(b) > layer_of(a)
    )


def test_every_module_has_a_layer() -> None:
    for m in MODULES:
        if m != "plinius":
            layer_of(m)


def test_the_layer_check_sees_an_upward_import() -> None:
    assert layer_of("plinius.mirror._file") == layer_of("plinius.mirror")
    assert layer_of("plinius.job") > layer_of("plinius.train") > layer_of("plinius.mirror")
    assert layer_of("plinius.cli.train") > layer_of("plinius.bench.demo")  # demo never imports cli


def test_nothing_imports_a_layer_above_it() -> None:
    found = upward_imports()
    assert not found, "imports of a higher layer:\n" + "\n".join("  " + v for v in found)


if __name__ == "__main__":
    graph = import_graph()
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges")
    print("cycles:", cycles(graph) or "none")
    print("upward imports:", upward_imports() or "none")
    print("private names across modules:")
    for v in private_imports():
        print("  " + v + ("  (allow-listed)" if v in KNOWN_ELSEWHERE else ""))
    sys.exit(0)
