"""Values the `dnet` command line takes: sizes, ports, counts, hosts. Each raises
argparse.ArgumentTypeError, so a bad value (from a flag or the environment) is a usage error:
exit 2 with argparse's usage line, never a traceback."""

from __future__ import annotations

import argparse
import json


def size(text: str) -> int:
    from dnet.node.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def port(text: str, lowest: int = 1) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not lowest <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is {lowest}..65535, not {port}")
    return port


def port_or_any(text: str) -> int:
    """A port, or 0 for any free one."""
    return port(text, lowest=0)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def host(text: str) -> str:
    """An IPv4 address, or a host name (e.g. localhost) resolved to one."""
    from discovery.mdns import resolve_ipv4

    try:
        return resolve_ipv4(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_layers(text: str) -> list[int]:
    """'[0,1,2,5]' (the seed's form), '0-2,5' or '0,1,2,5' -> [0, 1, 2, 5]."""
    text = text.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"bad layer list {text!r}: {exc}") from exc
        if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
            raise argparse.ArgumentTypeError(f"bad layer list {text!r}: expected integers")
        layers = values
    else:
        layers = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            start, sep, end = part.partition("-")
            if not start.isdigit() or (sep and not end.isdigit()):
                raise argparse.ArgumentTypeError(f"bad layer range {part!r}")
            layers.extend(range(int(start), int(end) + 1) if sep else [int(start)])
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}: empty, negative or repeated")
    return sorted(layers)
