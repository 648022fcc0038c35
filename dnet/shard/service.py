"""The Ring gRPC service of a shard, and the process that runs one."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from dnet import __version__
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring.frames import FrameRejected, Status
from dnet.ring.links import start_server
from dnet.shard.router import ManualRouter
from dnet.shard.runtime import ShardRuntime
from dnet.stage import Stage

log = logging.getLogger(__name__)

_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
NO_LAYERS = "this node holds no layers in the current plan"


def grpc_code(status: Status) -> grpc.StatusCode:
    return _GRPC_CODES[int(status)]


class ShardService(pb_grpc.RingServicer):  # type: ignore[misc]  # generated untyped
    """Frames and releases go to the shard's runtime; a mesh node swaps runtimes per plan."""

    def __init__(self, runtime: ShardRuntime | Callable[[], ShardRuntime | None]) -> None:
        self._runtime = runtime if callable(runtime) else (lambda: runtime)

    @property
    def runtime(self) -> ShardRuntime | None:
        return self._runtime()

    def runtime_for(self, epoch: int) -> ShardRuntime | None:
        """The runtime to hand a frame of plan `epoch` (a mesh node may be switching rings)."""
        return self.runtime

    def _accept(self, frame: pb.Frame) -> None:
        runtime = self.runtime_for(frame.epoch)
        if runtime is None:
            raise FrameRejected(Status.FAILED_PRECONDITION, NO_LAYERS)
        runtime.accept(frame)

    def Forward(self, request: pb.Frame, context: grpc.ServicerContext) -> pb.Empty:
        try:
            self._accept(request)
        except FrameRejected as exc:
            context.abort(grpc_code(exc.code), exc.message)
        return pb.Empty()

    def Frames(self, request_iterator: Iterator[pb.Frame],
               context: grpc.ServicerContext) -> Iterator[pb.FrameStatus]:
        for frame in request_iterator:
            try:
                self._accept(frame)
            except FrameRejected as exc:
                log.warning("rejected a frame of %s from %s: %s",
                            frame.request_id, context.peer(), exc.message)
                yield pb.FrameStatus(request_id=frame.request_id, code=int(exc.code),
                                     message=exc.message)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.Empty:
        runtime = self.runtime
        if runtime is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_LAYERS)
            return pb.Empty()  # not reached: abort raises
        runtime.release(request.request_id, request.propagate)
        return pb.Empty()

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        runtime = self.runtime
        if runtime is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_LAYERS)
            return pb.HealthReply()  # not reached: abort raises
        stage = runtime.stage
        return pb.HealthReply(
            role="shard", model=runtime.model_name, layers=stage.layers,
            num_layers=stage.num_layers, active_requests=runtime.active_requests,
            version=__version__, hidden_size=stage.hidden_size, window=stage.window,
        )


def run_shard(model: str, model_dir: Path, layers: list[int], host: str, port: int,
              next_address: str, window: int | None, kv_ttl_s: float,
              stop: threading.Event, kv_cap_bytes: int | None = None,
              prefix_cache_bytes: int | None = None) -> None:
    """Load the layers, serve the ring until `stop` is set."""
    runtime = ShardRuntime(lambda: Stage(model_dir, layers, window=window),
                           ManualRouter(next_address), model_name=model, kv_ttl_s=kv_ttl_s,
                           kv_cap_bytes=kv_cap_bytes, prefix_cache_bytes=prefix_cache_bytes)
    runtime.start()
    server, bound = start_server(ShardService(runtime), host, port)
    log.info("shard ready on %s:%d, layers %s, next hop %s", host, bound, layers, next_address)
    try:
        stop.wait()
    finally:
        server.stop(grace=1).wait()
        runtime.stop()
