"""What reaches a shard's compute thread, and the sending side whose events feed it.

The compute thread takes one `Inbound` item at a time: a frame's typed message (a step or a
release, see `dnet.ring.frames`) or one of the control messages below. Link threads and gRPC
threads only post items; the compute thread alone acts on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import frames
from dnet.ring.frames import Message
from dnet.ring.links import TCP, LinkPool, StreamMethod, Transport
from dnet.shard.router import Router


@dataclass(frozen=True)
class LinkBroken:
    """The stream to the shard at `address` broke: what went that way is lost."""

    address: str
    reason: str


@dataclass(frozen=True)
class EntryGone:
    """The token stream to the entry at `address` broke: nobody reads its requests' tokens."""

    address: str
    reason: str


@dataclass(frozen=True)
class Rejected:
    """The next shard rejected a frame of `request_id` (a request or a train)."""

    request_id: str
    code: int  # a grpc.StatusCode value
    reason: str


@dataclass(frozen=True)
class Retarget:
    """Serve a new plan epoch with the same layers: drop every request, route anew."""

    router: Router
    epoch: int


@dataclass(frozen=True)
class PrefixCapacity:
    """Let the prefix cache hold `capacity_bytes` from now on (evicting down to it)."""

    capacity_bytes: int


@dataclass(frozen=True)
class Stop:
    """Leave the compute loop."""


Control = LinkBroken | EntryGone | Rejected | Retarget | PrefixCapacity | Stop
Inbound = Message | Control


class Outbox:
    """A shard's sending side: frames to shards, tokens to entries, never blocking.

    Link events (a rejected frame, a broken stream) come back as control messages through
    `post`, which queues them for the compute thread.
    """

    def __init__(self, post: Callable[[Inbound], None], transport: Transport = TCP) -> None:
        self._post = post
        self._frames = LinkPool(StreamMethod.FRAMES, self._on_status, self._on_frames_broken,
                               transport)
        self._tokens = LinkPool(StreamMethod.TOKENS, lambda _reply: None, self._on_tokens_broken,
                                transport)

    def frame(self, address: str, message: Message) -> None:
        self._frames.send(address, frames.to_wire(message))

    def token(self, address: str, token: pb.Token) -> None:
        self._tokens.send(address, token)

    def close(self) -> None:
        self._frames.close()
        self._tokens.close()

    def _on_status(self, status: pb.FrameStatus) -> None:
        self._post(Rejected(status.request_id, status.code, status.message))

    def _on_frames_broken(self, address: str, reason: str) -> None:
        self._post(LinkBroken(address, reason))

    def _on_tokens_broken(self, address: str, reason: str) -> None:
        self._post(EntryGone(address, reason))
