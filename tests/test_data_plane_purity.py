"""The data plane's decision modules stay pure, and the entry side imports no MLX.

Decisions are functions of plain data with the time passed in: they import nothing that does
I/O, concurrency, timing or tensor maths. The entry (and the frames it builds) runs next to
the HTTP layer, which must not load MLX.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.purity import imported_roots

REPO = Path(__file__).resolve().parent.parent
PURE_MODULES = ["dnet/ring/frames.py", "dnet/serving.py", "dnet/shard/decisions.py",
                "dnet/shard/trains.py", "dnet/entry/decisions.py", "dnet/prefix/index.py",
                "dnet/prefix/budget.py"]
FORBIDDEN = {"asyncio", "concurrent", "grpc", "httpx", "mlx", "mlx_lm", "multiprocessing",
             "queue", "selectors", "socket", "subprocess", "threading", "time", "zeroconf"}


@pytest.mark.parametrize("module", PURE_MODULES)
def test_decision_modules_import_nothing_impure(module: str) -> None:
    roots = imported_roots((REPO / module).read_text())
    assert not roots & FORBIDDEN, sorted(roots & FORBIDDEN)
    dnet_imports = _dnet_imports((REPO / module).read_text())
    assert dnet_imports <= {"dnet.proto", "dnet.ring.frames", "dnet.prefix.index"}, (
        dnet_imports)


def _dnet_imports(source: str) -> set[str]:
    return {node.module for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and node.module
            and node.module.startswith("dnet")}


def test_the_entry_and_frames_load_no_mlx() -> None:
    check = ("import sys, dnet.entry, dnet.ring.frames, dnet.ring.memory; "
             "assert not [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')], "
             "sorted(m for m in sys.modules if m.startswith('mlx'))")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
