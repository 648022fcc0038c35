"""The prefix cache inside each node's memory budget: the planner fits weights and KV cache in
what a node does not set aside for it (`--prefix-cache-bytes`), and a node without the flag
sizes its cache from what the committed plan leaves free."""

from __future__ import annotations

import json

from dnet.node.host import EpochHost
from dnet.node.node import planned_bytes
from dnet.node.rollout import make_plan
from dnet.prefix.budget import DEFAULT_SHARE, default_capacity
from dnet.proto import dnet_ring_pb2 as pb
from planner import uniform_profile
from tests.discovery.strategies import peer_info
from tests.test_mesh_host import FakeEntry, Loader

MIB = 1 << 20
# 4 layers of 1 MiB, 1 MiB each for the embedding and the head, a little KV per token.
PROFILE = json.dumps(uniform_profile(
    name="m", num_layers=4, bytes_per_layer=MIB, flops_per_token_per_layer=2e6,
    kv_bytes_per_token_per_layer=16, embedding_bytes=MIB, head_bytes=MIB).to_dict())


def plan(budgets: dict[str, int], prefix: dict[str, int]) -> pb.PlanRequest:
    peers = [peer_info(node_id, memory_budget_bytes=budget, address=f"10.0.0.{i + 1}")
             for i, (node_id, budget) in enumerate(budgets.items())]
    devices = [pb.DeviceInfo(flops=1e11, disk_read_bytes_per_s=1e9, memory_budget_bytes=budget,
                             prefix_cache_bytes=prefix.get(node_id, 0),
                             model_profile_json=PROFILE)
               for node_id, budget in budgets.items()]
    return make_plan(peers, devices, model="m", epoch=1, coordinator=peers[0].node_id,
                     context_tokens=1024, running=None)


def test_the_planner_leaves_a_nodes_prefix_cache_free() -> None:
    # Alone, 8 MiB holds the whole model (6 MiB and its KV cache) ...
    alone = plan({"a": 8 * MIB}, {})
    assert [list(m.layers) for m in alone.members] == [[0, 1, 2, 3]]
    # ... but not with 4 MiB set aside for the prefix cache: a second node takes layers.
    shared = plan({"a": 8 * MIB, "b": 8 * MIB}, {"a": 4 * MIB, "b": 4 * MIB})
    held = {m.node_id: list(m.layers) for m in shared.members}
    assert held["a"] and held["b"]
    devices = {d["id"]: d for d in json.loads(shared.plan_json)["devices"]}
    for node_id in ("a", "b"):
        assert devices[node_id]["memory_budget_bytes"] == 4 * MIB
        assert devices[node_id]["memory_bytes"] <= 4 * MIB


def test_without_the_flag_the_cache_takes_what_the_plan_leaves_up_to_a_share() -> None:
    committed = plan({"a": 8 * MIB, "b": 64 * MIB}, {})
    for node_id, budget in (("a", 8 * MIB), ("b", 64 * MIB)):
        used = planned_bytes(committed, node_id, budget)
        assert 0 < used <= budget
        capacity = default_capacity(budget, used)
        assert capacity == min(budget // DEFAULT_SHARE, budget - used)
    # A plan that does not say what it fills leaves nothing to the cache.
    bare = pb.PlanRequest(epoch=1, model="m")
    assert default_capacity(8 * MIB, planned_bytes(bare, "a", 8 * MIB)) == 0


def test_every_commit_hands_the_plan_and_the_runtime_to_the_node() -> None:
    seen: list[tuple[int, object]] = []
    entry, loader = FakeEntry(), Loader()
    host = EpochHost("a", entry, load_runtime=loader, check_layers=lambda *_: None,
                     load_served=lambda model: None,
                     on_commit=lambda plan, runtime: seen.append((plan.epoch, runtime)))
    first = plan({"a": 64 * MIB}, {})
    host.prepare(first)
    host.commit(1)
    again = pb.PlanRequest()
    again.CopyFrom(first)
    again.epoch = 2  # the same layers: the runtime is kept, and sized again
    host.prepare(again)
    host.commit(2)
    assert seen == [(1, loader.loaded[0]), (2, loader.loaded[0])]
