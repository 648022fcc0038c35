"""The zero-config mesh across Linux network namespaces: one `dnet join` per namespace, each
with its own network stack and IPv4 address on a bridged test LAN, as on separate machines.

Discovery is real mDNS multicast crossing a bridge; the ring is real gRPC between addresses.
The test process stays in the root namespace and talks to the nodes from a client namespace
on the same LAN (`Host.call`, see tests/netns.py), so every HTTP request crosses the bridge
as it would from another machine.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import chat_prompt_ids, reference_tokens
from tests.mesh import LocalMesh, MeshNode, chat_token_ids, ring_covers, topology, wait_for
from tests.netns import Host, NetnsLan, namespaces, netns_lan
from tests.test_mesh import MAX_TOKENS, NUM_LAYERS, QUESTION, THREE_WAY, TWO_WAY

pytestmark = pytest.mark.slow  # starts real processes

FORMATION_S = 90  # starting three Python processes with mlx on two slow cores takes a while
REPLAN_S = 15
CHAT_S = 150  # backstop for `Host.call`; chat_token_ids itself times out after 120 s


@pytest.fixture
def lan() -> Iterator[NetnsLan]:
    with netns_lan(num_hosts=3) as lan:
        yield lan


@pytest.fixture
def mesh(lan: NetnsLan, qwen3_model: Path, tmp_path: Path) -> Iterator[LocalMesh]:
    # Depends on `lan`, so pytest stops the nodes (by pid) before the namespaces are deleted.
    mesh = LocalMesh(tmp_path, str(qwen3_model))
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture
def reference(qwen3_model: Path) -> list[int]:
    tokens = reference_tokens(qwen3_model, chat_prompt_ids(qwen3_model, QUESTION), MAX_TOKENS)
    assert len(set(tokens)) >= MAX_TOKENS // 3  # a degenerate answer would prove little
    return tokens


def client(lan: NetnsLan) -> Host:
    assert lan.client is not None
    return lan.client


def start_nodes(mesh: LocalMesh, lan: NetnsLan, budget: str,
                pin_host: bool = True) -> list[MeshNode]:
    """One node per host namespace, bound to that namespace's address (or, without
    `pin_host`, left to pick its address itself); node0 proposes."""
    return [mesh.add(f"node{i}", budget=budget, host=host.address, prefix=host.prefix,
                     propose=i == 0, pin_host=pin_host)
            for i, host in enumerate(lan.hosts)]


def wait_on_lan(lan: NetnsLan, mesh: LocalMesh, check: Any, timeout_s: float,
                what: str) -> dict[str, Any]:
    """tests.mesh.wait_for, polling the nodes from the client namespace."""
    return client(lan).call(wait_for, mesh, check, timeout_s, what, timeout_s=timeout_s + 30)


def chat_on_lan(lan: NetnsLan, node: MeshNode) -> list[int]:
    return client(lan).call(chat_token_ids, node, QUESTION, MAX_TOKENS, timeout_s=CHAT_S)


def assert_runs_in(node: MeshNode, host: Host) -> None:
    """`ip netns exec` replaced itself with the node: the Popen pid is the node, in `host`."""
    cmdline = Path(f"/proc/{node.process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"dnet.cli" in cmdline, cmdline
    assert node.process.pid in host.pids()


def test_three_namespaces_find_each_other_and_serve_identical_tokens(
        lan: NetnsLan, mesh: LocalMesh, reference: list[int]) -> None:
    nodes = start_nodes(mesh, lan, THREE_WAY)
    view = wait_on_lan(lan, mesh, ring_covers(NUM_LAYERS, size=3), FORMATION_S,
                       "a ring of three namespaces")
    # Each node is known to the others by its own namespace's address.
    assert sorted(n["address"] for n in view["nodes"]) == sorted(
        host.address for host in lan.hosts), view["nodes"]
    for node, host in zip(nodes, lan.hosts, strict=True):
        assert_runs_in(node, host)
    views = [client(lan).call(topology, node, timeout_s=30) for node in nodes]
    assert all(v is not None for v in views)
    assert len({(v["coordinator"], v["epoch"]) for v in views}) == 1, "one coordinator"
    for node in nodes:
        assert chat_on_lan(lan, node) == reference, node.name


def test_a_killed_member_is_replaced_across_namespaces(
        lan: NetnsLan, mesh: LocalMesh, reference: list[int]) -> None:
    nodes = start_nodes(mesh, lan, TWO_WAY)
    view = wait_on_lan(lan, mesh, lambda v: ring_covers(NUM_LAYERS)(v) and len(v["nodes"]) == 3,
                       FORMATION_S, "a ring with all three namespaces known")
    by_id = {node.node_id(): node for node in nodes}
    victim = next(by_id[i] for i in view["ring"] if i != view["coordinator"])
    gone = victim.node_id()
    mesh.kill(victim)  # SIGKILL by pid: no goodbye on mDNS, its namespace just goes quiet

    def replanned(v: dict[str, Any]) -> bool:
        return (ring_covers(NUM_LAYERS, excluding={gone})(v) and v["epoch"] > view["epoch"]
                and gone not in {n["id"] for n in v["nodes"]})

    wait_on_lan(lan, mesh, replanned, REPLAN_S, "a re-plan without the killed member")
    for node in mesh.live():
        assert chat_on_lan(lan, node) == reference, node.name


def test_teardown_stops_processes_and_removes_every_namespace() -> None:
    # A stray process in a host namespace (as if a node had been left running) must be
    # stopped by the teardown, and nothing of the LAN may remain.
    with netns_lan(num_hosts=1) as lan:
        host = lan.hosts[0]
        stray = subprocess.Popen([*host.prefix, sys.executable, "-c",
                                  "import time; time.sleep(300)"])
        # The client reaches the host across the bridge: nothing listens on port 9, so a
        # refused connection means the host's kernel answered.
        ping = subprocess.run([*client(lan).prefix, sys.executable, "-c",
                               f"import socket; socket.create_connection(('{host.address}', 9),"
                               " 3)"], capture_output=True, text=True, timeout=30)
        assert "ConnectionRefused" in ping.stderr, ping.stderr
        created = set(lan.created)
        assert created == {lan.switch, host.namespace, client(lan).namespace}
        assert created <= namespaces()
    assert stray.wait(timeout=10) == -9
    assert not created & namespaces()


def assert_advertised_lan_addresses(lan: NetnsLan, view: dict[str, Any]) -> None:
    """Each node goes by the address of its interface on the mesh's network."""
    assert sorted(n["address"] for n in view["nodes"]) == sorted(
        host.address for host in lan.hosts), view["nodes"]


def test_without_host_and_without_a_default_route_nodes_advertise_their_lan_address(
        lan: NetnsLan, mesh: LocalMesh, reference: list[int]) -> None:
    # The namespaces have no default route: this used to advertise 127.0.0.1.
    nodes = start_nodes(mesh, lan, THREE_WAY, pin_host=False)
    view = wait_on_lan(lan, mesh, ring_covers(NUM_LAYERS, size=3), FORMATION_S,
                       "a ring of three namespaces without --host")
    assert_advertised_lan_addresses(lan, view)
    for node in nodes:
        assert chat_on_lan(lan, node) == reference, node.name


def test_without_host_and_with_two_interfaces_nodes_advertise_the_shared_one(
        lan: NetnsLan, mesh: LocalMesh, reference: list[int]) -> None:
    # Each host's default route goes out of an uplink no peer can reach: this used to be
    # the address advertised, and no ring formed.
    uplinks = lan.add_uplinks()
    nodes = start_nodes(mesh, lan, TWO_WAY, pin_host=False)
    view = wait_on_lan(lan, mesh, lambda v: ring_covers(NUM_LAYERS)(v) and len(v["nodes"]) == 3,
                       FORMATION_S, "a ring across the shared network")
    assert_advertised_lan_addresses(lan, view)
    for node, uplink in zip(nodes, uplinks, strict=True):
        log = node.log.read_text()
        warnings = [line for line in log.splitlines() if "several network interfaces" in line]
        assert len(warnings) == 1, log  # once, naming both interfaces
        assert "dnet0" in warnings[0] and f"dnet1 {uplink}/24" in warnings[0]
    for node in nodes:
        assert chat_on_lan(lan, node) == reference, node.name
