"""The source stays readable: no function in src/ longer than 80 lines, from its `def` to its last line (issue 13)."""

from __future__ import annotations

import ast
from pathlib import Path

import lmdistill

SRC = Path(lmdistill.__file__).parent
LIMIT = 80


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > LIMIT
    ]
    assert not long, long
