"""Backend primitives: the fake must do and refuse what the kernel does and refuses."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from netvm import DeviceExists, HostError, NotFound, Rule, TapOptions
from netvm.backends.base import FILTER, NAT, Backend

GW = ipaddress.IPv4Interface("192.0.2.1/24")


def errno_of(exc: pytest.ExceptionInfo[HostError]) -> int:
    return exc.value.errno


def test_a_fresh_namespace_holds_only_lo(backend: Backend) -> None:
    (lo,) = backend.list_links()
    assert (lo.name, lo.up) == ("lo", False)
    assert backend.get_ip_forward() is False
    assert backend.list_chains(FILTER) == ["INPUT", "FORWARD", "OUTPUT"]
    assert sorted(backend.list_chains(NAT)) == ["INPUT", "OUTPUT", "POSTROUTING", "PREROUTING"]


def test_bridge_is_created_with_mtu_and_alias(backend: Backend) -> None:
    backend.create_bridge("br0", 1400, alias="mine")
    link = backend.get_link("br0")
    assert link is not None
    assert (link.kind, link.mtu, link.alias, link.up, link.master) == (
        "bridge",
        1400,
        "mine",
        False,
        None,
    )


def test_a_taken_name_is_refused(backend: Backend) -> None:
    backend.create_bridge("br0", 1500)
    with pytest.raises(DeviceExists) as bridge_again:
        backend.create_bridge("br0", 1500)
    assert errno_of(bridge_again) == errno.EEXIST
    with pytest.raises(DeviceExists) as tap_on_bridge_name:
        backend.create_tap("br0", TapOptions())
    assert errno_of(tap_on_bridge_name) == errno.EBUSY
    backend.create_tap("tap0", TapOptions())
    with pytest.raises(DeviceExists) as tap_again:
        backend.create_tap("tap0", TapOptions())
    assert errno_of(tap_again) == errno.EBUSY


def test_a_name_of_16_bytes_is_refused(backend: Backend) -> None:
    with pytest.raises(HostError) as bridge:
        backend.create_bridge("x" * 16, 1500)
    with pytest.raises(HostError) as tap:
        backend.create_tap("x" * 16, TapOptions())
    assert (errno_of(bridge), errno_of(tap)) == (errno.ERANGE, errno.ERANGE)
    assert backend.get_link("x" * 15) is None


def test_tap_reports_its_flags(backend: Backend) -> None:
    options = TapOptions(owner=1234, group=5678, multi_queue=True, vnet_hdr=True)
    backend.create_tap("tapq", options)
    backend.create_tap("tapp", TapOptions())
    q, p = backend.get_link("tapq"), backend.get_link("tapp")
    assert q is not None
    assert p is not None
    assert (q.kind, q.tap) == ("tun", options)
    assert (p.kind, p.tap) == ("tun", TapOptions())


def test_set_link_changes_master_mtu_up_alias_at_once(backend: Backend) -> None:
    backend.create_bridge("br0", 1500)
    backend.create_tap("tap0", TapOptions())
    bridge = backend.get_link("br0")
    assert bridge is not None
    backend.set_link("tap0", master=bridge.index, mtu=1400, up=True, alias="netvm:x")
    tap = backend.get_link("tap0")
    assert tap is not None
    assert (tap.master, tap.mtu, tap.up, tap.alias) == (bridge.index, 1400, True, "netvm:x")
    assert [link.name for link in backend.list_links(master=bridge.index)] == ["tap0"]


def test_set_link_refusals(backend: Backend) -> None:
    backend.create_tap("tap0", TapOptions())
    backend.create_tap("tap1", TapOptions())
    other = backend.get_link("tap1")
    assert other is not None
    cases = [
        ({"master": other.index}, errno.EOPNOTSUPP),
        ({"master": 999_999}, errno.EINVAL),
        ({"mtu": 65522}, errno.EINVAL),
        ({"mtu": 67}, errno.EINVAL),
    ]
    for change, expected in cases:
        with pytest.raises(HostError) as refused:
            backend.set_link("tap0", **change)  # type: ignore[arg-type]
        assert errno_of(refused) == expected, change
    with pytest.raises(NotFound) as missing:
        backend.set_link("nope0", mtu=1400)
    assert errno_of(missing) == errno.ENODEV


def test_delete_and_lookup_of_a_missing_device(backend: Backend) -> None:
    assert backend.get_link("nope0") is None
    with pytest.raises(NotFound) as missing:
        backend.delete_link("nope0")
    assert errno_of(missing) == errno.ENODEV


def test_delete_links_removes_many_and_skips_missing(backend: Backend) -> None:
    backend.create_bridge("br0", 1500)
    for i in range(5):
        backend.create_tap(f"tap{i}", TapOptions())
    backend.delete_links(["tap0", "tap1", "gone0", "tap3"])
    assert sorted(link.name for link in backend.list_links()) == ["br0", "lo", "tap2", "tap4"]
    backend.delete_links([])
    backend.delete_links(["gone0"])


def test_deleting_a_bridge_frees_its_ports_and_addresses(backend: Backend) -> None:
    backend.create_bridge("br0", 1500)
    backend.create_tap("tap0", TapOptions())
    bridge = backend.get_link("br0")
    assert bridge is not None
    backend.set_link("tap0", master=bridge.index)
    backend.add_address(bridge.index, GW)
    backend.delete_link("br0")
    tap = backend.get_link("tap0")
    assert tap is not None
    assert tap.master is None
    assert backend.list_addresses() == []


def test_addresses(backend: Backend) -> None:
    backend.create_bridge("br0", 1500)
    bridge = backend.get_link("br0")
    assert bridge is not None
    backend.add_address(bridge.index, GW)
    assert [(a.index, a.interface) for a in backend.list_addresses(bridge.index)] == [
        (bridge.index, GW)
    ]
    with pytest.raises(DeviceExists) as again:
        backend.add_address(bridge.index, GW)
    assert errno_of(again) == errno.EEXIST
    backend.delete_address(bridge.index, GW)
    with pytest.raises(NotFound) as gone:
        backend.delete_address(bridge.index, GW)
    assert errno_of(gone) == errno.EADDRNOTAVAIL
    with pytest.raises(NotFound) as no_device:
        backend.add_address(999_999, GW)
    assert errno_of(no_device) == errno.ENODEV


def test_ip_forward_switch(backend: Backend) -> None:
    backend.set_ip_forward(True)
    assert backend.get_ip_forward() is True
    backend.set_ip_forward(False)
    assert backend.get_ip_forward() is False


MASQ = Rule(
    "MASQUERADE",
    source=ipaddress.IPv4Network("192.0.2.0/24"),
    out_iface="up0",
    comment="netvm:test",
)
RETURNING = Rule(
    "ACCEPT", in_iface="up0", out_iface="br0", ctstate=("ESTABLISHED", "RELATED"), comment="c"
)


def test_rules_round_trip(backend: Backend) -> None:
    backend.create_chain(NAT, "NETVM-T")
    backend.insert_rule(NAT, "NETVM-T", MASQ)
    backend.insert_rule(NAT, "POSTROUTING", Rule("NETVM-T", comment="jump"))
    backend.insert_rule(FILTER, "FORWARD", RETURNING)
    backend.insert_rule(FILTER, "FORWARD", Rule("DROP"), 1)
    assert backend.list_rules(NAT, "NETVM-T") == [MASQ]
    assert backend.list_rules(NAT, "POSTROUTING") == [Rule("NETVM-T", comment="jump")]
    assert backend.list_rules(FILTER, "FORWARD") == [RETURNING, Rule("DROP")]
    assert "NETVM-T" in backend.list_chains(NAT)


def test_firewall_refusals(backend: Backend) -> None:
    backend.create_chain(FILTER, "NETVM-T")
    with pytest.raises(DeviceExists) as chain_again:
        backend.create_chain(FILTER, "NETVM-T")
    assert errno_of(chain_again) == errno.EEXIST
    with pytest.raises(NotFound) as no_chain:
        backend.insert_rule(FILTER, "NETVM-NONE", Rule("ACCEPT"))
    assert errno_of(no_chain) == errno.ENOENT
    with pytest.raises(NotFound) as no_rule:
        backend.delete_rule(FILTER, "NETVM-T", Rule("ACCEPT"))
    assert errno_of(no_rule) == errno.ENOENT
    with pytest.raises(NotFound) as no_target:
        backend.insert_rule(FILTER, "FORWARD", Rule("NETVM-NONE"))
    assert errno_of(no_target) == errno.ENOENT
    with pytest.raises(HostError) as too_far:
        backend.insert_rule(FILTER, "NETVM-T", Rule("ACCEPT"), 5)
    assert errno_of(too_far) == errno.E2BIG
    backend.insert_rule(FILTER, "NETVM-T", Rule("ACCEPT"))
    with pytest.raises(HostError) as not_empty:
        backend.delete_chain(FILTER, "NETVM-T")
    assert errno_of(not_empty) == errno.ENOTEMPTY
    backend.delete_rule(FILTER, "NETVM-T", Rule("ACCEPT"))
    backend.insert_rule(FILTER, "FORWARD", Rule("NETVM-T"))
    with pytest.raises(HostError) as referenced:
        backend.delete_chain(FILTER, "NETVM-T")
    assert errno_of(referenced) == errno.EMLINK
    backend.delete_rule(FILTER, "FORWARD", Rule("NETVM-T"))
    backend.delete_chain(FILTER, "NETVM-T")
    assert "NETVM-T" not in backend.list_chains(FILTER)


def test_an_alias_longer_than_ifaliasz_is_refused(backend: Backend) -> None:
    backend.create_tap("tap0", TapOptions())
    with pytest.raises(HostError) as too_long:
        backend.set_link("tap0", alias="a" * 256)
    assert errno_of(too_long) == errno.ERANGE
    backend.set_link("tap0", alias="a" * 255)
    tap = backend.get_link("tap0")
    assert tap is not None
    assert tap.alias == "a" * 255


def test_delete_by_index_spares_a_newer_device_of_the_same_name(backend: Backend) -> None:
    backend.create_tap("tap0", TapOptions())
    old = backend.get_link("tap0")
    assert old is not None
    backend.delete_link("tap0")
    backend.create_tap("tap0", TapOptions())
    with pytest.raises(NotFound) as gone:
        backend.delete_link("tap0", index=old.index)
    assert errno_of(gone) == errno.ENODEV
    new = backend.get_link("tap0")
    assert new is not None
    backend.delete_link("tap0", index=new.index)
    assert backend.get_link("tap0") is None


def _learn_neighbour(backend: Backend, index: int, address: str, mac: bytes) -> None:
    """What an ARP request to the host from `address` would teach it."""
    from netvm import FakeBackend, KernelBackend

    if isinstance(backend, FakeBackend):
        backend.state.neighbours[index, ipaddress.IPv4Address(address)] = mac
        return
    assert isinstance(backend, KernelBackend)
    assert backend.netns is not None
    import subprocess

    shown = ":".join(f"{b:02x}" for b in mac)
    link = next(link.name for link in backend.list_links() if link.index == index)
    subprocess.run(
        ["ip", "-n", backend.netns, "neigh", "add", address, "lladdr", shown, "dev", link],
        check=True,
    )


def test_a_neighbour_entry_is_forgotten_and_a_missing_one_is_not_found(backend: Backend) -> None:
    backend.create_bridge("br0", 1500)
    bridge = backend.get_link("br0")
    assert bridge is not None
    backend.set_link("br0", up=True)
    _learn_neighbour(backend, bridge.index, "192.0.2.7", bytes.fromhex("026666666666"))
    backend.forget_neighbour(bridge.index, ipaddress.IPv4Address("192.0.2.7"))
    with pytest.raises(NotFound) as missing:
        backend.forget_neighbour(bridge.index, ipaddress.IPv4Address("192.0.2.7"))
    assert errno_of(missing) == errno.ENOENT
