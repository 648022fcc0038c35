"""The committed gRPC code is exactly what proto/ generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "tools" / "gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)

    generated = gen_proto.generate(tmp_path)
    assert generated, "no proto files were generated"
    for path in generated:
        committed = REPO / "dnet" / "proto" / path.name
        assert committed.exists(), f"{committed} is missing: run tools/gen_proto.py"
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} is stale: run `uv run python tools/gen_proto.py`")
