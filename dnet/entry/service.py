"""The entry's side of the Ring service: the tails' token streams, and health checks."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc

from dnet import __version__
from dnet.entry.inflight import Inflight
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc


class EntryService(pb_grpc.RingServicer):  # type: ignore[misc]  # generated untyped
    """An entry's token sink. It exists before the entry (whose address is the port it gets),
    so both share the entry's `Inflight` table."""

    def __init__(self, inflight: Inflight, model_name: str) -> None:
        self._inflight = inflight
        self.model_name = model_name

    def Tokens(self, request_iterator: Iterator[pb.Token],  # noqa: N802 - gRPC's name
               context: grpc.ServicerContext) -> Iterator[pb.Empty]:
        for token in request_iterator:
            self._inflight.deliver(token)
        return iter(())

    def Health(self, request: pb.HealthRequest,  # noqa: N802 - gRPC's name
               context: grpc.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(role="api", model=self.model_name, version=__version__,
                              active_requests=self._inflight.requests)


def local_address_towards(host: str) -> str:
    """The address of this machine on the route to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((socket.gethostbyname(host), 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
