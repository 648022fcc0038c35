"""A Node and its Membership built in-process, with fakes, started never: what a node
answers before and without a ring (the same 503 on every endpoint), how it treats adverts of
another cluster, which address it goes by."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from discovery.addresses import Interface
from discovery.identity import cluster_id
from dnet.node.api import create_node_app
from dnet.node.control import UnavailableKind
from dnet.node.membership import Addressing, Membership
from dnet.node.node import JoinOptions, Node
from dnet.node.service import ControlService
from dnet.proto import dnet_ring_pb2 as pb
from tests.discovery.strategies import peer_info
from tests.test_mesh_rollout import MIB, InProcessMesh, Loader

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"prompt": "hi", "max_tokens": 4}


def build_node(tmp_path: Path, mesh: InProcessMesh, **options) -> Node:
    node = Node(JoinOptions(host="127.0.0.1", state_dir=tmp_path, memory_budget_bytes=MIB,
                            **options),
                addressing=Addressing(pinned=True), control=mesh, load_runtime=Loader(),
                health=lambda info: None)
    mesh.add(node.node_id, budget=MIB)  # what the fake control client measures
    return node


def generating_answers(node: Node) -> list[tuple[int, dict]]:
    client = TestClient(create_node_app(node))
    return [(r.status_code, r.json()) for r in (
        client.post("/v1/chat/completions", json=CHAT),
        client.post("/v1/completions", json=COMPLETION),
        client.post("/v1/chat/completions", json={**CHAT, "stream": True}))]


def test_a_node_answers_status_before_it_starts(tmp_path: Path) -> None:
    node = build_node(tmp_path, InProcessMesh())
    status = ControlService(node).Status(pb.StatusRequest(), None)
    assert status.node_id == node.node_id and not status.ready and status.epoch == 0
    health = node.coordinator_word()
    assert not health.unavailable


def test_without_a_coordinator_or_a_model_every_endpoint_says_why(tmp_path: Path) -> None:
    node = build_node(tmp_path, InProcessMesh())
    verdict = node.unavailable()
    assert verdict.kind is UnavailableKind.NO_COORDINATOR
    node.coordinator.step()  # alone: it coordinates, and nobody proposed a model
    verdict = node.unavailable()
    assert verdict.kind is UnavailableKind.NO_MODEL
    for status, body in generating_answers(node):
        assert status == 503
        assert body["error"]["type"] == "server_error"
        assert body["error"]["message"] == verdict.message and "dnet load" in verdict.message


def test_a_model_that_fits_nowhere_is_the_same_503_everywhere(tmp_path: Path) -> None:
    from tests.test_mesh_rollout import MODEL, Clock

    mesh = InProcessMesh()
    node = build_node(tmp_path, mesh, model=MODEL)
    clock = Clock()
    node.coordinator._clock = clock
    node.coordinator._listening_from = clock.now
    node.coordinator.step()
    clock.now += 5  # past the quiet period and the listening after the start
    node.coordinator.step()
    verdict = node.unavailable()
    assert verdict.kind is UnavailableKind.CANNOT_PLAN and "bytes" in verdict.message
    answers = generating_answers(node)
    assert {status for status, _ in answers} == {503}
    assert {body["error"]["message"] for _, body in answers} == {verdict.message}
    assert {body["error"]["type"] for _, body in answers} == {"server_error"}
    # A node that is not the coordinator says the same: it takes the coordinator's word.
    word = node.coordinator_word()
    assert word.unavailable == verdict.message
    assert word.unavailable_kind == pb.CANNOT_PLAN


def test_shutting_down_refuses_new_requests(tmp_path: Path) -> None:
    node = build_node(tmp_path, InProcessMesh())
    node.shut_down()
    for status, body in generating_answers(node):
        assert status == 503 and "shutting down" in body["error"]["message"]


# ----- membership ------------------------------------------------------------------------------


def membership(me_address: str = "127.0.0.1", addressing: Addressing | None = None,
               changes: list | None = None, addresses: list | None = None) -> Membership:
    me = peer_info("aaaaaaaaaaaa", address=me_address, cluster_id=cluster_id("key"))
    return Membership(me, host=None, id_path=Path("/nonexistent"),
                      on_id_change=lambda new: None,
                      addressing=addressing or Addressing(pinned=True),
                      on_change=lambda: (changes if changes is not None else []).append(1),
                      on_address_change=lambda a: (addresses if addresses is not None
                                                   else []).append(a))


def test_another_cluster_is_logged_once_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    members = membership()
    stranger = peer_info("bbbbbbbbbbbb", name="their-node", cluster_id=cluster_id("other"))
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            members.on_add(stranger)
        members.on_add(peer_info("cccccccccccc", cluster_id=cluster_id("other")))
    lines = [r for r in caplog.records if "another cluster key" in r.getMessage()]
    assert len(lines) == 1 and "their-node" in lines[0].getMessage()
    assert members.states() == []
    assert list(members.other_clusters()) == [cluster_id("other")]


def test_peers_become_healthy_on_health_replies_and_changes_are_reported() -> None:
    changes: list = []
    members = membership(changes=changes)
    peer = peer_info("bbbbbbbbbbbb", cluster_id=cluster_id("key"))
    members.on_add(peer)
    assert changes and members.healthy_states() == []
    reply = pb.HealthReply(node_id=peer.node_id, epoch=3, leads_epoch=3, unavailable="x")
    members.apply_health([(peer, reply)], 1.0)
    assert [s.info.node_id for s in members.healthy_states()] == [peer.node_id]
    assert members.health_of(peer.node_id).unavailable == "x"
    members.apply_health([(peer, None)], 2.0)
    members.apply_health([(peer, None)], 3.0)
    assert members.healthy_states() == []
    members.on_remove(peer.instance)
    assert members.states() == [] and members.health_of(peer.node_id) is None


def test_the_address_follows_the_network_the_peers_are_on() -> None:
    wan = Interface("eth0", "192.168.7.5", 24)  # the default route's
    lan = Interface("dnet0", "10.213.5.2", 24)  # the one the mesh is on
    addresses: list[str] = []
    members = membership(me_address=wan.address, addresses=addresses, addressing=Addressing(
        pinned=False, interfaces=(wan, lan, Interface("lo", "127.0.0.1", 8)),
        default_route=wan.address))
    members.on_add(peer_info("bbbbbbbbbbbb", address="10.213.5.9", cluster_id=cluster_id("key")))
    assert members.me.address == lan.address and addresses == [lan.address]


def test_the_topology_shows_a_node_left_out_and_why(tmp_path: Path) -> None:
    from dnet.node.api import build_topology
    from tests.test_mesh_rollout import MODEL, Clock

    mesh = InProcessMesh()
    node = build_node(tmp_path, mesh, model=MODEL)
    mesh.nodes[node.node_id].readable = set()  # this machine lacks the model's files
    clock = Clock()
    node.coordinator._clock = clock
    node.coordinator._listening_from = clock.now
    node.coordinator.step()
    clock.now += 5
    node.coordinator.step()
    view = build_topology(node)
    me = view["nodes"][0]
    assert me["excluded"]["failure"] == "load error" and me["excluded"]["failures"] == 1
    assert "not a directory here" in me["excluded"]["reason"]
    assert 0 < me["excluded"]["retry_in_s"] <= 2
    assert view["unavailable"].startswith(f"no node can run {MODEL}: ")
    assert me["coordinator"] and me["healthy"] and view["ring"] == []
