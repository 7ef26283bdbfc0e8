"""The package's import graph has no circle, and the broker's HTTP adapters sit on its core.

Every ``import`` counts, also one inside a function: a deferred import hides a circle from
the interpreter, not from a reader (the broker's service and HTTP adapters once imported each
other that way). Imports under ``if TYPE_CHECKING:`` do not: they name types for the checker
and never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sidecar"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except the body of ``if TYPE_CHECKING:`` blocks (their else branch runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _is_type_checking(node):
            assert isinstance(node, ast.If)
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: Path) -> set[str]:
    """Every module that ``path`` (module ``name``) imports when it runs, in the package or not."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            # ``from pkg import module`` imports the module.
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return targets


def _files() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    files = _files()
    return {
        name: {t for t in _imports(name, path) if t in files and t != name}
        for name, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_finder_sees_a_circle() -> None:
    """The check can fail: a two-module circle is reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_type_checking_imports_are_not_edges() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hidden\n"
        "else:\n    import shown\ndef f():\n    import deferred\n"
    )
    names = {a.name for n in _runtime_nodes(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names == {"shown", "deferred"}


def test_no_import_circle_in_the_package() -> None:
    graph = _graph()
    assert "sidecar.broker.core" in graph["sidecar.broker.http_app"]
    assert _cycles(graph) == []


def test_broker_http_adapters_import_the_core_not_the_runtime() -> None:
    graph = _graph()
    assert "sidecar.broker.service" not in graph["sidecar.broker.http_app"]
    assert "sidecar.broker.service" not in graph["sidecar.broker.core"]
    assert "sidecar.broker.http_app" not in graph["sidecar.broker.core"]


#: What the JOSE layer may import from the package: itself and the error root. Fetching keys,
#: logging and TLS live above it (``sidecar.jwks_source``), so the verifiers stay pure.
JOSE_MAY_IMPORT = ("sidecar.jose", "sidecar.errors")
#: Modules that mean I/O or a clock read; the JOSE layer gets its clock and its data passed in.
IO_MODULES = {"aiohttp", "asyncio", "grpc", "http", "os", "pathlib", "socket", "ssl", "time"}


def test_the_whole_package_is_walked() -> None:
    files = _files()
    assert {"sidecar", "sidecar.jose.jwks", "sidecar.jwks_source", "sidecar.authz.core"} <= set(
        files
    )
    assert all(name == "sidecar" or name.startswith("sidecar.") for name in files)


def test_jose_does_no_io_and_imports_nothing_above_it() -> None:
    offenders = {}
    for name, path in _files().items():
        if name != "sidecar.jose" and not name.startswith("sidecar.jose."):
            continue
        imports = _imports(name, path)
        bad = {t for t in imports if t.split(".")[0] in IO_MODULES}
        bad |= {
            t
            for t in imports
            if t.startswith("sidecar")
            and not any(t == p or t.startswith(p + ".") for p in JOSE_MAY_IMPORT)
        }
        if bad:
            offenders[name] = sorted(bad)
    assert offenders == {}
