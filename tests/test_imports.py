"""The library never imports its commands, and no two packages import each other (README, Architecture).

Every `import` statement in `src/lmdistill` counts, at module level or inside a function. A node of the graph is a
top-level module or package of lmdistill (`losses`, `init`, `rationales`, ...), except that each module of
`lmdistill.commands` and `lmdistill.cli` is a node of its own: commands may call each other, the library may call
none of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmdistill

SRC = Path(lmdistill.__file__).parent
COMMANDS = ("commands", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The lmdistill modules a file imports (`from lmdistill.x import y` counts as lmdistill.x and lmdistill.x.y)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from ..x import y` inside package a.b names a.x
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "lmdistill" or name.startswith("lmdistill.")}


def node(module: str) -> str | None:
    """The graph node of a module: its top-level package, or the module itself inside the commands."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    if parts[0] in COMMANDS:
        return ".".join(parts[:2])
    return parts[0]


def edges() -> dict[str, set[str]]:
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        source = node(module_name(path))
        for target in imported(path):
            while target not in modules and "." in target:  # `from lmdistill.x import name` names no module
                target = target.rpartition(".")[0]
            target_node = node(target)
            if source and target_node and target_node != source:
                graph.setdefault(source, set()).add(target_node)
    return graph


def is_command(name: str) -> bool:
    return name.split(".")[0] in COMMANDS


def test_library_modules_never_import_commands():
    pairs = [(a, b) for a, targets in edges().items() for b in targets]
    wrong = sorted(f"{a} -> {b}" for a, b in pairs if not is_command(a) and is_command(b))
    assert not wrong, wrong


def test_no_package_level_import_cycle():
    graph = edges()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_walk_sees_imports_inside_functions():
    # cli.py imports each command inside the function that runs it
    assert "commands.init" in edges()["cli"]
