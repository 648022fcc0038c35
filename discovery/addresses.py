"""Which of its addresses a node advertises, and which of a peer's addresses to dial. Pure.

A machine often has several interfaces (Wi-Fi and Ethernet, a VPN, a container bridge) and
the route to the internet need not be the one its peers share. So a node without `--host`
publishes the IPv4 address of every interface that is up (never loopback, unless it has no
other), and names one of them its *primary* in its TXT record. A receiver dials the address
that shares a subnet with one of its own interfaces, preferring the primary; with none in
common (a routed network) it dials the primary.

The primary starts as the address of the default route's interface (or the only one), and
follows the peers once they are seen: the address sharing a subnet with most of them. Nothing
here reads the network; the interfaces come in as values (see `discovery.mdns`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Interface:
    """One IPv4 address of a network interface of this machine."""

    name: str  # e.g. "en0", "eth0"
    address: str
    prefix_length: int  # 24 for a /24

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(f"{self.address}/{self.prefix_length}").network

    @property
    def is_loopback(self) -> bool:
        return ipaddress.IPv4Address(self.address).is_loopback

    @property
    def is_link_local(self) -> bool:
        return ipaddress.IPv4Address(self.address).is_link_local

    def describe(self) -> str:
        return f"{self.name} {self.address}/{self.prefix_length}"


@dataclass(frozen=True)
class AddressChoice:
    """What a node advertises: every usable address, the primary first."""

    addresses: tuple[str, ...]
    primary: str
    # Interfaces that could each be the one the peers share, when nothing told them apart;
    # empty when the choice was clear. The node warns once, naming them.
    ambiguous: tuple[Interface, ...] = ()


def usable(interfaces: Iterable[Interface]) -> list[Interface]:
    """The interfaces worth advertising: routable ones; link-local (169.254/16) ones only when
    there is nothing better; loopback only when there is nothing else at all."""
    routable = [i for i in interfaces if not i.is_loopback and not i.is_link_local]
    if routable:
        return routable
    link_local = [i for i in interfaces if i.is_link_local]
    if link_local:
        return link_local
    return [Interface("lo", LOOPBACK, 8)]


def choose_addresses(interfaces: Sequence[Interface], default_route: str | None,
                     peer_addresses: Sequence[str] = ()) -> AddressChoice:
    """The addresses to advertise, and the primary among them.

    `default_route` is this machine's source address towards the internet (None without a
    default route); `peer_addresses` are the addresses the peers seen so far are dialled at.
    The primary is the address sharing a subnet with most peers; with no peer to go by, the
    default route's address, else the first interface's. Loopback is advertised only when
    the machine has no other interface, so it never reaches a peer on another machine.
    """
    candidates = usable(interfaces)
    addresses = tuple(dict.fromkeys(i.address for i in candidates))
    by_peers = _best_by_peers(candidates, peer_addresses)
    if by_peers is not None:
        return AddressChoice(_primary_first(addresses, by_peers), by_peers)
    primary = default_route if default_route in addresses and default_route else addresses[0]
    ambiguous = tuple(candidates) if len(addresses) > 1 else ()
    return AddressChoice(_primary_first(addresses, primary), primary, ambiguous)


def _best_by_peers(candidates: Sequence[Interface], peer_addresses: Sequence[str]) -> str | None:
    peers = [ipaddress.IPv4Address(a) for a in peer_addresses if _is_ipv4(a)]
    scored = [(sum(peer in i.network for peer in peers), -k, i.address)
              for k, i in enumerate(candidates)]
    best = max(scored, default=None)
    return best[2] if best is not None and best[0] > 0 else None


def _primary_first(addresses: tuple[str, ...], primary: str) -> tuple[str, ...]:
    return (primary, *(a for a in addresses if a != primary))


def reachable_address(addresses: Sequence[str], primary: str | None,
                      local: Sequence[Interface]) -> str | None:
    """Which of a peer's advertised addresses this node should dial, or None if none is usable.

    An address in a subnet of one of `local` (this node's interfaces) first, the peer's
    `primary` among several; else the primary; else the first address. A loopback address
    only ever comes from a peer on this machine (mDNS on loopback does not leave it).
    """
    valid = [a for a in addresses if _is_ipv4(a) and not _unusable(a)]
    if not valid:
        return None
    networks = [i.network for i in local]
    near = [a for a in valid if any(ipaddress.IPv4Address(a) in n for n in networks)]
    for group in (near, valid):
        if primary in group:
            return primary
        if group:
            return group[0]
    return None


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except (ValueError, TypeError):
        return False
    return True


def _unusable(text: str) -> bool:
    address = ipaddress.IPv4Address(text)
    return address.is_unspecified or address == ipaddress.IPv4Address("255.255.255.255")
