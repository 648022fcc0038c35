"""The type checker (mypy, strict, configured in pyproject.toml) passes on the pure packages
and the data plane's modules."""

from __future__ import annotations

import os
from pathlib import Path

from mypy import api

REPO = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_errors() -> None:
    cwd = Path.cwd()
    os.chdir(REPO)  # mypy reads its configuration and file list from pyproject.toml
    try:
        stdout, stderr, status = api.run([])
    finally:
        os.chdir(cwd)
    assert status == 0, stdout + stderr
    assert "Success" in stdout, stdout
