"""A private test LAN of Linux network namespaces, so that mesh nodes have their own addresses.

    switch namespace <tag>-sw                  host namespaces <tag>-1 .. <tag>-N, client <tag>-c
    +--------------------------------------+   +-----------------------------------------+
    | br0: no address, multicast snooping  |   | lo up                                   |
    |      off so mDNS reaches every port  |   | dnet0  10.213.K.i/24  (veth)            |
    | p1 p2 ... pc: the veth peers of each |---| 224.0.0.0/4 dev dnet0 (multicast route) |
    +--------------------------------------+   +-----------------------------------------+

Nothing is created in, or changed in, the root namespace: every `ip` command names its
namespace (`ip -n NS`), and each veth pair is created inside the switch namespace with its
other end placed straight into the host namespace. Deleting a namespace deletes the interfaces
in it (and a veth's peer with it), so removing the namespaces removes everything.

The test process stays in the root namespace. `Host.call` runs a function on a fresh thread
that has first joined the host's network namespace with setns(2): on Linux the network
namespace is per thread, so sockets that function opens (e.g. httpx's) live on the test LAN
while the rest of the process, pytest included, is untouched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

# The namespace primitives have one home, the cluster benchmark's LAN (tools/cluster_lan.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from cluster_lan import BRIDGE, enter_netns, ip, namespaces, netns_pids, wire_host  # noqa: E402
from cluster_lan import LanError as NetnsError  # noqa: E402
from cluster_lan import free_subnet as free_subnet_in  # noqa: E402
from cluster_lan import kill_all_in as _kill_all_in  # noqa: E402

UPLINK = "dnet1"
# Each host's own uplink network (see NetnsLan.add_uplinks), one /24 per host.
UPLINK_POOL = ipaddress.ip_network("172.31.0.0/16")
# A /24 out of 10.213.0.0/16, picked at random among those the machine does not use.
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")
CLIENT_INDEX = 100  # the client namespace's host number in the /24

T = TypeVar("T")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    return None


@dataclass(frozen=True)
class Host:
    """One namespace on the test LAN: a machine with one network interface."""

    namespace: str
    address: str

    @property
    def prefix(self) -> list[str]:
        """Run a command here. `ip netns exec` execs the command, so a Popen pid is its pid."""
        return ["ip", "netns", "exec", self.namespace]

    def pids(self) -> set[int]:
        return netns_pids(self.namespace)

    def call(self, fn: Callable[..., T], *args: Any, timeout_s: float) -> T:
        """`fn(*args)` on a new thread inside this namespace; its result or its exception.

        The thread ends with the call, so it holds no reference to the namespace afterwards.
        `fn` must bound its own waits; `timeout_s` is only a backstop."""
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                enter_netns(self.namespace)
                outcome["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller below
                outcome["error"] = exc

        thread = threading.Thread(target=run, name=f"in-{self.namespace}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {self.namespace} still "
                               f"running after {timeout_s:.0f} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


@dataclass
class NetnsLan:
    """Namespaces `<tag>-1..N` (hosts) and `<tag>-c` (client) bridged in `<tag>-sw`."""

    tag: str
    subnet: ipaddress.IPv4Network
    hosts: list[Host] = field(default_factory=list)
    client: Host | None = None
    created: list[str] = field(default_factory=list)  # namespaces, in creation order

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def build(self, num_hosts: int) -> None:
        self._add_namespace(self.switch)
        ip("link", "set", "lo", "up", ns=self.switch)
        # A plain bridge: no STP (ports forward at once); no multicast snooping, which would
        # otherwise wait for IGMP reports before passing 224.0.0.251 traffic to a port.
        ip("link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "mcast_snooping", "0",
           ns=self.switch)
        ip("link", "set", BRIDGE, "up", ns=self.switch)
        self.hosts = [self._add_host(str(i), i) for i in range(1, num_hosts + 1)]
        self.client = self._add_host("c", CLIENT_INDEX)

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)

    def _add_host(self, suffix: str, index: int) -> Host:
        namespace = f"{self.tag}-{suffix}"
        address = str(self.subnet.network_address + index)
        self._add_namespace(namespace)
        wire_host(self.switch, namespace, f"p{suffix}", address, self.subnet.prefixlen)
        return Host(namespace, address)

    def add_uplinks(self) -> list[str]:
        """Give every host a second interface, `dnet1`, that carries its default route: as a
        machine whose internet uplink (Wi-Fi, say) is not the network its peers are on. Each
        uplink is one end of a veth pair whose other end stays in the same namespace, on a /24
        of its own, so no peer can reach it. Returns the uplink addresses, in host order."""
        addresses = []
        for index, host in enumerate(self.hosts, start=1):
            address = str(UPLINK_POOL.network_address + (index << 8) + 2)
            ip("link", "add", UPLINK, "type", "veth", "peer", "name", f"{UPLINK}p",
               ns=host.namespace)
            ip("addr", "add", f"{address}/24", "dev", UPLINK, ns=host.namespace)
            ip("link", "set", f"{UPLINK}p", "up", ns=host.namespace)
            ip("link", "set", UPLINK, "up", ns=host.namespace)
            ip("route", "add", "default", "dev", UPLINK, ns=host.namespace)
            addresses.append(address)
        return addresses

    def close(self) -> None:
        """Stop anything still running in the namespaces, then delete them (newest first).

        Only processes inside this LAN's private namespaces are signalled: they can only be
        this test's (nodes, or what a node started), and each is signalled by its pid."""
        for namespace in reversed(self.created):
            if namespace in namespaces():
                _kill_all_in(namespace)
                ip("netns", "del", namespace)
        self.created = [n for n in self.created if n in namespaces()]

    def leftovers(self) -> set[str]:
        """Namespaces of this LAN that still exist."""
        return {name for name in namespaces() if name.startswith(f"{self.tag}-")}


@contextlib.contextmanager
def netns_lan(num_hosts: int) -> Iterator[NetnsLan]:
    """A fresh test LAN; always removed afterwards, and checked to be gone.

    Skips the test when namespaces cannot be made here (not Linux, not root, no `ip`, or the
    kernel refusing namespaces/bridges/veths, as in some containers)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    lan = NetnsLan(tag=f"dnet-t{secrets.token_hex(3)}", subnet=free_subnet_in(SUBNET_POOL))
    try:
        try:
            lan.build(num_hosts)
        except NetnsError as exc:
            if lan.hosts:  # the first host worked: this is a bug, not a missing capability
                raise
            pytest.skip(f"cannot build a namespace test network here: {exc}")
        yield lan
    finally:
        lan.close()
        left = lan.leftovers()
        assert not left, f"namespaces left behind: {sorted(left)}"
