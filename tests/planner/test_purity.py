"""The planner stays pure: none of its modules imports MLX, networking or concurrency."""

from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN = {"mlx", "mlx_lm", "grpc", "zeroconf", "socket", "threading", "asyncio"}
PLANNER_DIR = Path(__file__).resolve().parents[2] / "planner"


def imported_roots(source: str) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_planner_imports_nothing_impure() -> None:
    files = sorted(PLANNER_DIR.glob("*.py"))
    assert files
    for file in files:
        assert not imported_roots(file.read_text()) & FORBIDDEN, file.name
