"""The package's shape: the library core never imports the application, and no two modules import each
other (directly or around a circle), counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
APPLICATION = ("lorakit.cli", "lorakit.train", "lorakit.analysis", "lorakit.integrations")


def _imports() -> dict[str, set[str]]:
    """module → the lorakit modules it imports (relative imports resolved; packages as their __init__)."""
    files = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (SRC / "lorakit").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import x` may name a module
                    found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorakit"):
                found.add(node.module)
        graph[mod] = {m for m in found if m in files and m != mod}
    return graph


def _is_app(mod: str) -> bool:
    return any(mod == a or mod.startswith(a + ".") for a in APPLICATION)


def test_the_core_never_imports_the_application():
    graph = _imports()
    core = [m for m in graph if not _is_app(m) and m not in ("lorakit.__main__",)]
    assert len(core) > 20
    bad = sorted((m, d) for m in core for d in graph[m] if _is_app(d))
    assert bad == []


def test_no_import_circles():
    graph = _imports()
    # a package's __init__ importing its own submodules is how packages export names, not a circle
    edges = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in graph.items()}
    circles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert circles == []
