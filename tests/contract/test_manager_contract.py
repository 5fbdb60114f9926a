"""NetworkManager scenarios, run on the FakeBackend and on the kernel in a throwaway netns."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from netvm import (
    ConfigError,
    ConflictError,
    NetworkConfig,
    NetworkManager,
    NotFound,
    Rule,
    StateStoreError,
    SubnetExhausted,
    TapOptions,
)
from netvm.backends.base import FILTER, NAT, Backend
from netvm.naming import bridge_alias, guest_slot, store_id, tap_name
from netvm.testing import snapshot


def rules_of(backend: Backend, table: str, chain: str) -> list[Rule]:
    return backend.list_rules(table, chain)


def test_ensure_host_builds_bridge_address_forwarding_and_rules(manager: NetworkManager) -> None:
    backend, config = manager.backend, manager.config
    manager.ensure_host()
    bridge = backend.get_link("nvbr0")
    assert bridge is not None
    assert (bridge.kind, bridge.alias, bridge.mtu, bridge.up) == (
        "bridge",
        bridge_alias(config.vm_subnet, store_id(config.state_dir)),
        1500,
        True,
    )
    assert [str(a.interface) for a in backend.list_addresses(bridge.index)] == ["192.0.2.1/24"]
    assert backend.get_ip_forward() is True
    firewall = backend.firewall(manager.choose_firewall().kind)
    assert firewall.check(manager.firewall_policy) == []
    texts = [placed.text for placed in firewall.listing("nvbr0")]
    assert f"from {config.vm_subnet} out up0 masquerade" in texts


def test_ensure_host_n_times_equals_once(manager: NetworkManager) -> None:
    manager.ensure_host()
    once = snapshot(manager.backend)
    bridge = manager.backend.get_link("nvbr0")
    manager.ensure_host()
    manager.ensure_host()
    assert snapshot(manager.backend) == once
    again = manager.backend.get_link("nvbr0")
    assert bridge is not None
    assert again is not None
    assert again.index == bridge.index


def test_attach_puts_a_tap_on_the_bridge(manager: NetworkManager) -> None:
    manager.ensure_host()
    vm = manager.attach("vm-1")
    tap = manager.backend.get_link(vm.tap_name)
    bridge = manager.backend.get_link("nvbr0")
    assert tap is not None
    assert bridge is not None
    assert (tap.kind, tap.master, tap.mtu, tap.up, tap.alias) == (
        "tun",
        bridge.index,
        1500,
        True,
        f"netvm:nvbr0:{guest_slot(vm.guest_ip, manager.config.vm_subnet)}:vm-1",
    )
    assert vm.tap_name == tap_name("vm-1")
    assert vm.guest_ip in manager.config.vm_subnet
    assert vm.gateway_ip == ipaddress.IPv4Address("192.0.2.1")
    assert vm.kernel_ip_arg() == f"ip={vm.guest_ip}::192.0.2.1:255.255.255.0::eth0:off"


def test_attach_again_returns_the_same_network_and_device(manager: NetworkManager) -> None:
    manager.ensure_host()
    first = manager.attach("vm-1")
    link = manager.backend.get_link(first.tap_name)
    state = snapshot(manager.backend)
    assert manager.attach("vm-1") == first
    again = manager.backend.get_link(first.tap_name)
    assert link is not None
    assert again is not None
    assert again.index == link.index
    assert snapshot(manager.backend) == state


def test_attach_mends_a_netvm_tap_that_fell_off_the_bridge(
    manager: NetworkManager, config: NetworkConfig
) -> None:
    manager.ensure_host()
    vm = manager.attach("vm-1")
    manager.backend.set_link(vm.tap_name, mtu=1400, up=False)
    assert manager.attach("vm-1") == vm
    tap = manager.backend.get_link(vm.tap_name)
    assert tap is not None
    assert (tap.mtu, tap.up) == (1500, True)


@pytest.mark.parametrize(
    "other", [TapOptions(multi_queue=True), TapOptions(owner=1000), TapOptions(group=1000)]
)
def test_reattach_with_other_tap_flags_is_a_conflict(
    manager: NetworkManager, other: TapOptions
) -> None:
    manager.ensure_host()
    manager.attach("vm-1")
    before = snapshot(manager.backend)
    with pytest.raises(ConflictError, match="other flags") as conflict:
        manager.attach("vm-1", other)
    assert "owner=- group=- multi_queue=off" in str(conflict.value)
    assert snapshot(manager.backend) == before


def test_reattach_ignores_vnet_hdr_which_every_opener_sets(manager: NetworkManager) -> None:
    manager.ensure_host()
    vm = manager.attach("vm-1", TapOptions(vnet_hdr=True))
    assert manager.attach("vm-1") == vm


def test_different_vms_get_different_addresses_macs_and_taps(manager: NetworkManager) -> None:
    manager.ensure_host()
    vms = [manager.attach(f"vm-{i}") for i in range(20)]
    assert len({v.guest_ip for v in vms}) == len({v.guest_mac for v in vms}) == 20
    assert len({v.tap_name for v in vms}) == 20
    bridge = manager.backend.get_link("nvbr0")
    assert bridge is not None
    assert len(manager.backend.list_links(master=bridge.index)) == 20


def test_detach_removes_the_tap_and_frees_the_lease(manager: NetworkManager) -> None:
    manager.ensure_host()
    before = snapshot(manager.backend)
    vm = manager.attach("vm-1")
    manager.detach("vm-1")
    assert manager.list() == []
    assert manager.wait_detached()
    assert manager.backend.get_link(vm.tap_name) is None
    assert snapshot(manager.backend) == before
    manager.detach("vm-1")
    manager.detach("never-attached")
    assert manager.wait_detached()
    assert snapshot(manager.backend) == before


@pytest.mark.parametrize("vm_id", ["", "has space"])
def test_attach_and_detach_refuse_a_bad_vm_id(manager: NetworkManager, vm_id: str) -> None:
    manager.ensure_host()
    before = snapshot(manager.backend)
    with pytest.raises(ConfigError, match="vm_id"):
        manager.attach(vm_id)
    with pytest.raises(ConfigError, match="vm_id"):
        manager.detach(vm_id)
    assert snapshot(manager.backend) == before


def test_attach_before_ensure_host_says_what_to_do(manager: NetworkManager) -> None:
    before = snapshot(manager.backend)
    with pytest.raises(NotFound, match="run ensure_host"):
        manager.attach("vm-1")
    assert snapshot(manager.backend) == before
    assert manager.leases.all() == []


def test_list_and_gc(manager: NetworkManager) -> None:
    manager.ensure_host()
    for i in range(4):
        manager.attach(f"vm-{i}")
    listed = {a.vm_id: a for a in manager.list()}
    assert sorted(listed) == ["vm-0", "vm-1", "vm-2", "vm-3"]
    assert all(a.tap_present and a.on_bridge and a.network is not None for a in listed.values())
    assert manager.gc(keep=["vm-1", "vm-3"]) == ["vm-0", "vm-2"]
    assert sorted(a.vm_id for a in manager.list()) == ["vm-1", "vm-3"]
    assert manager.backend.get_link(tap_name("vm-0")) is None
    assert manager.gc(keep=["vm-1", "vm-3"]) == []


def test_teardown_leaves_the_namespace_as_it_was(manager: NetworkManager) -> None:
    pristine = snapshot(manager.backend)
    manager.ensure_host()
    for i in range(5):
        manager.attach(f"vm-{i}")
    manager.teardown_host()
    assert snapshot(manager.backend) == pristine
    assert manager.leases.all() == []
    manager.teardown_host()


def test_teardown_keeps_ip_forward_on_when_it_was_on_before(manager: NetworkManager) -> None:
    manager.backend.set_ip_forward(True)
    manager.ensure_host()
    manager.teardown_host()
    assert manager.backend.get_ip_forward() is True


def test_a_changed_egress_replaces_netvms_stale_rules(
    manager: NetworkManager, config: NetworkConfig
) -> None:
    manager.ensure_host()
    moved = NetworkManager(dataclasses.replace(config, host_egress_iface="up1"), manager.backend)
    moved.ensure_host()
    firewall = manager.backend.firewall(moved.choose_firewall().kind)
    assert firewall.check(moved.firewall_policy) == []
    texts = [placed.text for placed in firewall.listing("nvbr0")]
    assert not any("up0" in text for text in texts)
    assert "from 192.0.2.0/24 out up1 masquerade" in texts
    moved.close()


# Things that are not netvm's -----------------------------------------------------------


def test_a_bridge_netvm_did_not_create_is_not_adopted(manager: NetworkManager) -> None:
    manager.backend.create_bridge("nvbr0", 1500)
    before = snapshot(manager.backend)
    with pytest.raises(ConflictError, match="netvm did not create it"):
        manager.ensure_host()
    assert snapshot(manager.backend) == before
    with pytest.raises(ConflictError, match="nvbr0 kept: netvm did not create it"):
        manager.teardown_host()
    assert snapshot(manager.backend) == before


def test_a_device_of_the_bridges_name_that_is_no_bridge_is_an_error(
    manager: NetworkManager,
) -> None:
    manager.backend.create_tap("nvbr0", TapOptions())
    before = snapshot(manager.backend)
    with pytest.raises(ConflictError, match="not a bridge"):
        manager.ensure_host()
    assert snapshot(manager.backend) == before


def test_a_foreign_tap_with_the_vms_name_is_left_alone(manager: NetworkManager) -> None:
    manager.ensure_host()
    manager.backend.create_tap(tap_name("vm-1"), TapOptions())
    before = snapshot(manager.backend)
    with pytest.raises(ConflictError, match="not netvm's TAP"):
        manager.attach("vm-1")
    with pytest.raises(ConflictError, match="not netvm's TAP"):
        manager.detach("vm-1")
    assert snapshot(manager.backend) == before
    assert manager.leases.all() == []
    assert manager.gc() == []
    assert snapshot(manager.backend) == before


def test_foreign_rules_elsewhere_survive_teardown(manager: NetworkManager) -> None:
    mine = Rule("ACCEPT", in_iface="nvbr0", out_iface="up0")
    manager.backend.insert_rule(FILTER, "FORWARD", mine)
    manager.backend.insert_rule(NAT, "POSTROUTING", Rule("MASQUERADE", out_iface="up0"))
    manager.ensure_host()
    manager.teardown_host()
    assert rules_of(manager.backend, FILTER, "FORWARD") == [mine]
    assert rules_of(manager.backend, NAT, "POSTROUTING") == [Rule("MASQUERADE", out_iface="up0")]


def test_the_gateway_address_on_another_device_is_a_conflict(manager: NetworkManager) -> None:
    manager.backend.create_tap("other0", TapOptions())
    other = manager.backend.get_link("other0")
    assert other is not None
    manager.backend.add_address(other.index, ipaddress.IPv4Interface("192.0.2.1/25"))
    before = snapshot(manager.backend)
    with pytest.raises(ConflictError, match=r"192\.0\.2\.1 is already assigned"):
        manager.ensure_host()
    assert snapshot(manager.backend) == before


def test_a_foreign_port_on_netvms_bridge_keeps_the_bridge(manager: NetworkManager) -> None:
    manager.ensure_host()
    manager.attach("vm-1")
    manager.backend.create_tap("other0", TapOptions())
    bridge = manager.backend.get_link("nvbr0")
    assert bridge is not None
    manager.backend.set_link("other0", master=bridge.index)
    with pytest.raises(ConflictError, match="other0"):
        manager.teardown_host()
    assert manager.backend.get_link("other0") is not None
    assert manager.backend.get_link("nvbr0") is not None
    assert manager.backend.get_link(tap_name("vm-1")) is None


def test_a_slash_24_attaches_253_vms_and_refuses_the_254th(manager: NetworkManager) -> None:
    manager.ensure_host()
    vms = [manager.attach(f"vm-{i}") for i in range(253)]
    assert len({v.guest_ip for v in vms}) == len({v.guest_mac for v in vms}) == 253
    subnet = manager.config.vm_subnet
    assert all(v.guest_ip not in (subnet[0], subnet[1], subnet[-1]) for v in vms)
    before = snapshot(manager.backend)
    with pytest.raises(SubnetExhausted, match=r"192\.0\.2\.0/24 is exhausted: all 253"):
        manager.attach("vm-253")
    assert snapshot(manager.backend) == before
    manager.detach("vm-7")
    assert manager.attach("vm-253").guest_ip == vms[7].guest_ip


def test_a_slash_30_holds_exactly_one_vm(config: NetworkConfig, backend: Backend) -> None:
    tiny = dataclasses.replace(config, vm_subnet=ipaddress.IPv4Network("192.0.2.0/30"))
    with NetworkManager(tiny, backend) as manager:
        manager.ensure_host()
        vm = manager.attach("only")
        assert (str(vm.guest_ip), str(vm.gateway_ip)) == ("192.0.2.2", "192.0.2.1")
        with pytest.raises(SubnetExhausted):
            manager.attach("second")


def test_the_bridge_keeps_its_mtu_whatever_its_ports(
    config: NetworkConfig, backend: Backend
) -> None:
    """The kernel makes a bridge follow its ports' MTU unless the MTU was set by the user."""
    jumbo = dataclasses.replace(config, mtu=9000)
    with NetworkManager(jumbo, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-1")
        backend.create_tap("other0", TapOptions())
        bridge = backend.get_link("nvbr0")
        assert bridge is not None
        backend.set_link("other0", master=bridge.index, mtu=1400)
        backend.delete_link("other0")
        manager.detach("vm-1")
        after = backend.get_link("nvbr0")
        assert after is not None
        assert after.mtu == 9000


def test_attach_follows_a_bridge_made_again_behind_its_back(
    manager: NetworkManager, config: NetworkConfig
) -> None:
    manager.ensure_host()
    manager.attach("vm-1")
    old = manager.backend.get_link("nvbr0")
    manager.backend.create_tap("filler0", TapOptions())
    with NetworkManager(config, manager.backend) as other:
        other.teardown_host()
        other.ensure_host()
    new = manager.backend.get_link("nvbr0")
    assert old is not None
    assert new is not None
    assert new.index != old.index
    vm = manager.attach("vm-2")
    tap = manager.backend.get_link(vm.tap_name)
    assert tap is not None
    assert tap.master == new.index


def test_detach_deletes_the_tap_outside_the_lease_lock_and_the_callers_thread(
    manager: NetworkManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ~16 ms of a device deletion must hold up neither the caller nor other attaches."""
    import sqlite3
    import threading

    manager.ensure_host()
    assert manager.wait_detached()  # the sweep after ensure_host: it could take the TAP
    manager.attach("vm-1")
    seen: list[tuple[bool, bool]] = []
    real = manager.backend.deleter

    def deleter() -> Any:
        inner = real()

        class Probe:
            def link_groups(self) -> set[int]:
                return inner.link_groups()

            def delete_group(self, group: int) -> None:
                probe = sqlite3.connect(manager.leases.path, timeout=0, isolation_level=None)
                try:
                    probe.execute("BEGIN IMMEDIATE")
                    probe.execute("ROLLBACK")
                    free = True
                except sqlite3.OperationalError:
                    free = False
                finally:
                    probe.close()
                seen.append((free, threading.current_thread() is threading.main_thread()))
                inner.delete_group(group)

            def close(self) -> None:
                inner.close()

        return Probe()

    monkeypatch.setattr(manager.backend, "deleter", deleter)
    manager._reaper = type(manager._reaper)(manager.backend.deleter)
    manager.detach("vm-1")
    assert manager.wait_detached()
    assert seen == [(True, False)]
    assert manager.backend.get_link(tap_name("vm-1")) is None


def test_an_interrupted_detach_is_finished_by_attach_and_by_gc(manager: NetworkManager) -> None:
    """A detach marks the TAP and frees the lease, then deletes: if it stops in between,
    the next attach of that VM, or gc, deletes the marked TAP."""
    from netvm.naming import detaching_alias

    manager.ensure_host()
    assert manager.wait_detached()  # the sweep after ensure_host would delete what is marked
    for vm_id in ("vm-1", "vm-2"):
        old = manager.attach(vm_id)
        manager.backend.set_link(old.tap_name, up=False, alias=detaching_alias("nvbr0", vm_id))
        with manager.leases.transaction() as tx:
            tx.release(vm_id)
    assert manager.list() == []
    before = manager.backend.get_link(tap_name("vm-1"))
    vm = manager.attach("vm-1")
    after = manager.backend.get_link(vm.tap_name)
    assert before is not None
    assert after is not None
    assert after.index != before.index
    assert after.alias == f"netvm:nvbr0:{guest_slot(vm.guest_ip, manager.config.vm_subnet)}:vm-1"
    assert manager.gc(keep=["vm-1"]) == []
    assert manager.backend.get_link(tap_name("vm-2")) is None
    assert manager.backend.get_link(tap_name("vm-1")) is not None


def test_an_unusable_state_dir_fails_ensure_host_before_the_kernel_is_touched(
    config: NetworkConfig, backend: Backend, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    before = snapshot(backend)
    with (
        NetworkManager(dataclasses.replace(config, state_dir=blocker / "state"), backend) as m,
        pytest.raises(StateStoreError, match="MICROVM_NETWORK_STATE_DIR"),
    ):
        m.ensure_host()
    assert snapshot(backend) == before


def test_a_closed_manager_refuses_with_a_netvm_error(
    config: NetworkConfig, backend: Backend
) -> None:
    """After close(), a call would work on a lease store and a backend let go of (ensure_host
    made the bridge again): it is Closed, a NetvmError (and a RuntimeError), and changes
    nothing."""
    from netvm import Closed, NetvmError
    from netvm.testing import snapshot

    manager = NetworkManager(config, backend)
    manager.ensure_host()
    manager.close()
    before = snapshot(backend)
    for call in (
        manager.ensure_host,
        manager.teardown_host,
        manager.list,
        manager.gc,
        lambda: manager.attach("vm-1"),
        lambda: manager.attach_many(["vm-1"]),
        lambda: manager.detach("vm-1"),
        lambda: manager.detach_many(["vm-1"]),
    ):
        with pytest.raises(Closed) as refused:
            call()
        assert isinstance(refused.value, NetvmError)
        assert isinstance(refused.value, RuntimeError)
    assert snapshot(backend) == before
