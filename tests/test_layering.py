"""The layers of service/ and models/ stay as docs/internals.md draws them.

Read from the source (ast), not by importing: a layer imports only the layers below it
(process → front-ends → inference_protocol → core → models), the two front-ends never import
each other, the transport-free layers import no web or RPC framework, modules form no import
cycle (imports under TYPE_CHECKING count: they are a cycle held apart), and no module imports
rnnserve's own code inside a function (the way a cycle is dodged).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT

# Package → rank; a module may import its own package and packages of a lower rank.
LAYERS: dict[str, int] = {
    "models": 0,
    "service.core": 1,
    "service.inference_protocol": 2,
    "service.http_api": 3,
    "service.grpc_api": 3,
    "service.process": 4,
}
# What the transport-free layers (and models) never import: web and RPC frameworks, wire code.
TRANSPORTS = (
    "fastapi",
    "starlette",
    "uvicorn",
    "httptools",
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "google.protobuf",
    "rnnserve_client",
)
TRANSPORT_FREE = ("models", "service.core", "service.inference_protocol")
FIRST_PARTY = ("service", "models")


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    imported: str  # module (or package) name
    line: int
    in_function: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_of(root: Path) -> list[Import]:
    """Every import statement of the .py files under root/service and root/models."""
    found: list[Import] = []
    modules = {
        module_name(p, root) for package in FIRST_PARTY for p in (root / package).rglob("*.py")
    }
    for package in FIRST_PARTY:
        for path in sorted((root / package).rglob("*.py")):
            importer = module_name(path, root)
            tree = ast.parse(path.read_text(), str(path))
            found += _imports(tree, importer, modules)
    return found


def _imports(tree: ast.Module, importer: str, modules: set[str]) -> list[Import]:
    found: list[Import] = []
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and not node.level:
            # `from package import module` imports the module; `from module import name` the module.
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        for name in names:
            found.append(Import(importer, name, node.lineno, id(node) in in_function))
    return found


def layer_of(name: str) -> str | None:
    """The layer package `name` belongs to (the longest match), None outside every layer."""
    matches = [package for package in LAYERS if _within(name, package)]
    return max(matches, key=len) if matches else None


def violations(root: Path) -> list[str]:
    """Every import that breaks a rule of the module docstring, as `importer:line: why`."""
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for imp in imports_of(root):
        where = f"{imp.importer}:{imp.line}"
        first_party = any(_within(imp.imported, p) for p in FIRST_PARTY)
        own, theirs = layer_of(imp.importer), layer_of(imp.imported)
        if first_party:
            graph.setdefault(imp.importer, set()).add(imp.imported)
            if imp.in_function:
                problems.append(f"{where}: imports {imp.imported} inside a function")
            if own is None or theirs is None:
                if imp.imported != "service" and own is not None:
                    problems.append(f"{where}: imports {imp.imported}, which is in no layer")
            elif own != theirs and LAYERS[theirs] >= LAYERS[own]:
                problems.append(f"{where}: {own} imports {imp.imported} ({theirs}: not below)")
        elif own in TRANSPORT_FREE and any(_within(imp.imported, t) for t in TRANSPORTS):
            problems.append(f"{where}: {own} is transport-free but imports {imp.imported}")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first search)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_layers_import_only_downward_without_cycles() -> None:
    assert violations(ROOT) == []


def test_every_service_module_is_in_a_layer() -> None:
    for path in (ROOT / "service").rglob("*.py"):
        name = module_name(path, ROOT)
        assert name == "service" or layer_of(name) is not None, name


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_catches_each_kind_of_violation(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "models/__init__.py": "",
            "models/net.py": "import service.core.engine\n",
            "service/__init__.py": "",
            "service/core/__init__.py": "",
            "service/core/engine.py": "from service.http_api import app\nimport fastapi\n",
            "service/http_api/__init__.py": "",
            "service/http_api/app.py": "from service.grpc_api import server\n",
            "service/grpc_api/__init__.py": "",
            "service/grpc_api/server.py": "def start():\n    from service.http_api import app\n",
        },
    )
    problems = "\n".join(violations(tmp_path))
    assert "models.net:1: models imports service.core.engine" in problems
    assert "service.core.engine:1: service.core imports service.http_api.app" in problems
    assert "transport-free but imports fastapi" in problems
    assert "service.http_api.app:1: service.http_api imports service.grpc_api.server" in problems
    assert "service.grpc_api.server:2: imports service.http_api.app inside a function" in problems
    assert "import cycle: " in problems
    assert "service.grpc_api.server -> service.http_api.app" in problems
