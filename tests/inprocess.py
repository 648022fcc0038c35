"""An in-process ring: real shard runtimes and a real entry, wired in memory (or over gRPC).

`InProcessRing` loads a real `Stage` per shard (a generated model, any layer lists: 1, 2 or
3 shards, multi-round), runs a real `ShardRuntime` for each and a real `RingEntry` in front,
and connects them through a `dnet.ring.memory.MemoryNetwork`: the request path (entry, head,
middle, tail, release, replay after a shard dies) runs in one process, without sockets, and
every frame still goes through the same services, parsing and serialization as on the wire.

    with InProcessRing(model_dir, [[0, 1, 2, 3], [4, 5, 6, 7]]) as ring:
        tokens = ring.complete([1, 2, 3], max_tokens=8)       # token ids, as mlx-lm gives
        ring.kill(1); ring.replan()                            # shard 1 dies; a new ring

With `grpc=True` the members listen on loopback ports instead (gRPC for control, the TCP
data plane for frames and tokens, as real nodes), so tests that address them by host:port
(health checks, raw frames) work unchanged; `serve_http()` adds the HTTP API in a thread.
Routing is the mesh's: every member knows which address holds which layer, and each `replan`
is a new plan epoch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dnet.entry import EntryService, Inflight, RingEntry, RingError, Timeouts
from dnet.local_ring import free_port
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring.links import TCP, Transport, start_server
from dnet.ring.memory import MemoryNetwork
from dnet.shard.router import MeshRouter
from dnet.shard.runtime import ShardRuntime
from dnet.shard.service import ShardService
from dnet.stage import Stage

ENTRY = "entry"


def sampling(prompt_tokens: int, max_tokens: int, **fields: Any) -> pb.SamplingParams:
    """Greedy sampling params for a completion of `max_tokens` tokens, ignoring EOS."""
    return pb.SamplingParams(max_tokens=max_tokens, max_context=prompt_tokens + max_tokens,
                             **fields)


@dataclass
class Member:
    """One shard of the ring: its layers, runtime and address."""

    layers: list[int]
    address: str
    runtime: ShardRuntime
    server: grpc.Server | None = None
    alive: bool = True


@dataclass
class InProcessRing:
    model_dir: Path
    layer_lists: list[list[int]]
    grpc: bool = False  # members talk gRPC on loopback instead of in memory
    windows: list[int | None] | None = None  # prefetch window per shard (None: all resident)
    kv_cap_bytes: int | None = 1 << 30
    prefix_cache_bytes: int | None = None  # each shard's prefix cache (None: the default)
    kv_ttl_s: float = 300.0
    recover: bool = False  # replay requests the ring fails on the next epoch (mesh mode)
    max_requests: int = 64
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(first_token_s=60,
                                                                 next_token_s=60, replan_s=30))
    prefill_chunk: int | None = None
    network: MemoryNetwork = field(default_factory=MemoryNetwork)
    members: list[Member] = field(default_factory=list)
    epoch: int = 0  # the plan epoch; each replan() makes the next
    _generation: int = 0
    _entry: RingEntry | None = None
    _entry_server: grpc.Server | None = None
    _http: Any = None  # the uvicorn server of serve_http()
    _http_thread: threading.Thread | None = None
    url: str = ""  # the HTTP API's base URL, once serve_http() runs

    # ----- lifecycle -------------------------------------------------------------------

    def start(self) -> InProcessRing:
        try:
            for i, layers in enumerate(self.layer_lists):
                self.members.append(self._start_member(i, layers))
            self._retarget_all()
            self._entry = self._start_entry()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._http is not None and self._http_thread is not None:
            self._http.should_exit = True
            self._http_thread.join(timeout=10)
            self._http = None
        if self._entry is not None:
            self._entry.close()
        if self._entry_server is not None:
            self._entry_server.stop(grace=None)
        members = self.live()
        for member in members:  # links first, so no member sees the others go
            member.runtime.stop()
        for member in members:
            self._stop_member(member)

    def __enter__(self) -> InProcessRing:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def transport(self) -> Transport:
        return TCP if self.grpc else self.network

    @property
    def entry(self) -> RingEntry:
        assert self._entry is not None, "the ring is not started"
        return self._entry

    @property
    def model(self) -> str:
        """The model's name, as the shards and the API report it."""
        return str(self.model_dir)

    @property
    def head(self) -> str:
        return next(m.address for m in self.live() if 0 in m.layers)

    @property
    def shard_addresses(self) -> list[str]:
        return [m.address for m in self.live()]

    def live(self) -> list[Member]:
        return [m for m in self.members if m.alive]

    def runtimes(self) -> list[ShardRuntime]:
        return [m.runtime for m in self.live()]

    # ----- requests ------------------------------------------------------------------

    async def tokens(self, prompt: list[int], params: pb.SamplingParams) -> list[pb.Token]:
        return [token async for token in self.entry.generate(prompt, params)]

    def complete(self, prompt: list[int], max_tokens: int, **fields: Any) -> list[int]:
        """The token ids of one completion (EOS ignored); raises RingError if it fails."""
        tokens = asyncio.run(self.tokens(prompt, sampling(len(prompt), max_tokens, **fields)))
        return [t.token for t in tokens]

    def complete_many(self, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
        """Several completions at once (they ride trains); each one's token ids."""
        async def all_of() -> list[list[pb.Token]]:
            return await asyncio.gather(*[self.tokens(p, sampling(len(p), n))
                                          for p, n in zip(prompts, lengths, strict=True)])
        return [[t.token for t in tokens] for tokens in asyncio.run(all_of())]

    def stream(self, prompt: list[int], max_tokens: int, **fields: Any
               ) -> AsyncIterator[pb.Token]:
        return self.entry.generate(prompt, sampling(len(prompt), max_tokens, **fields))

    def active(self) -> list[int]:
        """Open requests on each live shard, in ring order."""
        return [m.runtime.active_requests for m in self.live()]

    def wait_idle(self, timeout_s: float = 15.0) -> None:
        """Wait until no shard holds a request's KV cache (fails the test otherwise)."""
        wait_for(lambda: not any(self.active()) and not self.entry.active_requests, timeout_s,
                 "every shard has dropped every request")

    # ----- failures and plan changes ---------------------------------------------------

    def kill(self, index: int) -> None:
        """Shard `index` dies: the streams to it break and it computes no more."""
        member = self.members[index]
        member.alive = False
        self._stop_member(member)

    def replan(self, layer_lists: list[list[int]] | None = None) -> None:
        """A new plan epoch, as a mesh coordinator makes one: dead members are replaced by
        new ones with the same layers (or the ring takes `layer_lists`), every member serves
        the new epoch, and the entry resumes on it."""
        self.entry.pause()
        self.epoch += 1
        if layer_lists is not None:
            for member in self.live():
                member.alive = False
                self._stop_member(member)
            self.layer_lists = layer_lists
        kept = {tuple(m.layers) for m in self.live()}
        for i, layers in enumerate(self.layer_lists):
            if tuple(layers) not in kept:
                self.members.append(self._start_member(i, layers))
        self._retarget_all()
        self.entry.resume(self.head, self.epoch)

    # ----- HTTP --------------------------------------------------------------------------

    def serve_http(self, *, max_context: int | None = None, api_key: str | None = None) -> str:
        """Serve the HTTP API for this ring on a loopback port, in a thread; its base URL."""
        import uvicorn

        from dnet.api.app import HttpOptions, create_app
        from dnet.api.server import RingBackend
        from dnet.tokenizer import load_chat_tokenizer

        backend = RingBackend(str(self.model_dir), self.model_dir, self.entry,
                              load_chat_tokenizer(self.model_dir), max_context)
        app = create_app(backend, options=HttpOptions(api_key=api_key), extra_health=lambda: {
            "head": self.head, "token_sink": self.entry.address})
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self._http = uvicorn.Server(config)
        self._http_thread = threading.Thread(target=self._http.run, daemon=True, name="http")
        self._http_thread.start()
        wait_for(lambda: self._http.started, 30, "the HTTP server listens")
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    # ----- internals -------------------------------------------------------------------

    def _address(self) -> str:
        self._generation += 1
        return f"127.0.0.1:{free_port()}" if self.grpc else f"shard{self._generation}"

    def _start_member(self, index: int, layers: list[int]) -> Member:
        window = self.windows[index] if self.windows else None
        address = self._address()
        runtime = ShardRuntime(lambda: Stage(self.model_dir, layers, window=window),
                               MeshRouter({}), model_name=str(self.model_dir),
                               kv_ttl_s=self.kv_ttl_s, epoch=self.epoch,
                               kv_cap_bytes=self.kv_cap_bytes, transport=self.transport,
                               prefix_cache_bytes=self.prefix_cache_bytes)
        runtime.start()
        member = Member(list(layers), address, runtime)
        service = ShardService(runtime)
        if self.grpc:
            host, port = address.rsplit(":", 1)
            member.server, _ = start_server(service, host, int(port))
        else:
            self.network.serve(address, service)
        return member

    def _stop_member(self, member: Member) -> None:
        if member.server is not None:
            member.server.stop(grace=None).wait(timeout=10)
            member.server = None
        else:
            self.network.kill(member.address)
        member.runtime.stop()

    def _retarget_all(self) -> None:
        owners = {layer: m.address for m in self.live() for layer in m.layers}
        for member in self.live():
            member.runtime.retarget(MeshRouter(dict(owners)), self.epoch)

    def _start_entry(self) -> RingEntry:
        inflight = Inflight()
        service = EntryService(inflight, str(self.model_dir))
        if self.grpc:
            self._entry_server, port = start_server(service, "127.0.0.1", 0)
            address = f"127.0.0.1:{port}"
        else:
            address = ENTRY
            self.network.serve(address, service)
        options = {} if self.prefill_chunk is None else {"prefill_chunk": self.prefill_chunk}
        return RingEntry(self.head, address=address, epoch=self.epoch, recover=self.recover,
                         max_requests=self.max_requests, timeouts=self.timeouts,
                         transport=self.transport, inflight=inflight, **options)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """A bounded wait that fails the test instead of hanging."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting until {what}")
        time.sleep(0.02)


async def failure_of(source: AsyncIterator[pb.Token]) -> RingError:
    """Consume `source` until it raises RingError, and return that error."""
    try:
        async for _ in source:
            pass
    except RingError as exc:
        return exc
    raise AssertionError("the request did not fail")
