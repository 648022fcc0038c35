"""Helpers shared by the tests that keep pure packages pure."""

from __future__ import annotations

import ast


def imported_roots(source: str) -> set[str]:
    """The top-level packages a module imports (absolute imports only)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots
