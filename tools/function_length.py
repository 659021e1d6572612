"""Fails on a function longer than MAX_LINES lines (TIGER_STYLE's limit, issue
21): `python tools/function_length.py DIR...`, run by `make lint`. A
function's length is from its `def` line to its last line, decorators and
nested functions included."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 70


def too_long(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                out.append(f"{path}:{node.lineno}: {node.name} is {lines} lines (at most {MAX_LINES})")
    return out


def main(roots: list[str]) -> int:
    assert roots, "name the directories to check"
    found = [line for root in roots for path in sorted(Path(root).rglob("*.py")) for line in too_long(path)]
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
