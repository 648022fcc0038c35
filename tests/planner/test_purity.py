"""The planner stays pure: none of its modules imports MLX, networking or concurrency."""

from __future__ import annotations

from pathlib import Path

from tests.purity import imported_roots

FORBIDDEN = {"mlx", "mlx_lm", "grpc", "zeroconf", "socket", "threading", "asyncio"}
PLANNER_DIR = Path(__file__).resolve().parents[2] / "planner"


def test_planner_imports_nothing_impure() -> None:
    files = sorted(PLANNER_DIR.glob("*.py"))
    assert files
    for file in files:
        assert not imported_roots(file.read_text()) & FORBIDDEN, file.name
