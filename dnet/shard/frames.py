"""Frames as a shard sees them: checking one off the wire, and the rows of work it carries.

A frame carries either one request's step (its prompt chunk or one decode token), or, for a
train, one decode token per member request. Either way it is a list of rows, one per
request, that run through the shard's layers in one forward pass.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc

from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import codec


class FrameRejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Rows:
    """The requests a frame carries, with each one's KV position and input tokens."""

    request_ids: list[str]
    positions: list[int]
    tokens: list[list[int]]

    @property
    def tokens_per_row(self) -> int:
        return len(self.tokens[0])

    def select(self, keep: list[int]) -> Rows:
        return Rows([self.request_ids[i] for i in keep], [self.positions[i] for i in keep],
                    [self.tokens[i] for i in keep])


def rows_of(frame: pb.Frame) -> Rows:
    if frame.batch:
        return Rows(list(frame.batch), list(frame.batch_positions),
                    [[token] for token in frame.tokens])
    return Rows([frame.request_id], [frame.position], [list(frame.tokens)])


def check_frame(frame: pb.Frame, *, epoch: int, holds: bool, layers: list[int],
                vocab_size: int, hidden_size: int) -> None:
    """Raise FrameRejected unless the frame is well-formed for this shard."""

    def reject(code: grpc.StatusCode, message: str) -> None:
        raise FrameRejected(code, message)

    if not frame.request_id:
        reject(grpc.StatusCode.INVALID_ARGUMENT, "frame has no request_id")
    if frame.epoch != epoch:
        reject(grpc.StatusCode.FAILED_PRECONDITION,
               f"frame of plan epoch {frame.epoch}; this shard serves epoch {epoch}")
    if frame.kind == pb.RELEASE:
        return
    if not holds:
        reject(grpc.StatusCode.FAILED_PRECONDITION,
               f"this shard does not hold layer {frame.next_layer} (it holds {layers})")
    if not frame.tokens:
        reject(grpc.StatusCode.INVALID_ARGUMENT, "frame carries no tokens")
    rows = 1
    if frame.batch:
        rows = len(frame.batch)
        if len(frame.tokens) != rows or len(frame.batch_positions) != rows:
            reject(grpc.StatusCode.INVALID_ARGUMENT,
                   "a train needs one token and one position per member")
        if len(set(frame.batch)) != rows or any(p < 1 for p in frame.batch_positions):
            reject(grpc.StatusCode.INVALID_ARGUMENT,
                   "train members must be distinct requests past their prompt")
    if frame.next_layer == 0:
        bad = [t for t in frame.tokens if not 0 <= t < vocab_size]
        if bad:
            reject(grpc.StatusCode.INVALID_ARGUMENT,
                   f"token ids out of range 0..{vocab_size - 1}: {bad[:5]}")
        return
    try:
        codec.check(frame.hidden, hidden_size)
    except codec.TensorError as exc:
        raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    per_row = len(frame.tokens) // rows
    if frame.hidden.shape[0] != rows or frame.hidden.shape[1] != per_row:
        reject(grpc.StatusCode.INVALID_ARGUMENT,
               f"hidden states {list(frame.hidden.shape)} do not match {rows} row(s) of "
               f"{per_row} token(s)")


class RequestIds:
    """The request ids a shard has seen open, and those released recently (tombstones).

    Kept apart from the compute thread's tables because gRPC threads consult it: a frame
    that overtook its request's release must be dropped, not start a cache that never ends.
    """

    def __init__(self, tombstone_ttl_s: float) -> None:
        self._known: set[str] = set()
        self._released: dict[str, float] = {}
        self._ttl_s = tombstone_ttl_s
        self._lock = threading.Lock()

    def admit(self, frame: pb.Frame) -> bool:
        """False for a late frame of a released request; raises FrameRejected if unknown."""
        with self._lock:
            if frame.position == 0 and not frame.batch:
                # Opens the request, or starts a later round of it on a multi-round ring.
                if frame.request_id in self._released:
                    return False
                self._known.add(frame.request_id)
                return True
            members = list(frame.batch) or [frame.request_id]
            unknown = [m for m in members if m not in self._known and m not in self._released]
            if unknown:
                raise FrameRejected(grpc.StatusCode.NOT_FOUND, f"unknown request {unknown[0]}")
            return True

    def release(self, request_id: str) -> None:
        with self._lock:
            self._known.discard(request_id)
            self._released[request_id] = time.monotonic()

    def prune(self) -> None:
        now = time.monotonic()
        with self._lock:
            for request_id, when in list(self._released.items()):
                if now - when > self._ttl_s:
                    del self._released[request_id]
