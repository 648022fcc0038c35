"""The floor under a ring hop: a raw TCP message between two Python processes in two node
namespaces.

An echo server and a client that sends one message of a decode hop's size (with the data
plane's framing: a 4-byte length, then the bytes), waits for its echo, and repeats; half the
median round trip is the one-way cost of a message through Python and the kernel with
nothing else to do, which no Python data plane can beat. The socket options are the data
plane's own (dnet/ring/tcp.py), without the cluster-key hello.

    python tools/cluster_floor.py serve --listen HOST:PORT
    python tools/cluster_floor.py ping --target HOST:PORT --bytes N --count N
        -> one JSON line: {"rtt_ms": [...]} (warm-up round trips left out)
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

from dnet.ring.tcp import read_message, tune

WARMUP = 50
_LENGTH = struct.Struct(">I")


def serve(listen: str) -> None:
    host, port = listen.rsplit(":", 1)
    with socket.create_server((host, int(port))) as server:
        print("serving", flush=True)
        while True:
            connection, _ = server.accept()
            with connection, connection.makefile("rb") as reader:
                tune(connection)
                while (message := read_message(reader)) is not None:
                    connection.sendall(_LENGTH.pack(len(message)) + message)


def ping(target: str, size: int, count: int, timeout_s: float = 60.0) -> list[float]:
    """Round trips in ms of `count` messages of `size` bytes, after WARMUP unrecorded ones."""
    host, port = target.rsplit(":", 1)
    payload = _LENGTH.pack(size) + bytes(size)
    rtts = []
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock, \
            sock.makefile("rb") as reader:
        tune(sock)
        for i in range(WARMUP + count):
            started = time.perf_counter()
            sock.sendall(payload)
            if read_message(reader) is None:
                raise ConnectionError("the echo server closed the connection")
            if i >= WARMUP:
                rtts.append((time.perf_counter() - started) * 1000)
    return rtts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", required=True)
    c = sub.add_parser("ping")
    c.add_argument("--target", required=True)
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--count", type=int, default=500)
    args = p.parse_args(argv)
    if args.command == "serve":
        serve(args.listen)
    else:
        print(json.dumps({"rtt_ms": ping(args.target, args.bytes, args.count)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
