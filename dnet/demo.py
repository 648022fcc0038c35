"""`dnet demo`: a local ring on a generated model, with no network and no arguments."""

from __future__ import annotations

import signal
import threading
import time

import httpx
from rich.console import Console
from rich.table import Table

from dnet.local_ring import LocalRing, RingStartError, even_split, free_port, port_is_free
from dnet.model_files import format_layers
from dnet.modelgen import ModelSpec, cached_model, default_cache_dir

DEMO_SPEC = ModelSpec(arch="qwen3", dtype="bfloat16", num_layers=12, hidden_size=256,
                      intermediate_size=512, num_heads=8, num_kv_heads=4, vocab_size=1024)
DEMO_QUESTION = "What is 2+2?"


def _port(preferred: int) -> int:
    return preferred if port_is_free(preferred) else free_port()


def run_demo(shards: int = 2, http_port: int = 8080, grpc_port: int = 50501,
             serve: bool = True) -> int:
    console = Console()
    if shards < 1 or shards > DEMO_SPEC.num_layers:
        console.print(f"[red]--shards must be between 1 and {DEMO_SPEC.num_layers}")
        return 2
    console.print(f"Generating the demo model in {default_cache_dir()} (once) ...")
    model = cached_model(DEMO_SPEC)
    split = even_split(DEMO_SPEC.num_layers, shards)
    grpc_ports = [_port(grpc_port + i) for i in range(shards)]
    ring = LocalRing(str(model), split, http_port=_port(http_port), grpc_ports=grpc_ports,
                     log_dir=model.parent / "demo-logs")
    console.print(f"Starting {shards} shards and the API on 127.0.0.1 ...")
    try:
        ring.start(timeout_s=120)
    except RingStartError as exc:
        console.print(f"[red]The demo ring did not start: {exc}")
        return 1
    try:
        _show(console, ring, model)
        if serve:
            console.print("\nServing until Ctrl-C.")
            _wait_for_ctrl_c()
    finally:
        ring.stop()
    return 0


def _show(console: Console, ring: LocalRing, model: object) -> None:
    table = Table(title="Ring (manual mode, loopback)")
    table.add_column("shard")
    table.add_column("address")
    table.add_column("layers")
    for i, (address, layers) in enumerate(zip(ring.shard_addresses, ring.layer_lists,
                                              strict=True)):
        table.add_row(str(i), address, format_layers(layers))
    console.print(table)
    console.print(f"Model: {model}")
    console.print("[yellow]The demo model has random weights: its answers are gibberish by "
                  "design. Point `dnet shard`/`dnet api` at a real model for real text.")
    started = time.perf_counter()
    response = httpx.post(f"{ring.url}/v1/chat/completions", timeout=120, json={
        "model": "default_model", "max_tokens": 24,
        "messages": [{"role": "user", "content": DEMO_QUESTION}]})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    answer = response.json()
    console.print(f"\nSample completion for {DEMO_QUESTION!r} "
                  f"({answer['usage']['completion_tokens']} tokens in {elapsed:.2f} s):")
    console.print(repr(answer["choices"][0]["message"]["content"]))
    console.print(f"\nEndpoint: {ring.url}/v1/chat/completions")
    console.print(f"Try: curl -X POST {ring.url}/v1/chat/completions "
                  "-H 'Content-Type: application/json' "
                  "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], "
                  "\"max_tokens\": 20}'")


def _wait_for_ctrl_c() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
