"""The shape holds: import layers, no import cycles, the engine's size.

Read from the source (the AST), not from what happens to be imported at run time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("coordinator", "provider_link", "provider_sim", "provider_agent")

# Lowest first: a room may import its own and lower ones, never a higher one.
LAYERS: list[tuple[str, ...]] = [
    ("coordinator.untrusted", "coordinator.capabilities", "coordinator.errors",
     "coordinator.credentials", "coordinator.toolschema", "coordinator.metrics",
     "coordinator.lifecycle"),
    ("coordinator.protocol",),
    ("coordinator.sizes", "coordinator.wsio"),
    ("coordinator.config",),
    ("coordinator.accounts",),
    ("coordinator.descriptors",),
    ("coordinator.registry",),
    ("coordinator.providers",),
    ("coordinator.dispatch", "coordinator.cluster"),
    ("coordinator.api",),
    ("provider_link",),
    ("provider_sim", "provider_agent"),
    ("coordinator.app",),
    ("coordinator.loadgen", "coordinator.__main__", "coordinator"),
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _room(module: str) -> str:
    """The room a module belongs to: the longest name in LAYERS it falls under."""
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        if ".".join(parts[:size]) in RANK:
            return ".".join(parts[:size])
    raise AssertionError(f"{module} belongs to no layer: add its room to LAYERS")


def _imports(path: Path, *, top_level_only: bool) -> Iterator[str]:
    """The project modules ``path`` imports (``TYPE_CHECKING`` blocks left out)."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    for node in nodes:
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # ``from pkg import module`` imports the module; ``from pkg import name``, pkg.
            modules = [f"{base}.{alias.name}" for alias in node.names
                       if _is_module(f"{base}.{alias.name}")]
            names = modules if len(modules) == len(node.names) else [base, *modules]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and _is_module(name):
                yield name


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


SOURCES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for path in SOURCES:
        room = _room(_module(path))
        for imported in _imports(path, top_level_only=False):
            if RANK[_room(imported)] > RANK[room]:
                wrong.append(f"{_module(path)} -> {imported}")
    assert not wrong, "imports that run back up:\n" + "\n".join(wrong)


def test_there_are_no_import_cycles():
    graph = {_module(p): set(_imports(p, top_level_only=True)) for p in SOURCES}
    seen: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == module or target.startswith(module + "."):
                continue  # a package importing its own modules
            if seen.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in seen:
                visit(target, [*path, target])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _code_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines()
               if line.strip() and not line.strip().startswith("#"))


def test_the_engine_stays_small():
    """attempt.py and relay.py: the race and the relay, and nothing else (non-blank,
    non-comment lines). The pure decisions live in race.py."""
    engine = ROOT / "coordinator" / "dispatch"
    assert _code_lines(engine / "attempt.py") + _code_lines(engine / "relay.py") <= 300
