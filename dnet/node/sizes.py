"""Byte sizes for people, in and out: `--memory-budget 8GB` and "1.50 GiB". No MLX here, so
`dnet status` and `dnet chat` can use it without loading the compute stack.

Printing sizes has one home, the planner's `human_bytes` (its plans print them too); this
module reads them.
"""

from __future__ import annotations

import re

from planner.explain import human_bytes

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
          "tib": 1 << 40, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str) -> int:
    """'8GB' -> 8e9, '512MB' -> 512e6, '2GiB' -> 2*2**30, '1000' -> 1000 bytes.

    Raises ValueError for anything else."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 8GB, 512MB or 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(value: int | None) -> str:
    """1536 -> '1.50 KiB', for people; None reads as 0."""
    return human_bytes(value or 0)
