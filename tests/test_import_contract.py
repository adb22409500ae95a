"""The dependency directions of docs/DESIGN-NOTES.md ("One house"), checked on every import
statement of the product, at module level and inside functions alike.

The folders at the root are mapped into ``corolla.*`` by pyproject, so the walk maps each file to
its module name itself (tools that resolve ``corolla.node`` by path see only ``corolla/``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "corolla": "corolla",
    "verify": "corolla.verify",
    "node": "corolla.node",
    "ledger": "corolla.ledger",
    "client": "corolla.client",
    "simulations": "corolla.simulations",
}
BASE = ("corolla.errors", "corolla.version")

# Each layer: the module prefix it covers, and the prefixes it may import (besides BASE and
# itself). The most specific prefix of a module decides its layer.
ALLOWED: dict[str, tuple[str, ...]] = {
    "corolla.errors": (),
    "corolla.version": (),
    "corolla.verify": (),
    "corolla.node.model": ("corolla.verify",),
    "corolla.node.protocol": ("corolla.verify",),
    "corolla.node": ("corolla.verify", "corolla.ledger.api"),
    "corolla.ledger.api": ("corolla.verify",),
    "corolla.ledger": ("corolla.verify",),
    "corolla.client": (
        "corolla.verify",
        "corolla.node.model",
        "corolla.node.protocol",
        "corolla.ledger.api",
    ),
    "corolla.simulations": (
        "corolla.verify",
        "corolla.node",
        "corolla.ledger",
        "corolla.client",
    ),
    "corolla": ("corolla",),  # the command root (cli, demo) wires everything together
}


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [FOLDERS[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _product_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """Every corolla module ``path`` imports: (line, module), relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from corolla.node import span` imports corolla.node.span
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "corolla"]


def _layer(module: str) -> str:
    candidates = [p for p in ALLOWED if module == p or module.startswith(p + ".")]
    return max(candidates, key=len)


def _is_module(name: str) -> bool:
    rest = name.partition(".")[2]
    parts = rest.split(".") if rest else []
    top = {v: k for k, v in FOLDERS.items()}
    for depth in range(len(parts), -1, -1):
        prefix = ".".join(["corolla", *parts[:depth]])
        if prefix in top:
            path = ROOT / top[prefix] / Path(*parts[depth:])
            return path.with_suffix(".py").exists() or (path / "__init__.py").exists()
    return False


def _graph() -> dict[str, list[tuple[int, str]]]:
    graph = {}
    for path in _product_files():
        module = _module_name(path)
        graph[module] = [(line, name) for line, name in _imports(path, module) if _is_module(name)]
    return graph


def test_every_import_runs_along_the_allowed_directions():
    wrong = []
    for module, imports in _graph().items():
        layer = _layer(module)
        allowed = (*BASE, layer, *ALLOWED[layer])
        for line, name in imports:
            if name == "corolla" and module != "corolla":
                wrong.append(f"{module}:{line} imports the root package (use corolla.version)")
                continue
            if not any(name == p or name.startswith(p + ".") for p in allowed):
                wrong.append(f"{module}:{line} imports {name}")
    assert not wrong, "imports against the directions:\n" + "\n".join(wrong)


def test_no_package_imports_another_that_imports_it_back():
    layers: dict[str, set[str]] = {}
    for module, imports in _graph().items():
        for _, name in imports:
            if _layer(name) != _layer(module):
                layers.setdefault(_layer(module), set()).add(_layer(name))
    for layer, uses in layers.items():
        for other in uses:
            assert layer not in layers.get(other, set()), f"{layer} <-> {other}"


def test_no_module_import_loop():
    graph = {m: {n for _, n in imports if n != m} for m, imports in _graph().items()}
    # a package's __init__ importing its own submodules is not a loop of ideas
    edges = {
        m: {n for n in ns if n in graph and not m.startswith(n + ".")} for m, ns in graph.items()
    }
    state: dict[str, int] = {}
    loop: list[str] = []

    def visit(module: str, path: list[str]) -> bool:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                loop.extend([*path[path.index(nxt) :], nxt] if nxt in path else [module, nxt])
                return True
            if nxt not in state and visit(nxt, [*path, nxt]):
                return True
        state[module] = 2
        return False

    for module in sorted(edges):
        if module not in state and visit(module, [module]):
            break
    assert not loop, "import loop: " + " -> ".join(loop)


@pytest.mark.parametrize(
    ("module", "name", "expected"),
    [
        ("corolla.verify.tickets", "corolla.ledger.store", False),
        ("corolla.ledger.fraud", "corolla.node.model.span", False),
        ("corolla.client.session", "corolla.ledger.api.client", True),
        ("corolla.client.session", "corolla.ledger.rules", False),
        ("corolla.node.server", "corolla.client.session", False),
    ],
)
def test_the_contract_itself_tells_right_from_wrong(module, name, expected):
    layer = _layer(module)
    allowed = (*BASE, layer, *ALLOWED[layer])
    assert any(name == p or name.startswith(p + ".") for p in allowed) is expected
