"""The floor under a ring hop: a raw gRPC message between two node namespaces.

An echo server on a bidirectional stream, and a client that sends one message of a decode
hop's size, waits for its echo, and repeats; half the median round trip is the one-way cost
of a message through gRPC, Python and the kernel with nothing else to do. The channel and
server use the ring's own options (dnet/ring/links.py), without cluster-key signing.

    python tools/cluster_floor.py serve --listen HOST:PORT
    python tools/cluster_floor.py ping --target HOST:PORT --bytes N --count N
        -> one JSON line: {"rtt_ms": [...]} (warm-up round trips left out)
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from dnet.ring.links import CHANNEL_OPTIONS, SERVER_OPTIONS

METHOD = "/dnet.bench.Floor/Echo"
WARMUP = 50


def serve(listen: str, stop: threading.Event | None = None) -> None:
    def echo(requests: Iterator[bytes], _context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    handler = grpc.method_handlers_generic_handler("dnet.bench.Floor", {
        "Echo": grpc.stream_stream_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    print("serving", flush=True)
    (stop or threading.Event()).wait()


def ping(target: str, size: int, count: int, timeout_s: float = 60.0) -> list[float]:
    """Round trips in ms of `count` messages of `size` bytes, after WARMUP unrecorded ones."""
    payload = bytes(size)
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def requests() -> Iterator[bytes]:
        while (message := outbox.get()) is not None:
            yield message

    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        call = channel.stream_stream(METHOD)(requests(), timeout=timeout_s)
        replies = iter(call)
        rtts = []
        for i in range(WARMUP + count):
            started = time.perf_counter()
            outbox.put(payload)
            next(replies)
            if i >= WARMUP:
                rtts.append((time.perf_counter() - started) * 1000)
        outbox.put(None)
        call.cancel()
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
