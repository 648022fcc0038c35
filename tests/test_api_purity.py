"""The HTTP layer loads no MLX and uses no private mlx-lm names: `dnet status`, `dnet chat`
and anything that only speaks HTTP stay light, and mlx-lm upgrades cannot break it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.purity import imported_roots

DNET = Path(__file__).resolve().parents[1] / "dnet"
API_MODULES = sorted(p for p in (DNET / "api").glob("*.py"))


def test_importing_every_http_module_leaves_mlx_unloaded() -> None:
    names = [f"dnet.api.{p.stem}" for p in API_MODULES if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_no_http_module_imports_mlx() -> None:
    for path in API_MODULES:
        assert not imported_roots(path.read_text()) & {"mlx", "mlx_lm"}, path.name


def test_the_api_and_its_tokenizer_use_no_private_mlx_lm_name() -> None:
    for path in [*API_MODULES, DNET / "tokenizer.py", DNET / "sampling.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_lm"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path}: {private}"
