"""The zero-config mesh on loopback: real `dnet join` processes, real mDNS on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from discovery.identity import new_node_id
from dnet.local_ring import free_port
from tests.conftest import chat_prompt_ids, reference_tokens
from tests.mesh import LocalMesh, chat_token_ids, ring_covers, wait_for

pytestmark = pytest.mark.slow  # starts real processes

NUM_LAYERS = 8
MAX_TOKENS = 12
QUESTION = "What is 2+2?"
# With 4096 tokens of KV cache reserved per layer, the generated 8-layer model needs about
# 9 MB on one node: 4 MB budgets need three nodes, 6 MB budgets two.
THREE_WAY = "4MB"
TWO_WAY = "6MB"



@pytest.fixture
def reference(qwen3_model: Path) -> list[int]:
    tokens = reference_tokens(qwen3_model, chat_prompt_ids(qwen3_model, QUESTION), MAX_TOKENS)
    assert len(set(tokens)) >= MAX_TOKENS // 3
    return tokens


def test_three_nodes_find_each_other_and_serve_identical_tokens(mesh: LocalMesh,
                                                                reference: list[int]) -> None:
    nodes = [mesh.add(f"node{i}", budget=THREE_WAY, propose=i == 0) for i in range(3)]
    view = wait_for(mesh, ring_covers(NUM_LAYERS, size=3), 90, "a ring of three nodes")
    assert len({n["id"] for n in view["nodes"]}) == 3
    # Every node sees the same coordinator and epoch.
    views = [httpx.get(f"{n.url}/v1/topology", timeout=5).json() for n in nodes]
    assert len({(v["coordinator"], v["epoch"]) for v in views}) == 1
    for node in nodes:
        assert chat_token_ids(node, QUESTION, MAX_TOKENS) == reference, node.name
    models = httpx.get(f"{nodes[1].url}/v1/models", timeout=5).json()["data"]
    assert [m["id"] for m in models] == [mesh.model]
    wrong = httpx.post(f"{nodes[2].url}/v1/chat/completions", timeout=10, json={
        "model": "some/other-model", "messages": [{"role": "user", "content": "hi"}]})
    assert wrong.status_code == 404
    assert wrong.json()["error"]["code"] == "model_not_found"


def test_killed_members_are_replaced_within_15_s(mesh: LocalMesh,
                                                 reference: list[int]) -> None:
    for i in range(4):
        mesh.add(f"node{i}", budget=TWO_WAY, propose=i == 0)
    view = wait_for(mesh, ring_covers(NUM_LAYERS), 90, "a ring")
    by_id = {node.node_id(): node for node in mesh.nodes}

    # First a ring member that is not the coordinator, then the coordinator.
    victim = next(by_id[i] for i in view["ring"] if i != view["coordinator"])
    for round_ in ("member", "coordinator"):
        if round_ == "coordinator":
            victim = by_id[view["coordinator"]]
        gone = victim.node_id()
        killed_at = time.monotonic()
        mesh.kill(victim)
        view = wait_for(mesh, lambda v, gone=gone, epoch=view["epoch"]: (
            ring_covers(NUM_LAYERS, excluding={gone})(v) and v["epoch"] > epoch
            and gone not in {n["id"] for n in v["nodes"]}), 15, f"a re-plan without the {round_}")
        assert time.monotonic() - killed_at <= 15
        assert view["coordinator"] != gone
        for node in mesh.live():
            assert chat_token_ids(node, QUESTION, MAX_TOKENS) == reference, node.name


def test_a_fourth_node_is_in_the_next_plan(mesh: LocalMesh, reference: list[int]) -> None:
    for i in range(3):
        mesh.add(f"node{i}", budget=THREE_WAY, propose=i == 0)
    first = wait_for(mesh, ring_covers(NUM_LAYERS, size=3), 90, "a ring of three")
    # A roomier newcomer: the best plan now runs on it (fewer hops).
    newcomer = mesh.add("big", budget="64MB", propose=False)
    view = wait_for(mesh, lambda v: ring_covers(NUM_LAYERS)(v) and v["epoch"] > first["epoch"]
                    and newcomer.node_id() in v["ring"], 60, "a plan with the newcomer")
    assert view["coordinator"] == first["coordinator"], "a newcomer must not unseat it"
    assert chat_token_ids(newcomer, QUESTION, MAX_TOKENS) == reference


def test_two_nodes_with_the_same_id_end_up_distinct(mesh: LocalMesh, tmp_path: Path) -> None:
    shared = new_node_id()  # as on a cloned machine: the same persisted id twice
    nodes = []
    for name in ("clone-a", "clone-b"):
        port = free_port()
        (tmp_path / name).mkdir()
        (tmp_path / name / f"node-{port}.id").write_text(shared)
        nodes.append(mesh.add(name, budget="64MB", propose=name == "clone-a", grpc_port=port))

    def distinct(view: dict) -> bool:
        return len({n["id"] for n in view["nodes"]}) == 2 and view["epoch"] >= 1

    wait_for(mesh, distinct, 60, "two distinct node ids")
    ids = {node.node_id() for node in nodes}
    assert len(ids) == 2 and shared in ids, "exactly one of the clones takes a new id"
