"""Regenerate the committed gRPC code in dnet/proto/ from proto/*.proto.

Usage: uv run python tools/gen_proto.py [OUT_ROOT]
The test suite runs this into a temporary directory and checks the committed files match.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTOS = sorted((REPO / "proto").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Write dnet/proto/<name>_pb2*.py (and the message stubs <name>_pb2.pyi, for the type
    checker) under out_root; returns the files written."""
    (out_root / "dnet" / "proto").mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in PROTOS:
        # Mapping proto/ to the virtual path dnet/proto makes the generated imports absolute
        # (`from dnet.proto import x_pb2`), so the code works as part of the package.
        args = [
            "protoc",
            f"-Idnet/proto={REPO / 'proto'}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"dnet/proto/{proto.name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return sorted((out_root / "dnet" / "proto").glob("*_pb2*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    for path in generate(out):
        print(path)
