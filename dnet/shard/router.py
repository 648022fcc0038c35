"""Where a frame goes after this shard: the address of the shard that holds a given layer."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import grpc
import httpx

from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0


class RouteError(ConnectionError):
    """No reachable shard for the next layer."""


class Router(Protocol):
    def address_for(self, layer: int, head: str) -> str:
        """The address of the shard that runs `layer` next, for a request whose head shard
        (the holder of layer 0) is `head`; raises RouteError when there is none."""
        ...

    def forget(self, address: str) -> None:
        """The link to `address` broke: re-resolve it next time."""
        ...


class ManualRouter:
    """The seed's manual mode: every later layer goes to `-n`, the next shard in the ring.

    The last shard of the seed's ring names the API as its next hop (`-n localhost:8080`).
    The API is not a shard, so closing the ring means going to the shard holding layer 0,
    whose address every frame carries. Which of the two `-n` is gets probed once: a gRPC
    health check answers for a shard, an HTTP `/health` for a dnet API.
    """

    def __init__(self, next_address: str) -> None:
        self.next_address = next_address
        self._next_is_shard: bool | None = None
        self._lock = threading.Lock()

    def address_for(self, layer: int, head: str) -> str:
        with self._lock:
            if self._next_is_shard is None:
                self._next_is_shard = self._probe()
            next_is_shard = self._next_is_shard
        if next_is_shard:
            return self.next_address
        if not head:
            raise RouteError("the frame names no head shard to close the ring with")
        return head

    def forget(self, address: str) -> None:
        if address == self.next_address:
            with self._lock:
                self._next_is_shard = None

    def _probe(self) -> bool:
        # HTTP first: a gRPC server just drops an HTTP/1.1 request, while uvicorn would log
        # a gRPC preface as an invalid request.
        try:
            response = httpx.get(f"http://{self.next_address}/health", timeout=PROBE_TIMEOUT_S)
            if response.status_code == 200 and response.json().get("role") == "api":
                log.info("next hop %s is the API: the ring closes at the head shard",
                         self.next_address)
                return False
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("next hop %s is not an API: %s", self.next_address, exc)
        with auth.channel(self.next_address) as channel:
            try:
                reply = pb_grpc.RingStub(channel).Health(
                    pb.HealthRequest(), timeout=PROBE_TIMEOUT_S
                )
            except grpc.RpcError as exc:
                raise RouteError(f"next hop {self.next_address} is unreachable: "
                                 f"{exc.code().name}") from exc
        if reply.role != "shard":
            raise RouteError(f"next hop {self.next_address} is not a dnet shard")
        return True


class MeshRouter:
    """Mesh mode: the plan names the holder of every layer."""

    def __init__(self, owners: dict[int, str]) -> None:
        self.owners = owners

    def address_for(self, layer: int, head: str) -> str:
        address = self.owners.get(layer)
        if address is None:
            raise RouteError(f"the plan assigns layer {layer} to no node")
        return address

    def forget(self, address: str) -> None:
        """Nothing to re-resolve: the coordinator re-plans when a node goes."""
