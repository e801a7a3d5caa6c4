"""No function in faxd is longer than a screen and a half: the size limit of issue 16, which ruff
(C901 and PLR0915 in pyproject.toml cap branches and statements) has no rule for."""

from __future__ import annotations

import ast
from pathlib import Path

FAXD = Path(__file__).resolve().parent.parent / "faxd"
MAX_LINES = 80


def long_functions(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_LINES:
                found.append(f"{name}:{node.lineno}: {node.name} is {length} lines")
    return found


def test_no_function_in_faxd_is_over_80_lines() -> None:
    found = [
        problem
        for path in sorted(FAXD.rglob("*.py"))
        for problem in long_functions(path.read_text(), str(path.relative_to(FAXD.parent)))
    ]
    assert not found, "split these along their seams:\n" + "\n".join(found)


def test_a_long_function_is_found() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    assert long_functions(f"def f():\n{body}\n", "x.py") == [f"x.py:1: f is {MAX_LINES + 1} lines"]
    assert long_functions("def g():\n    return 1\n", "x.py") == []
