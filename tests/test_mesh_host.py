"""EpochHost in-process, with a fake entry and fake runtimes: prepare never disturbs the
running ring, commit swaps, abort resumes, and a plan that moves nothing cuts nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dnet.node.control import FailureKind
from dnet.node.host import EpochHost, NotPrepared, PrepareError, ServedModel, failure_of
from dnet.proto import dnet_ring_pb2 as pb


@dataclass
class FakeEntry:
    calls: list[tuple] = field(default_factory=list)

    def pause(self) -> None:
        self.calls.append(("pause",))

    def drain(self, timeout_s: float) -> int:
        self.calls.append(("drain", timeout_s))
        return 0

    def resume(self, head: str, epoch: int) -> None:
        self.calls.append(("resume", head, epoch))


@dataclass
class FakeRuntime:
    layers: tuple[int, ...]
    epoch: int
    stopped: bool = False
    retargets: list[int] = field(default_factory=list)
    active_requests: int = 0
    stage: object = None
    ready: bool = True
    prefix_capacity: int | None = None
    prefix_stats: object = None

    def retarget(self, router, epoch: int) -> None:
        self.retargets.append(epoch)
        self.epoch = epoch

    def set_prefix_capacity(self, capacity_bytes: int) -> None:
        self.prefix_capacity = capacity_bytes

    def stop(self) -> None:
        self.stopped = True


class Loader:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.loaded: list[FakeRuntime] = []

    def __call__(self, model, layers, window, router, epoch) -> FakeRuntime:
        if self.fail is not None:
            raise self.fail
        runtime = FakeRuntime(layers, epoch)
        self.loaded.append(runtime)
        return runtime


def served(model: str) -> ServedModel:
    return ServedModel(model, tokenizer=None, max_context=4096, vocab_size=1024)


def plan(epoch: int, *members: tuple[str, list[int]], ring_epoch: int = 0,
         model: str = "m") -> pb.PlanRequest:
    return pb.PlanRequest(epoch=epoch, model=model, ring_epoch=ring_epoch or epoch, members=[
        pb.PlanMember(node_id=node_id, grpc_address=f"{node_id}:1", layers=layers, window=2)
        for node_id, layers in members])


def make_host(loader: Loader | None = None, checked: list | None = None,
              served_fn=served) -> tuple[EpochHost, FakeEntry, Loader]:
    entry, loader = FakeEntry(), loader or Loader()
    host = EpochHost("me", entry, load_runtime=loader, load_served=served_fn,
                     check_layers=lambda model, layers: (checked if checked is not None
                                                         else []).append((model, layers)))
    return host, entry, loader


def test_a_node_without_layers_loads_at_prepare_and_serves_at_commit() -> None:
    host, entry, loader = make_host()
    host.prepare(plan(1, ("me", [0, 1]), ("b", [2, 3])))
    assert [r.layers for r in loader.loaded] == [(0, 1)]
    assert host.runtime is None and host.plan is None, "nothing changes before the commit"
    host.commit(1)
    assert host.runtime is loader.loaded[0] and host.plan.epoch == 1
    assert entry.calls == [("resume", "me:1", 1)]
    assert host.served.name == "m"


def test_a_ring_member_only_checks_at_prepare_and_loads_at_commit() -> None:
    checked: list = []
    host, entry, loader = make_host(checked=checked)
    host.prepare(plan(1, ("me", [0, 1]), ("b", [2, 3])))
    host.commit(1)
    first = host.runtime
    host.prepare(plan(2, ("me", [0, 1, 2]), ("b", [3])))
    assert checked == [("m", (0, 1, 2))]
    assert not first.stopped and host.runtime is first, "the running ring is untouched"
    host.drain(10)
    host.commit(2)
    assert first.stopped and host.runtime.layers == (0, 1, 2)
    assert entry.calls[-3:] == [("pause",), ("drain", 10), ("resume", "me:1", 2)]


def test_same_layers_on_a_new_ring_are_retargeted_not_reloaded() -> None:
    host, _, loader = make_host()
    host.prepare(plan(1, ("me", [0, 1]), ("b", [2, 3])))
    host.commit(1)
    host.prepare(plan(2, ("me", [0, 1]), ("c", [2, 3])))
    host.commit(2)
    assert len(loader.loaded) == 1 and host.runtime.retargets == [2]


def test_a_plan_that_moves_nothing_keeps_the_ring_epoch_and_touches_nothing() -> None:
    host, entry, loader = make_host()
    host.prepare(plan(1, ("me", [0, 1]), ("b", [2, 3])))
    host.commit(1)
    # A newcomer left out: the plan epoch moves on, the frames' epoch stays.
    host.prepare(plan(2, ("me", [0, 1]), ("b", [2, 3]), ("new", []), ring_epoch=1))
    host.commit(2)
    assert len(loader.loaded) == 1 and host.runtime.retargets == []
    assert host.plan.epoch == 2 and host.runtime.epoch == 1
    assert entry.calls[-1] == ("resume", "me:1", 1)
    assert ("pause",) not in entry.calls


def test_a_failed_prepare_names_its_kind_and_leaves_the_running_plan_alone() -> None:
    host, _, _ = make_host()
    host.prepare(plan(1, ("me", [0, 1]), ("b", [2, 3])))
    host.commit(1)
    running = host.runtime

    def missing(model: str) -> ServedModel:
        raise FileNotFoundError(f"{model}: no such directory")

    host._load_served = missing
    with pytest.raises(PrepareError) as failed:
        host.prepare(plan(2, ("me", [0, 1]), ("b", [2, 3]), model="other"))
    assert failed.value.kind is FailureKind.LOAD_ERROR and "no such directory" in str(
        failed.value)
    assert host.runtime is running and not running.stopped and host.plan.epoch == 1
    with pytest.raises(NotPrepared):
        host.commit(2)


def test_out_of_memory_at_prepare_and_at_commit() -> None:
    host, _, _ = make_host(Loader(fail=MemoryError("cannot allocate")))
    with pytest.raises(PrepareError) as failed:
        host.prepare(plan(1, ("me", [0, 1])))
    assert failed.value.kind is FailureKind.OUT_OF_MEMORY
    host, _, loader = make_host()
    host.prepare(plan(1, ("me", [0, 1])))
    host.commit(1)
    loader.fail = RuntimeError("[metal::malloc] Attempting to allocate 9 GB")
    host.prepare(plan(2, ("me", [0])))
    with pytest.raises(PrepareError) as failed:
        host.commit(2)
    assert failed.value.kind is FailureKind.OUT_OF_MEMORY
    assert host.runtime is None, "a failed deferred load leaves no layers behind"


def test_abort_drops_what_was_prepared_and_resumes_the_running_plan() -> None:
    host, entry, loader = make_host()
    host.prepare(plan(1, ("me", [0, 1])))
    assert len(loader.loaded) == 1
    host.abort(1)
    assert loader.loaded[0].stopped and host.runtime is None
    with pytest.raises(NotPrepared):
        host.commit(1)
    host.prepare(plan(2, ("me", [0, 1])))
    host.commit(2)
    host.prepare(plan(3, ("me", [0]), ("b", [1])))
    host.drain(5)
    host.abort(3)
    assert entry.calls[-1] == ("resume", "me:1", 2), "the drained entry serves again"
    assert not host.runtime.stopped


def test_a_node_the_plan_leaves_without_layers_drops_them_at_commit() -> None:
    host, entry, _ = make_host()
    host.prepare(plan(1, ("me", [0, 1])))
    host.commit(1)
    runtime = host.runtime
    host.prepare(plan(2, ("b", [0, 1]), ("me", [])))
    assert not runtime.stopped
    host.commit(2)
    assert runtime.stopped and host.runtime is None
    assert entry.calls[-1] == ("resume", "b:1", 2)


def test_failure_kinds_of_exceptions() -> None:
    assert failure_of(MemoryError()) is FailureKind.OUT_OF_MEMORY
    assert failure_of(RuntimeError("CUDA out of memory")) is FailureKind.OUT_OF_MEMORY
    assert failure_of(ValueError("unsupported model type")) is FailureKind.LOAD_ERROR


def test_frames_of_the_coming_ring_wait_for_this_node_to_switch() -> None:
    """A member that commits first may send frames of the new ring while this node still loads
    its layers at commit: they wait for the switch rather than being refused."""
    import threading

    host, _, loader = make_host()
    host.prepare(plan(1, ("me", [0, 1]), ("b", [2, 3])))
    host.commit(1)
    first = host.runtime
    host.prepare(plan(2, ("me", [0]), ("b", [1, 2, 3])))  # new layers: loaded at commit
    assert host.runtime_for(1, timeout_s=0.0) is first  # the running ring's frames go on
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(host.runtime_for(2, timeout_s=30)))
    waiting.start()
    waiting.join(timeout=0.3)
    assert waiting.is_alive() and not got  # held while the node has not switched
    host.commit(2)
    waiting.join(timeout=5)
    assert got == [host.runtime] and host.runtime is loader.loaded[-1]
    assert host.runtime.epoch == 2
    host.prepare(plan(3, ("me", [0, 1]), ("b", [2, 3])))
    host.abort(3)
    assert host.runtime_for(3, timeout_s=5) is host.runtime  # an aborted switch waits no more
