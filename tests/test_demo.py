"""`dnet demo`, the README's first command, works with no arguments and no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts real processes


def test_demo_runs_a_ring_and_prints_a_completion(tmp_path: Path) -> None:
    env = {**os.environ, "DNET_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "dnet.cli", "demo", "--once"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Sample completion" in result.stdout
    assert "random weights" in result.stdout
    assert "/v1/chat/completions" in result.stdout
    assert any((tmp_path / "cache" / "models").iterdir())
