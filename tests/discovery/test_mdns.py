"""Advertising and browsing over loopback: several zeroconf instances bound to 127.0.0.1 in one
process. Nothing here touches the machine's real network interfaces."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import pytest
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

from discovery import mdns
from discovery.identity import SERVICE_TYPE, new_node_id
from discovery.mdns import Advertiser, Browser, browse_once, open_zeroconf
from discovery.peers import PeerInfo
from tests.discovery.strategies import peer_info

# Real multicast sockets and zeroconf's own timings (seconds of probing and announcing):
# integration, in the slow tier; the peer rules are pure and tested fast (test_peers.py).
pytestmark = [pytest.mark.mdns, pytest.mark.slow]

LOOPBACK = "127.0.0.1"
WAIT_S = 20.0  # generous: a bound on waiting, not a claim about speed


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@dataclass
class Seen:
    """What one browser reported, applied like a table keyed by instance."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    current: dict[str, PeerInfo] = field(default_factory=dict)
    adds: list[PeerInfo] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)

    def on_add(self, info: PeerInfo) -> None:
        with self.lock:
            self.adds.append(info)
            self.current[info.instance] = info

    def on_remove(self, instance: str) -> None:
        with self.lock:
            self.removes.append(instance)
            self.current.pop(instance, None)

    def node(self, node_id: str) -> list[PeerInfo]:
        with self.lock:
            return [info for info in self.current.values() if info.node_id == node_id]


@dataclass
class Node:
    zeroconf: Zeroconf
    advertiser: Advertiser
    browser: Browser
    seen: Seen


@pytest.fixture
def open_node() -> Iterator[Callable[[], Node]]:
    """Opens loopback nodes (zeroconf + advertiser + browser); closes every one afterwards."""
    with ExitStack() as stack:

        def open_one() -> Node:
            zeroconf = open_zeroconf(LOOPBACK)
            stack.callback(zeroconf.close)
            advertiser = Advertiser(zeroconf)
            stack.callback(advertiser.close)
            seen = Seen()
            browser = Browser(zeroconf, seen.on_add, seen.on_remove)
            stack.callback(browser.close)
            return Node(zeroconf, advertiser, browser, seen)

        yield open_one


def advert(name: str, port: int, **overrides: object) -> PeerInfo:
    return peer_info(new_node_id(), name=name, address=LOOPBACK, grpc_port=port, **overrides)


def register_all(pairs: list[tuple[Node, PeerInfo]]) -> list[PeerInfo]:
    """Register concurrently: each registration probes the network for about a second."""
    results: dict[int, PeerInfo] = {}

    def register(index: int, node: Node, info: PeerInfo) -> None:
        results[index] = node.advertiser.register(info)

    threads = [
        threading.Thread(target=register, args=(i, node, info))
        for i, (node, info) in enumerate(pairs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(pairs), "a registration failed"
    return [results[i] for i in range(len(pairs))]


def test_three_nodes_discover_each_other_see_updates_and_goodbyes(open_node) -> None:
    nodes = [open_node() for _ in range(3)]
    infos = [advert(f"mac {i}", 50100 + i) for i in range(3)]
    registered = register_all(list(zip(nodes, infos, strict=True)))
    for info, actual in zip(infos, registered, strict=True):
        assert actual == replace(info, instance=actual.instance)
        assert actual.instance.endswith("." + SERVICE_TYPE)

    for node in nodes:  # everyone sees everyone, itself included
        assert wait_until(
            lambda node=node: all(node.seen.node(r.node_id) == [r] for r in registered)
        )
        assert [r for r in node.browser.known() if r in registered] == sorted(
            registered, key=lambda r: r.node_id
        )

    # What `dnet status` does: a throwaway browser on its own zeroconf.
    # Resolving three adverts takes a busy machine longer: widen the window, a few times.
    for timeout_s in (1.5, 3.0, 6.0):
        found = browse_once(LOOPBACK, timeout_s=timeout_s)
        if all(r in found for r in registered):
            break
    assert [f for f in found if f in registered] == sorted(registered, key=lambda r: r.node_id)

    changed = replace(registered[0], model="mlx-community/Qwen3-4B", memory_budget_bytes=123)
    assert nodes[0].advertiser.update(changed) == changed
    for node in nodes[1:]:
        assert wait_until(lambda node=node: node.seen.node(changed.node_id) == [changed])

    nodes[2].advertiser.close()  # goodbye
    gone = registered[2].instance
    for node in nodes[:2]:
        assert wait_until(lambda node=node: gone in node.seen.removes)
        assert node.seen.node(registered[2].node_id) == []


def test_a_new_node_id_re_registers_under_a_new_instance(open_node) -> None:
    speaker, listener = open_node(), open_node()
    (first,) = register_all([(speaker, advert("mover", 50201))])
    assert wait_until(lambda: listener.seen.node(first.node_id) == [first])

    renamed = speaker.advertiser.update(replace(first, node_id=new_node_id()))
    assert renamed.instance != first.instance
    assert speaker.advertiser.advertised == renamed
    assert wait_until(lambda: first.instance in listener.seen.removes)
    assert wait_until(lambda: listener.seen.node(renamed.node_id) == [renamed])

    # Closing the zeroconf first says goodbye for it; the advertiser's close then has no work.
    speaker.zeroconf.close()
    speaker.advertiser.close()
    assert speaker.advertiser.advertised is None
    assert wait_until(lambda: renamed.instance in listener.seen.removes)


def test_foreign_and_malformed_records_are_ignored(open_node) -> None:
    foreign, good, listener = open_node(), open_node(), open_node()
    for index, properties in enumerate([{"path": "/"}, {"v": "1", "id": "nope"}]):
        foreign.zeroconf.register_service(
            ServiceInfo(
                SERVICE_TYPE,
                f"printer-{index}-{new_node_id()}.{SERVICE_TYPE}",
                port=631,
                properties=properties,
                parsed_addresses=[LOOPBACK],
            ),
            strict=False,
            cooperating_responders=True,  # skip probing: these names cannot collide
        )
    (registered,) = register_all([(good, advert("good", 50301))])
    assert wait_until(lambda: listener.seen.node(registered.node_id) == [registered])
    # Events are handled in order, so the foreign records (announced first) were looked at.
    with listener.seen.lock:
        assert all(not info.instance.startswith("printer-") for info in listener.seen.adds)
    assert all(not info.instance.startswith("printer-") for info in listener.browser.known())


def test_duplicate_node_id_same_name_gets_a_distinct_instance_and_the_survivor_returns(
    open_node,
) -> None:
    first_node, second_node, listener = open_node(), open_node(), open_node()
    shared = advert("twin", 50401, started_at=100.0)
    (first,) = register_all([(first_node, shared)])
    assert wait_until(lambda: listener.seen.node(shared.node_id) == [first])
    (second,) = register_all([(second_node, replace(shared, grpc_port=50402, started_at=200.0))])
    assert second.instance != first.instance  # zeroconf renamed the later registration
    assert wait_until(lambda: len(listener.seen.node(shared.node_id)) == 2)

    first_node.advertiser.close()
    assert wait_until(lambda: first.instance in listener.seen.removes)
    # The remaining registration is reported again, so a table keyed by node id keeps it.
    assert wait_until(lambda: listener.seen.adds[-1] == second)


def test_open_zeroconf_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(mdns, "Zeroconf", lambda **kwargs: calls.append(kwargs) or kwargs)
    open_zeroconf(None)
    open_zeroconf("10.0.0.5")
    open_zeroconf("localhost")  # a host name is looked up (issue 14: names are accepted)
    assert calls == [
        {"interfaces": InterfaceChoice.All, "ip_version": IPVersion.V4Only},
        {"interfaces": ["10.0.0.5"], "ip_version": IPVersion.V4Only},
        {"interfaces": ["127.0.0.1"], "ip_version": IPVersion.V4Only},
    ]
    for bad in ["::1", "300.1.1.1", "no-such-host.invalid"]:
        with pytest.raises(ValueError):
            open_zeroconf(bad)
