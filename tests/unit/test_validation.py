"""Refusals of hostile input outside NetworkConfig: a VM subnet already in use in the
namespace (netvm.validation, at ensure_host), TapOptions, vm_ids and sequences of them.

Each refusal names the field, the value and what is allowed, and changes nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from netvm import (
    ConfigError,
    ConflictError,
    FakeBackend,
    KernelBackend,
    NetworkConfig,
    NetworkManager,
    TapOptions,
)
from netvm.backends.base import MAX_ID
from netvm.naming import validate_vm_id, validate_vm_ids
from netvm.testing import run_in_netns, snapshot, throwaway_netns
from netvm.validation import ROUTES, check_subnet_free, parse_routes, subnet_conflicts

HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"


def route(iface: str, network: str) -> str:
    """A /proc/net/route line: destination and mask as little-endian hex."""
    net = ipaddress.IPv4Network(network)

    def hexle(address: ipaddress.IPv4Address) -> str:
        return address.packed[::-1].hex().upper()

    fields = [iface, hexle(net.network_address), "00000000", "0001", "0", "0", "0"]
    return "\t".join([*fields, hexle(net.netmask), "0", "0", "0"]) + "\n"


def host(*routes: str) -> FakeBackend:
    """A fake namespace with an uplink (198.51.100.2/24), a default route and `routes`."""
    backend = FakeBackend()
    backend.add_link("up0", "veth")
    up0 = backend.get_link("up0")
    assert up0 is not None
    backend.add_address(up0.index, ipaddress.IPv4Interface("198.51.100.2/24"))
    backend.state.proc[ROUTES] = HEADER + route("up0", "0.0.0.0/0") + "".join(routes)
    return backend


def with_subnet(config: NetworkConfig, subnet: str) -> NetworkConfig:
    return NetworkConfig(
        config.bridge_name, subnet, config.host_egress_iface, state_dir=config.state_dir
    )


# /proc/net/route ------------------------------------------------------------------------


def test_routes_are_parsed_and_bad_lines_skipped() -> None:
    text = (
        HEADER
        + route("up0", "0.0.0.0/0")
        + route("up0", "203.0.113.0/25")
        + "short line\n"
        + "up0\tZZZZ\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        + "up0\t000200C0\t00000000\t0001\t0\t0\t0\t00FF00FF\t0\t0\t0\n"  # not a netmask
    )
    assert parse_routes(text) == [
        ("up0", ipaddress.IPv4Network("0.0.0.0/0")),
        ("up0", ipaddress.IPv4Network("203.0.113.0/25")),
    ]
    assert parse_routes("") == []


# A subnet in use ------------------------------------------------------------------------


@pytest.mark.parametrize("subnet", ["198.51.100.0/24", "198.51.100.128/25", "198.51.0.0/16"])
def test_a_subnet_overlapping_an_address_is_refused_before_anything_changes(
    config: NetworkConfig, subnet: str
) -> None:
    backend = host()
    before = snapshot(backend)
    with (
        NetworkManager(with_subnet(config, subnet), backend) as manager,
        pytest.raises(ConflictError) as error,
    ):
        manager.ensure_host()
    message = str(error.value)
    assert f"the VM subnet {subnet} overlaps" in message
    assert "address 198.51.100.2/24 on up0" in message
    assert "choose another vm_subnet" in message
    assert snapshot(backend) == before


def test_a_subnet_overlapping_a_route_is_refused(config: NetworkConfig) -> None:
    backend = host(route("up0", "203.0.113.0/25"))
    before = snapshot(backend)
    with (
        NetworkManager(with_subnet(config, "203.0.113.0/24"), backend) as manager,
        pytest.raises(ConflictError, match=r"route 203\.0\.113\.0/25 dev up0"),
    ):
        manager.ensure_host()
    assert snapshot(backend) == before


def test_the_default_route_and_netvm_s_own_set_up_are_no_conflict(
    config: NetworkConfig,
) -> None:
    """ensure_host on a host it set up already (its gateway and the subnet's route through
    the bridge are there) succeeds and changes nothing."""
    backend = host()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        backend.state.proc[ROUTES] += route(config.bridge_name, str(config.vm_subnet))
        assert subnet_conflicts(backend, config) == []
        before = snapshot(backend)
        manager.ensure_host()
        assert snapshot(backend) == before


def test_another_address_on_the_bridge_inside_the_subnet_is_a_conflict(
    config: NetworkConfig,
) -> None:
    backend = host()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        bridge = backend.get_link(config.bridge_name)
        assert bridge is not None
        backend.add_address(bridge.index, ipaddress.IPv4Interface("192.0.2.200/24"))
        with pytest.raises(ConflictError, match=r"address 192\.0\.2\.200/24 on nvbr0"):
            manager.ensure_host()


def test_the_gateway_on_a_device_that_is_not_a_bridge_is_a_conflict(
    config: NetworkConfig,
) -> None:
    backend = host()
    backend.add_link(config.bridge_name, "veth")
    link = backend.get_link(config.bridge_name)
    assert link is not None
    backend.add_address(link.index, config.gateway)
    with pytest.raises(
        ConflictError, match=r"the gateway address 192\.0\.2\.1 is already assigned"
    ):
        check_subnet_free(backend, config)


def test_a_missing_egress_is_not_an_ensure_host_error(config: NetworkConfig) -> None:
    """netvm doctor reports it (egress-missing); set-up before the uplink exists works."""
    backend = FakeBackend()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
    assert backend.get_link(config.bridge_name) is not None


@pytest.fixture
def kernel() -> Iterator[tuple[str, KernelBackend]]:
    with throwaway_netns("netvm-valid-") as name:
        backend = KernelBackend(name)
        try:
            yield name, backend
        finally:
            backend.close()


@pytest.mark.privileged
def test_on_the_kernel_an_address_or_route_in_use_is_refused(
    kernel: tuple[str, KernelBackend], config: NetworkConfig
) -> None:
    from pyroute2 import IPRoute

    name, backend = kernel
    backend.create_tap("other0", TapOptions())
    backend.set_link("other0", up=True)
    other = backend.get_link("other0")
    assert other is not None
    backend.add_address(other.index, ipaddress.IPv4Interface("198.51.100.1/24"))

    def add_route() -> None:
        with IPRoute() as ipr:
            ipr.route("add", dst="203.0.113.0/25", oif=other.index)

    run_in_netns(name, add_route)
    before = snapshot(backend)
    for subnet, evidence in [
        ("198.51.100.128/25", "address 198.51.100.1/24 on other0"),
        ("203.0.113.0/24", "route 203.0.113.0/25 dev other0"),
    ]:
        with (
            NetworkManager(with_subnet(config, subnet), backend) as manager,
            pytest.raises(ConflictError) as error,
        ):
            manager.ensure_host()
        assert evidence in str(error.value)
        assert snapshot(backend) == before
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.ensure_host()  # its own gateway and route are no conflict
        manager.teardown_host()


# TapOptions -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["owner", "group"])
@pytest.mark.parametrize("value", ["1000", True, False, -1, MAX_ID + 1, 2**64, 1000.0, b"0"])
def test_tap_owner_and_group_are_ints_in_range(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as error:
        TapOptions(**{field: value})  # type: ignore[arg-type]
    assert error.value.field == field
    assert repr(value) in str(error.value)
    assert "None or a" in str(error.value)
    assert "from 0 to 4294967294" in str(error.value)


@pytest.mark.parametrize("value", [None, 0, 1000, MAX_ID])
def test_tap_owner_and_group_edges_are_accepted(value: int | None) -> None:
    assert TapOptions(owner=value, group=value) == TapOptions(value, value)


@pytest.mark.parametrize("field", ["multi_queue", "vnet_hdr"])
@pytest.mark.parametrize("value", [1, 0, "yes", "", None])
def test_tap_flags_are_bools(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as error:
        TapOptions(**{field: value})  # type: ignore[arg-type]
    assert error.value.field == field
    assert "True or False" in str(error.value)


@pytest.mark.privileged
def test_on_the_kernel_the_largest_owner_and_group_are_given_to_the_tap(
    kernel: tuple[str, KernelBackend],
) -> None:
    _, backend = kernel
    backend.create_tap("big0", TapOptions(owner=MAX_ID, group=2**31))
    link = backend.get_link("big0")
    assert link is not None
    assert link.tap is not None
    assert (link.tap.owner, link.tap.group) == (MAX_ID, 2**31)


# vm_ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vm_id", ["\udcff", "vm-\ud800", "a\x00b", "", "v" * 65, 7, None])
def test_vm_ids_must_be_encodable_printable_text(vm_id: object) -> None:
    with pytest.raises(ConfigError) as error:
        validate_vm_id(vm_id)
    assert error.value.field == "vm_id"
    assert "1 to 64 bytes (UTF-8)" in str(error.value)


def test_an_unencodable_vm_id_says_so() -> None:
    with pytest.raises(ConfigError, match="has no UTF-8 form"):
        validate_vm_id("vm-\udcff")


@pytest.mark.parametrize(("value", "kind"), [("vm-a", "str"), (b"vm-a", "bytes")])
def test_a_str_is_not_a_sequence_of_vm_ids(value: object, kind: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_vm_ids("keep", value)
    assert str(error.value) == f"invalid keep: {value!r}: a sequence of vm_ids, not a {kind}"


def test_vm_id_sequences() -> None:
    assert validate_vm_ids("keep", iter(["vm-a", "vm-b"])) == ["vm-a", "vm-b"]
    assert validate_vm_ids("keep", {"vm-a"}) == ["vm-a"]
    with pytest.raises(ConfigError, match="a sequence of vm_ids"):
        validate_vm_ids("keep", 3)
    with pytest.raises(ConfigError) as error:
        validate_vm_ids("keep", ["vm-a", 3])
    assert error.value.field == "vm_id"


def test_gc_keep_given_a_str_is_refused_and_removes_nothing(
    config: NetworkConfig,
) -> None:
    backend = FakeBackend()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-a")
        before = snapshot(backend)
        with pytest.raises(ConfigError, match=r"keep: 'vm-a': a sequence of vm_ids, not a str"):
            manager.gc(keep="vm-a")
        assert snapshot(backend) == before
        assert [a.vm_id for a in manager.list()] == ["vm-a"]
        assert manager.gc(keep=(v for v in ["vm-a"])) == []


@pytest.mark.parametrize("vm_id", ["\udcff", "vm\x00", 3])
def test_attach_and_detach_refuse_a_bad_vm_id_and_change_nothing(
    config: NetworkConfig, vm_id: object
) -> None:
    backend = FakeBackend()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        before = snapshot(backend)
        with pytest.raises(ConfigError):
            manager.attach(vm_id)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            manager.detach(vm_id)  # type: ignore[arg-type]
        assert snapshot(backend) == before
        assert manager.list() == []


@pytest.mark.parametrize(
    ("bridge", "egress", "field"),
    [
        ("br+", "up0", "bridge"),
        ("!br0", "up0", "bridge"),
        ("nvbr0", "eth+", "egress"),
        ("nvbr0", "", "egress"),
        ("nvbr0", 7, "egress"),
    ],
)
def test_a_bridge_firewall_refuses_names_that_match_more_than_themselves(
    bridge: object, egress: object, field: str
) -> None:
    from netvm.firewall import BridgeFirewall

    with pytest.raises(ConfigError) as caught:
        BridgeFirewall(bridge, ipaddress.IPv4Network("192.0.2.0/24"), egress)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_a_bridge_firewall_needs_an_ipv4_network() -> None:
    from netvm.firewall import BridgeFirewall

    with pytest.raises(ConfigError) as caught:
        BridgeFirewall("nvbr0", "192.0.2.0/24", "up0")  # type: ignore[arg-type]
    assert caught.value.field == "subnet"


class _LyingVmId(str):
    """A str subclass whose own methods say something else than the text it holds."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"short"

    def isprintable(self) -> bool:
        return True


def test_a_str_subclass_is_judged_by_the_text_it_holds(tmp_path: Path) -> None:
    from netvm import ConfigError, FakeBackend, NetworkConfig, NetworkManager
    from netvm.naming import validate_vm_id

    with pytest.raises(ConfigError, match="vm_id"):
        validate_vm_id(_LyingVmId("v" * 100))
    with pytest.raises(ConfigError, match="vm_id"):
        validate_vm_id(_LyingVmId("a\nb"))
    plain = validate_vm_id(_LyingVmId("vm-a"))
    assert type(plain) is str
    assert plain == "vm-a"
    with pytest.raises(ConfigError, match="bridge_name"):
        NetworkConfig(bridge_name=_LyingVmId("b" * 40))
    config = NetworkConfig(bridge_name=_LyingVmId("nvbr0"), state_dir=tmp_path)
    assert type(config.bridge_name) is str
    with NetworkManager(config, FakeBackend()) as manager:
        with pytest.raises(ConfigError, match="vm_id"):
            manager.attach(_LyingVmId("v" * 100))
        with pytest.raises(ConfigError, match="vm_id"):
            manager.detach(_LyingVmId("v" * 100))
