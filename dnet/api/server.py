"""The seed's API process: HTTP in front, the ring's first shard behind."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import uvicorn

from discovery.mdns import resolve_ipv4
from dnet.api.app import HttpOptions, create_app
from dnet.api.tokenizer import ChatTokenizer
from dnet.entry import (
    DEFAULT_MAX_REQUESTS,
    PREFILL_CHUNK,
    EntryService,
    Inflight,
    RingEntry,
    Timeouts,
    local_address_towards,
)
from dnet.model_files import read_config, resolve_metadata
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring.links import listen_socket, start_server
from dnet.serving import accepts_model, context_tokens

log = logging.getLogger(__name__)

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


class RingBackend:
    """A model served by a ring, seen from one entry node."""

    def __init__(self, model_name: str, model_dir: Path, entry: RingEntry,
                 tokenizer: ChatTokenizer, max_context: int | None = None) -> None:
        config = read_config(model_dir)
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.vocab_size = int(config["vocab_size"])
        self.max_context = max_context or context_tokens(config)
        self.entry = entry

    def accepts_model(self, name: str | None) -> bool:
        return accepts_model(self.model_name, name)

    async def ensure_available(self) -> None:
        """A manual ring is always there to try; a dead shard is a 503 from the request."""

    def generate(self, prompt: list[int], sampling: pb.SamplingParams) -> AsyncIterator[pb.Token]:
        return self.entry.generate(prompt, sampling)


def split_address(address: str, default_port: int) -> tuple[str, int]:
    """'host:port', ':port', 'host' or '[v6]:port' -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    return host, int(port)


def run_api(model: str, listen: str, first_shard: str, *, max_context: int | None = None,
            timeouts: Timeouts | None = None, max_requests: int = DEFAULT_MAX_REQUESTS,
            prefill_chunk: int = PREFILL_CHUNK, http: HttpOptions | None = None,
            load_tokenizer: Callable[[Path], ChatTokenizer]) -> None:
    """Serve the API; `load_tokenizer` builds the model's tokenizer (dnet.tokenizer's
    `load_chat_tokenizer`: it loads MLX, which this package does not import)."""
    host, port = split_address(listen, 8080)
    bind = "0.0.0.0" if host in WILDCARDS else resolve_ipv4(host)
    # Bound first and exclusively: a taken port ends the process at once (PortInUse).
    http_socket = listen_socket(bind, port)
    model_dir = resolve_metadata(model)
    # The token sink listens first: the entry's address is the port it gets.
    inflight = Inflight()
    server, sink_port = start_server(EntryService(inflight, model), bind, 0)
    shard_host, _ = split_address(first_shard, 50501)
    advertised = local_address_towards(shard_host) if host in WILDCARDS else bind
    entry = RingEntry(first_shard, address=f"{advertised}:{sink_port}", inflight=inflight,
                      timeouts=timeouts or Timeouts(), max_requests=max_requests,
                      prefill_chunk=prefill_chunk)
    backend = RingBackend(model, model_dir, entry, load_tokenizer(model_dir), max_context)
    app = create_app(backend, options=http, extra_health=lambda: {"head": first_shard,
                                                                  "token_sink": entry.address})
    log.info("API on http://%s:%d, first shard %s, token sink %s", host or "0.0.0.0", port,
             first_shard, entry.address)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[http_socket])
    finally:
        server.stop(grace=1)
        entry.close()
