"""The pure discovery modules import nothing that does I/O, concurrency or timing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.purity import imported_roots

DISCOVERY_DIR = Path(__file__).resolve().parents[2] / "discovery"
PURE_MODULES = ["identity.py", "peers.py", "election.py", "txt.py", "addresses.py"]
FORBIDDEN = {
    "asyncio",
    "grpc",
    "mlx",
    "mlx_lm",
    "multiprocessing",
    "selectors",
    "socket",
    "subprocess",
    "threading",
    "time",
    "zeroconf",
    "concurrent",
}


def discovery_imports(source: str) -> set[str]:
    """The discovery modules a module imports, e.g. {"peers"} for `from discovery.peers ...`."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("discovery.")
        ):
            modules.add(node.module.split(".")[1])
    return modules


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_nothing_impure(module: str) -> None:
    source = (DISCOVERY_DIR / module).read_text()
    assert not imported_roots(source) & FORBIDDEN
    # Purity is transitive: a pure module may only lean on other pure modules.
    assert {f"{name}.py" for name in discovery_imports(source)} <= set(PURE_MODULES)


def test_checker_sees_forbidden_imports() -> None:
    source = "import socket\nfrom threading import Thread\nimport zeroconf.asyncio\n"
    assert imported_roots(source) >= {"socket", "threading", "zeroconf"}


def test_mdns_is_the_only_io_module() -> None:
    modules = {path.name for path in DISCOVERY_DIR.glob("*.py")} - {"__init__.py"}
    assert modules - set(PURE_MODULES) == {"mdns.py"}
