"""Names, MACs, addresses and the VmNetwork value (pure functions, no kernel)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

import pytest

from netvm import ConfigError, VmNetwork, naming

SUBNET = ipaddress.IPv4Network("172.30.0.0/24")


def test_kernel_ip_arg_and_mac_have_the_originals_shape() -> None:
    net = VmNetwork(
        vm_id="vm",
        tap_name="tap-deadbeef",
        guest_ip=ipaddress.IPv4Address("172.30.0.42"),
        guest_mac=bytes.fromhex("02abcdef0123"),
        gateway_ip=ipaddress.IPv4Address("172.30.0.1"),
        netmask=ipaddress.IPv4Address("255.255.255.0"),
        prefixlen=24,
    )
    assert net.kernel_ip_arg() == "ip=172.30.0.42::172.30.0.1:255.255.255.0::eth0:off"
    assert net.mac_string() == "02:ab:cd:ef:01:23"


def test_tap_names_are_short_prefixed_and_distinct() -> None:
    names = {naming.tap_name(f"vm-{i}") for i in range(2000)}
    assert len(names) == 2000
    assert all(n.startswith("tap-") and len(n) == 15 for n in names)


def test_tap_name_is_stable_across_python_runs() -> None:
    """Never the built-in hash(): a fresh interpreter (another hash seed) gives the same."""
    code = "from netvm.naming import tap_name; print(tap_name('vm-determinism'))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert other == naming.tap_name("vm-determinism")


@pytest.mark.parametrize("slot", [0, 1, 100, 252])
def test_guest_addresses_are_never_network_gateway_or_broadcast(slot: int) -> None:
    ip = naming.guest_ip(SUBNET, slot)
    assert ip in SUBNET
    assert ip not in (SUBNET.network_address, SUBNET.network_address + 1, SUBNET.broadcast_address)


def test_slots_outside_the_subnet_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        naming.guest_ip(SUBNET, 253)


def test_capacity_is_the_smaller_of_guest_addresses_and_bridge_ports() -> None:
    assert naming.guest_capacity(ipaddress.IPv4Network("10.0.0.0/30")) == 1
    assert naming.guest_capacity(SUBNET) == 253
    assert naming.guest_capacity(ipaddress.IPv4Network("10.0.0.0/22")) == 1021
    assert naming.guest_capacity(ipaddress.IPv4Network("10.0.0.0/20")) == 1023


def test_guest_mac_is_locally_administered_unicast_and_carries_the_ip() -> None:
    mac = naming.guest_mac(ipaddress.IPv4Address("172.30.0.42"))
    assert mac[0] & 0b11 == 0b10
    assert naming.format_mac(mac) == "02:6e:ac:1e:00:2a"


def test_network_for_a_slot_and_its_json_form() -> None:
    net = VmNetwork.for_slot("vm-1", SUBNET, 40)
    data = json.loads(json.dumps(net.to_dict()))
    assert data == {
        "vm_id": "vm-1",
        "tap_name": naming.tap_name("vm-1"),
        "guest_ip": "172.30.0.42",
        "guest_mac": "02:6e:ac:1e:00:2a",
        "gateway_ip": "172.30.0.1",
        "netmask": "255.255.255.0",
        "prefixlen": 24,
        "kernel_ip_arg": "ip=172.30.0.42::172.30.0.1:255.255.255.0::eth0:off",
    }


@pytest.mark.parametrize("vm_id", ["", "a b", "tab\tx", "x" * 65, "é" * 33, "bell\x07", None, 42])
def test_bad_vm_ids_are_refused(vm_id: object) -> None:
    with pytest.raises(ConfigError) as error:
        naming.validate_vm_id(vm_id)
    assert error.value.field == "vm_id"
    assert "printable" in str(error.value)


def test_alias_round_trip() -> None:
    alias = naming.tap_alias("br0", "vm:1", 7)
    assert alias == "netvm:br0:7:vm:1"
    assert naming.vm_id_from_alias(alias, "br0") == "vm:1"
    assert naming.parse_tap_alias(alias, "br0", naming.tap_name("vm:1")) == naming.TapMark(
        "vm:1", 7
    )
    assert naming.vm_id_from_alias(alias, "br1") is None
    assert naming.vm_id_from_alias("someone else", "br0") is None
    assert naming.vm_id_from_alias(None, "br0") is None


def test_the_old_tap_alias_without_a_slot_still_parses() -> None:
    assert naming.parse_tap_alias("netvm:br0:vm-1", "br0", naming.tap_name("vm-1")) == (
        naming.TapMark("vm-1", None)
    )
    # A vm_id that starts with digits and a colon: the TAP's name tells the two forms apart.
    old = "netvm:br0:12:web"
    assert naming.parse_tap_alias(old, "br0", naming.tap_name("12:web")) == naming.TapMark(
        "12:web", None
    )
    assert naming.parse_tap_alias(old, "br0", naming.tap_name("web")) == naming.TapMark("web", 12)
    # An alias whose vm_id does not hash to the TAP's name is not netvm's mark.
    assert naming.parse_tap_alias(old, "br0", "tap-00000000000") is None


def test_bridge_alias_records_the_subnet_and_the_bare_old_mark_is_accepted() -> None:
    subnet = ipaddress.IPv4Network("192.0.2.0/24")
    assert naming.bridge_alias(subnet) == "netvm-bridge:192.0.2.0/24"
    assert naming.parse_bridge_alias("netvm-bridge:192.0.2.0/24") == naming.BridgeMark(subnet)
    assert naming.parse_bridge_alias("netvm-bridge") == naming.BridgeMark(None)
    marked = naming.bridge_alias(subnet, "0123abcd")
    assert marked == "netvm-bridge:192.0.2.0/24:0123abcd"
    assert naming.parse_bridge_alias(marked) == naming.BridgeMark(subnet, "0123abcd")
    for foreign in (
        None,
        "",
        "netvm-bridge:",
        "netvm-bridge:not-a-net",
        "docker0",
        "netvm-bridge:192.0.2.0/24:nothex!!",
        "netvm-bridge:192.0.2.0/24:0123abcd:x",
    ):
        assert naming.parse_bridge_alias(foreign) is None


def test_names_are_sha256_whichever_module_computes_it() -> None:
    """TAP names, store ids and egress set names must not change between Python builds
    (the interpreter's own _sha256/_sha2 or OpenSSL's through hashlib): a TAP made by
    one must be found by another."""
    import hashlib

    assert naming.tap_name("vm-a") == "tap-" + hashlib.sha256(b"vm-a").hexdigest()[:11]
    assert naming.sha256_hex(b"\xff\x00") == hashlib.sha256(b"\xff\x00").hexdigest()
    assert naming.tap_name("vm-a") == "tap-9f5f9ca7bee"  # as every netvm release made it
