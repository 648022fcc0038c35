"""The I/O edge of discovery: advertising and browsing `_dnet_p2p._tcp.local.` with zeroconf.

Threads: zeroconf runs its own event-loop thread and a ServiceBrowser thread. Resolving a
service blocks (it may query the network), so `Browser` hands every event to one worker
thread of its own; `on_add`/`on_remove` run on that worker, one at a time, in event order.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import psutil
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from discovery.addresses import Interface
from discovery.election import registration_rank
from discovery.identity import SERVICE_TYPE
from discovery.peers import PeerInfo
from discovery.txt import decode_txt, encode_txt

__all__ = [
    "Advertiser",
    "Browser",
    "browse_once",
    "decode_txt",
    "encode_txt",
    "instance_label",
    "local_interfaces",
    "open_zeroconf",
    "resolve_ipv4",
]

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
MAX_DNS_LABEL_BYTES = 63
# Room left in the instance label for the "-N" suffix zeroconf appends on a name conflict.
_RENAME_SUFFIX_ROOM = 4
_NOT_DNS_SAFE = re.compile(r"[^A-Za-z0-9]+")


def instance_label(name: str, node_id: str) -> str:
    """The DNS-safe instance label `<name>-<node_id>` (letters, digits and '-', <= 63 bytes)."""
    room = MAX_DNS_LABEL_BYTES - _RENAME_SUFFIX_ROOM - len(node_id) - 1
    safe_name = _NOT_DNS_SAFE.sub("-", name).strip("-")[:room].strip("-")
    return f"{safe_name or 'dnet'}-{node_id}"


def resolve_ipv4(host: str) -> str:
    """The IPv4 address of `host`: an address as given, a name (e.g. "localhost") looked up.

    Raises ValueError naming the host when it has no IPv4 address."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"cannot resolve host {host!r} to an IPv4 address: {exc}") from None


def local_interfaces() -> list[Interface]:
    """The IPv4 addresses of this machine's interfaces that are up, loopback included."""
    stats = psutil.net_if_stats()
    found = []
    for name, addresses in sorted(psutil.net_if_addrs().items()):
        if name in stats and not stats[name].isup:
            continue
        for address in addresses:
            if address.family != socket.AF_INET or not address.netmask:
                continue
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{address.netmask}").prefixlen
            found.append(Interface(name, address.address, prefix))
    return found


def open_zeroconf(host: str | None) -> Zeroconf:
    """A Zeroconf instance on every interface (None) or on the one IPv4 address `host`.

    All interfaces is python-zeroconf's default and recommended choice for LAN discovery:
    a Mac reachable over both Wi-Fi and Ethernet/Thunderbolt is found on each. IPv4 only,
    because peers are dialled by the IPv4 address they advertise, and IPv6 multicast setup
    fails on hosts without IPv6. A single address (127.0.0.1 for a mesh on one machine, a
    network namespace's address in tests) keeps traffic off every other interface; a host
    name is looked up first (ValueError when that fails).
    """
    if host is None:
        return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    return Zeroconf(interfaces=[resolve_ipv4(host)], ip_version=IPVersion.V4Only)


class Advertiser:
    """Keeps one node's registration on the network. Does not own (or close) the Zeroconf.

    The A records carry the advert's `address` (its primary) and `addresses`, the node's
    other interfaces' addresses; receivers dial the one they can reach."""

    def __init__(self, zeroconf: Zeroconf, addresses: Sequence[str] = ()) -> None:
        self._zeroconf = zeroconf
        self.addresses = tuple(addresses)
        self._lock = threading.Lock()
        self._service: ServiceInfo | None = None
        self._advertised: PeerInfo | None = None

    @property
    def advertised(self) -> PeerInfo | None:
        """What is on the network now, with the instance name actually registered."""
        return self._advertised

    def register(self, info: PeerInfo) -> PeerInfo:
        """Advertise `info` (its `instance` is ignored and chosen here); return the advert.

        Registering again replaces the advert, like `update`. zeroconf may append "-2" etc.
        to the instance name if another host already holds it (two nodes sharing a name and
        node id); the returned `instance` is the name in use.
        """
        with self._lock:
            return self._update_locked(info)

    def update(self, info: PeerInfo) -> PeerInfo:
        """Change the advert: TXT, port or address in place; a new node id or name re-registers
        under the new instance name (with a goodbye for the old one)."""
        with self._lock:
            return self._update_locked(info)

    def close(self) -> None:
        """Withdraw the advert: the goodbye makes browsers drop it at once instead of after the
        record TTL. Only this advertiser's service is withdrawn."""
        with self._lock:
            # A closed Zeroconf has already sent the goodbye for every service it registered
            # (and would raise on its closed event loop).
            if self._service is not None and not self._zeroconf.done:
                self._zeroconf.unregister_service(self._service)
            self._service = None
            self._advertised = None

    def _update_locked(self, info: PeerInfo) -> PeerInfo:
        label = instance_label(info.name, info.node_id)
        current = self._advertised
        if self._service is not None and current is not None:
            if label == instance_label(current.name, current.node_id):
                service = self._service_info(info, self._service.name, self._service.server)
                self._zeroconf.update_service(service)
                return self._remember(service, info)
            self._zeroconf.unregister_service(self._service)
            self._service = None
            self._advertised = None
        # A host name per registration: two nodes never publish conflicting A records, even
        # when they share a machine name and node id.
        server = f"dnet-{info.node_id}-{secrets.token_hex(3)}.local."
        service = self._service_info(info, f"{label}.{SERVICE_TYPE}", server)
        # strict=False: zeroconf's strict check refuses the underscore in "dnet_p2p".
        self._zeroconf.register_service(service, allow_name_change=True, strict=False)
        return self._remember(service, info)

    def _service_info(self, info: PeerInfo, name: str, server: str | None) -> ServiceInfo:
        addresses = list(dict.fromkeys([info.address, *self.addresses]))
        return ServiceInfo(
            SERVICE_TYPE,
            name,
            port=info.grpc_port,
            properties=encode_txt(info),
            parsed_addresses=addresses,
            server=server,
        )

    def _remember(self, service: ServiceInfo, info: PeerInfo) -> PeerInfo:
        self._service = service
        self._advertised = replace(info, instance=service.name)
        return self._advertised


class Browser:
    """Reports dnet adverts on the network: `on_add(info)` when one appears or changes,
    `on_remove(instance)` when it says goodbye or expires. Records that are not dnet's (or
    are malformed) are ignored. The node's own advert is reported too.

    When one of several registrations sharing a node id goes away, the remaining senior one is
    reported again through `on_add`, so a table keyed by node id gets it back.

    `local` are this node's interfaces: of a peer's addresses, the one sharing a subnet with
    them is the one reported (see `discovery.addresses.reachable_address`).
    """

    def __init__(
        self,
        zeroconf: Zeroconf,
        on_add: Callable[[PeerInfo], None],
        on_remove: Callable[[str], None],
        local: Sequence[Interface] = (),
    ) -> None:
        self._zeroconf = zeroconf
        self._local = tuple(local)
        self._on_add = on_add
        self._on_remove = on_remove
        self._lock = threading.Lock()
        self._closed = False
        self._known: dict[str, PeerInfo] = {}  # instance -> advert; written by the worker only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dnet-mdns-resolve")
        self._browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[self._on_state_change])

    def known(self) -> list[PeerInfo]:
        """Every dnet advert currently on the network, sorted by (node_id, instance)."""
        with self._lock:
            adverts = list(self._known.values())
        return sorted(adverts, key=lambda info: (info.node_id, info.instance))

    def close(self) -> None:
        """Stop browsing; returns after the worker has finished its current callback."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Outside the lock: cancel() joins the browser thread, which may be waiting for it.
        self._browser.cancel()
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # ServiceBrowser passes all four arguments by keyword, so the unused ones keep their
        # names. This runs on the ServiceBrowser thread: only queue, never block it.
        task = self._forget if state_change is ServiceStateChange.Removed else self._resolve
        with self._lock:
            if not self._closed:
                self._worker.submit(self._run_logged, task, name)

    @staticmethod
    def _run_logged(task: Callable[[str], None], name: str) -> None:
        # An executor keeps a task's exception in a future nobody reads; log it instead.
        try:
            task(name)
        except Exception:
            log.exception("mDNS event for %s failed", name)

    def _resolve(self, name: str) -> None:
        service = self._zeroconf.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS)
        if service is None or service.port is None:
            log.debug("no answer resolving %s", name)
            return
        advert = decode_txt(
            service.properties,
            service.parsed_addresses(IPVersion.V4Only),
            service.port,
            name,
            self._local,
        )
        if advert is None:
            # Not (or no longer) a dnet record of our TXT version.
            self._forget(name)
            return
        if self._known.get(name) == advert:
            return
        with self._lock:
            self._known[name] = advert
        self._on_add(advert)

    def _forget(self, name: str) -> None:
        with self._lock:
            gone = self._known.pop(name, None)
            if gone is None:
                return
            survivors = [info for info in self._known.values() if info.node_id == gone.node_id]
        self._on_remove(name)
        if survivors:
            self._on_add(min(survivors, key=registration_rank))


def browse_once(host: str | None, timeout_s: float) -> list[PeerInfo]:
    """The dnet adverts seen within `timeout_s` (for `dnet status`), sorted by node id."""
    zeroconf = open_zeroconf(host)
    try:
        browser = Browser(zeroconf, on_add=lambda info: None, on_remove=lambda name: None,
                          local=local_interfaces())
        try:
            time.sleep(timeout_s)
            return browser.known()
        finally:
            browser.close()
    finally:
        zeroconf.close()
