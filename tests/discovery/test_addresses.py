"""Which addresses a node advertises and which a peer dials (discovery/addresses.py)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from discovery.addresses import Interface, choose_addresses, reachable_address, usable
from discovery.txt import decode_txt, encode_txt
from tests.discovery.strategies import FAST, peer_info

LO = Interface("lo", "127.0.0.1", 8)
WIFI = Interface("en0", "192.168.1.20", 24)
THUNDERBOLT = Interface("bridge0", "10.0.7.2", 24)
LINK_LOCAL = Interface("en5", "169.254.3.4", 16)


def test_one_interface_is_the_primary_whatever_the_route() -> None:
    for route in (None, "192.168.1.20", "10.9.9.9"):
        choice = choose_addresses([LO, WIFI], route)
        assert choice.addresses == ("192.168.1.20",) and choice.primary == "192.168.1.20"
        assert not choice.ambiguous


def test_loopback_only_when_there_is_nothing_else() -> None:
    assert choose_addresses([LO], None).addresses == ("127.0.0.1",)
    assert "127.0.0.1" not in choose_addresses([LO, LINK_LOCAL], None).addresses
    assert choose_addresses([LO, LINK_LOCAL, WIFI], None).addresses == ("192.168.1.20",)


def test_several_interfaces_without_peers_are_ambiguous_and_prefer_the_default_route() -> None:
    choice = choose_addresses([LO, WIFI, THUNDERBOLT], "10.0.7.2")
    assert choice.primary == "10.0.7.2" and choice.addresses == ("10.0.7.2", "192.168.1.20")
    assert {i.name for i in choice.ambiguous} == {"en0", "bridge0"}
    # No default route (an isolated network): the first interface, still every address.
    choice = choose_addresses([LO, WIFI, THUNDERBOLT], None)
    assert choice.primary == "192.168.1.20" and set(choice.addresses) == {"192.168.1.20",
                                                                          "10.0.7.2"}


def test_peers_decide_the_primary() -> None:
    choice = choose_addresses([LO, WIFI, THUNDERBOLT], "192.168.1.20",
                              ["10.0.7.9", "10.0.7.10", "192.168.1.77"])
    assert choice.primary == "10.0.7.2" and not choice.ambiguous
    # Peers on no network of ours (routed): the default route's, as before.
    assert choose_addresses([WIFI, THUNDERBOLT], "192.168.1.20",
                            ["172.16.0.1"]).primary == "192.168.1.20"


def test_a_receiver_dials_the_address_on_its_own_network() -> None:
    advertised = ["192.168.1.20", "10.0.7.2"]
    assert reachable_address(advertised, "192.168.1.20", [LO, THUNDERBOLT]) == "10.0.7.2"
    assert reachable_address(advertised, "192.168.1.20", [LO, WIFI]) == "192.168.1.20"
    # On both networks: the peer's primary. On neither: the primary too.
    assert reachable_address(advertised, "10.0.7.2", [WIFI, THUNDERBOLT]) == "10.0.7.2"
    assert reachable_address(advertised, "10.0.7.2", [LO]) == "10.0.7.2"
    assert reachable_address(advertised, None, [LO]) == "192.168.1.20"
    assert reachable_address(["0.0.0.0", "nonsense"], None, [LO]) is None


def test_the_txt_record_names_the_primary_and_the_receiver_picks() -> None:
    info = peer_info("aaaaaaaaaaaa", address="192.168.1.20")
    properties = {k.encode(): v.encode() for k, v in encode_txt(info).items()}
    on_lan = decode_txt(properties, ["10.0.7.2", "192.168.1.20"], 7000, "i", [LO, THUNDERBOLT])
    assert on_lan.address == "10.0.7.2"
    elsewhere = decode_txt(properties, ["10.0.7.2", "192.168.1.20"], 7000, "i", [LO])
    assert elsewhere.address == "192.168.1.20"


interfaces = st.lists(st.builds(
    Interface, st.sampled_from(["lo", "en0", "en1", "eth0"]),
    st.ip_addresses(v=4).map(str), st.integers(8, 30)), max_size=5)


@FAST
@given(interfaces, st.one_of(st.none(), st.ip_addresses(v=4).map(str)),
       st.lists(st.ip_addresses(v=4).map(str), max_size=4))
def test_the_choice_is_always_one_of_the_advertised_addresses(ifaces, route, peers) -> None:
    choice = choose_addresses(ifaces, route, peers)
    assert choice.primary == choice.addresses[0]
    assert len(set(choice.addresses)) == len(choice.addresses)
    assert set(choice.addresses) <= {i.address for i in usable(ifaces)}
    if any(not ipaddress.IPv4Address(i.address).is_loopback for i in ifaces):
        assert not any(ipaddress.IPv4Address(a).is_loopback for a in choice.addresses)
