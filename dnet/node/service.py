"""A mesh node's gRPC services: the ring (its shard and its entry's token sink) and control.

This is the gRPC edge of dnet/node/host.py and node.py: requests in, typed errors turned into
replies or statuses here, nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from dnet import __version__
from dnet.node.control import FailureKind
from dnet.node.coordinator import LoadFailed
from dnet.node.host import NotPrepared, PrepareError
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.shard.service import ShardService

if TYPE_CHECKING:
    from dnet.node.node import Node

log = logging.getLogger(__name__)


class NodeRingService(ShardService):
    """The shard of the current plan (see ShardService), plus the entry's token sink."""

    def __init__(self, node: Node) -> None:
        super().__init__(lambda: node.host.runtime)
        self.node = node

    def Tokens(self, request_iterator: Iterator[pb.Token],
               context: grpc.ServicerContext) -> Iterator[pb.Empty]:
        for token in request_iterator:
            self.node.entry.deliver(token)
        return iter(())

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        node = self.node
        host = node.host
        runtime = host.runtime
        reply = node.coordinator_word()
        reply.MergeFrom(pb.HealthReply(
            role="node", model=host.plan.model if host.plan else "", version=__version__,
            node_id=node.node_id, epoch=host.epoch, leads_epoch=node.leads_epoch(),
            active_requests=runtime.active_requests if runtime else 0,
        ))
        if runtime is not None and runtime.ready:
            reply.layers.extend(runtime.stage.layers)
            reply.num_layers = runtime.stage.num_layers
            reply.hidden_size = runtime.stage.hidden_size
            reply.window = runtime.stage.window
        return reply


class ControlService(pb_grpc.ControlServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    def Measure(self, request: pb.MeasureRequest,
                context: grpc.ServicerContext) -> pb.DeviceInfo:
        remaining = context.time_remaining()
        info = self.node.device_info(request.model, timeout_s=remaining or 30.0)
        if info is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this device could not be measured")
        return info

    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.host.drain(request.timeout_s)
        return pb.Empty()

    def Prepare(self, request: pb.PlanRequest,
                context: grpc.ServicerContext) -> pb.PrepareReply:
        try:
            self.node.host.prepare(request)
        except PrepareError as exc:
            return pb.PrepareReply(ok=False, error=exc.message,
                                   failure=pb.FailureKind.Value(exc.kind.name))
        return pb.PrepareReply(ok=True)

    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.Empty:
        try:
            self.node.host.commit(request.epoch)
        except NotPrepared as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except PrepareError as exc:
            code = (grpc.StatusCode.RESOURCE_EXHAUSTED if exc.kind is FailureKind.OUT_OF_MEMORY
                    else grpc.StatusCode.FAILED_PRECONDITION)
            context.abort(code, exc.message)
        return pb.Empty()

    def Abort(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.node.host.abort(request.epoch)
        return pb.Empty()

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.NodeStatus:
        return self.node.status()

    def LoadModel(self, request: pb.LoadModelRequest,
                  context: grpc.ServicerContext) -> pb.PrepareReply:
        try:
            self.node.load_model(request.model)
        except LoadFailed as exc:
            return pb.PrepareReply(ok=False, error=str(exc),
                                   failure=pb.LOAD_ERROR)
        return pb.PrepareReply(ok=True)
