"""The deferred detach on the fake and the kernel: what a detach leaves for the reaper,
what an attach right after it does, detach_many, rollback at every step, and the sweep."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import threading
from collections.abc import Collection
from typing import Any

import pytest

from netvm import ConfigError, ConflictError, FakeBackend, HostError, NetworkConfig, NetworkManager
from netvm.backends.base import Backend, Link, LinkChange, TapOptions
from netvm.naming import detached_name, detaching_alias, tap_name
from netvm.status import host_status
from netvm.testing import snapshot


def _link(backend: Backend, name: str) -> Link:
    link = backend.get_link(name)
    assert link is not None, name
    return link


def _count_deletions(manager: NetworkManager, gate: threading.Event | None = None) -> list[int]:
    """Make the manager's reaper record each group deletion it sends (once `gate` is set,
    if given: until then the reaper's deletions wait)."""
    deleted: list[int] = []
    real = manager.backend.deleter

    def deleter() -> Any:
        inner = real()

        class Counting:
            def link_groups(self) -> set[int]:
                return inner.link_groups()

            def delete_group(self, group: int) -> None:
                if gate is not None:
                    gate.wait(30)
                deleted.append(group)
                inner.delete_group(group)

            def close(self) -> None:
                inner.close()

        return Counting()

    manager._reaper.close()
    manager._reaper = type(manager._reaper)(deleter, sweep=manager._sweep)
    return deleted


def _no_deletion_here(manager: NetworkManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's backend must not delete anything (the grace period is the reaper's)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a deletion on the caller's path")

    for name in ("delete_link", "delete_links", "delete_group"):
        monkeypatch.setattr(manager.backend, name, refuse)


def test_a_detached_tap_is_down_marked_grouped_and_not_listed(
    manager: NetworkManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.ensure_host()
    assert manager.wait_detached()  # the sweep after ensure_host has run
    gate = threading.Event()  # the reaper deletes only once the checks below are made
    _count_deletions(manager, gate)
    vm = manager.attach("vm-1")
    index = _link(manager.backend, vm.tap_name).index
    manager.attach("vm-2")
    _no_deletion_here(manager, monkeypatch)
    manager.detach("vm-1")
    assert manager.backend.get_link(vm.tap_name) is None  # the VM's name is free at once
    tap = _link(manager.backend, detached_name(index))
    assert (tap.index, tap.up, tap.alias) == (index, False, detaching_alias("nvbr0", "vm-1"))
    assert tap.group != 0
    assert [a.vm_id for a in manager.list()] == ["vm-2"]
    assert [lease.vm_id for lease in manager.leases.all()] == ["vm-2"]
    assert host_status(manager).vms_attached == 1
    monkeypatch.undo()
    gate.set()
    assert manager.wait_detached()
    assert manager.backend.get_link(vm.tap_name) is None
    assert [a.vm_id for a in manager.list()] == ["vm-2"]


def test_an_attach_right_after_its_detach_needs_no_deletion(
    manager: NetworkManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.ensure_host()
    assert manager.wait_detached()  # the sweep after ensure_host has run
    gate = threading.Event()  # the reaper deletes only once the checks below are made
    _count_deletions(manager, gate)
    first = manager.attach("vm-1", TapOptions(owner=1000))
    old = _link(manager.backend, first.tap_name)
    _no_deletion_here(manager, monkeypatch)
    manager.detach("vm-1")
    again = manager.attach("vm-1")  # other TAP options: it is a new TAP
    assert again == first
    new = _link(manager.backend, again.tap_name)
    assert new.index != old.index
    assert (new.up, new.group, new.tap) == (True, manager.port_group, TapOptions())
    renamed = _link(manager.backend, detached_name(old.index))
    assert (renamed.index, renamed.up) == (old.index, False)
    assert [a.vm_id for a in manager.list()] == ["vm-1"]
    monkeypatch.undo()
    gate.set()
    assert manager.wait_detached()
    assert manager.backend.get_link(detached_name(old.index)) is None
    assert _link(manager.backend, again.tap_name).index == new.index
    assert [(a.vm_id, a.tap_present, a.on_bridge) for a in manager.list()] == [("vm-1", True, True)]


def test_a_foreign_device_with_the_detached_name_is_left_alone(manager: NetworkManager) -> None:
    """The rename away fails (EEXIST): the old TAP is deleted by its ifindex instead."""
    manager.ensure_host()
    vm = manager.attach("vm-1")
    old = _link(manager.backend, vm.tap_name)
    manager.backend.create_tap(detached_name(old.index), TapOptions())
    foreign = _link(manager.backend, detached_name(old.index))
    manager.detach("vm-1")
    manager.attach("vm-1")
    assert manager.wait_detached()
    assert _link(manager.backend, detached_name(old.index)) == foreign
    assert _link(manager.backend, vm.tap_name).index != old.index


def test_detach_many_takes_one_deletion_for_all(manager: NetworkManager) -> None:
    manager.ensure_host()
    before = snapshot(manager.backend)
    deleted = _count_deletions(manager)
    vm_ids = [f"vm-{i}" for i in range(20)]
    for vm_id in vm_ids:
        manager.attach(vm_id)
    manager.detach_many([*vm_ids, "vm-3", "never-attached"])
    assert manager.list() == []
    assert manager.leases.all() == []
    assert manager.wait_detached()
    assert len(deleted) == 1
    assert snapshot(manager.backend) == before
    manager.detach_many([])
    manager.detach_many(iter(["vm-1"]))


def test_detach_many_over_several_chunks(
    manager: NetworkManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    import netvm.detaching

    monkeypatch.setattr(netvm.detaching, "DETACH_CHUNK", 3)
    manager.ensure_host()
    before = snapshot(manager.backend)
    vm_ids = [f"vm-{i}" for i in range(10)]
    for vm_id in vm_ids:
        manager.attach(vm_id)
    manager.detach_many(vm_ids)
    assert manager.leases.all() == []
    assert manager.wait_detached()
    assert snapshot(manager.backend) == before


def test_detach_many_refuses_before_changing_anything(manager: NetworkManager) -> None:
    manager.ensure_host()
    manager.attach("vm-1")
    manager.backend.create_tap(tap_name("vm-x"), TapOptions())
    before = snapshot(manager.backend)
    leases = manager.leases.all()
    with pytest.raises(ConflictError, match="not netvm's TAP"):
        manager.detach_many(["vm-1", "vm-x"])
    with pytest.raises(ConfigError, match="vm_ids"):
        manager.detach_many("vm-1")
    with pytest.raises(ConfigError, match="vm_id"):
        manager.detach_many(["vm-1", "has space"])
    assert manager.wait_detached()
    assert snapshot(manager.backend) == before
    assert manager.leases.all() == leases


@pytest.mark.parametrize("many", [False, True], ids=["detach", "detach_many"])
def test_a_failure_at_any_step_of_a_detach_changes_nothing(
    config: NetworkConfig, many: bool
) -> None:
    """The fake fails its k-th change (the reaper's deleter counts its own)."""
    backend = FakeBackend()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        for vm_id in ("vm-1", "vm-2", "vm-3"):
            manager.attach(vm_id)

        def operation() -> None:
            if many:
                manager.detach_many(["vm-1", "vm-3"])
            else:
                manager.detach("vm-1")

        for k in range(1, 30):
            before = snapshot(backend)
            leases = manager.leases.all()
            backend.fail_at(k)
            try:
                operation()
            except HostError as exc:
                failure = exc.errno
            else:
                backend.fail_at(None)
                break
            assert failure == errno.EIO
            assert manager.wait_detached()
            assert snapshot(backend) == before, f"step {k} left state behind"
            assert manager.leases.all() == leases, f"step {k} changed the leases"
        else:
            pytest.fail("the detach never succeeded")
        assert k > 2, "no step of the detach was cut"
        assert manager.wait_detached()
        left = {lease.vm_id for lease in manager.leases.all()}
        assert left == ({"vm-2"} if many else {"vm-2", "vm-3"})


def test_isolation_is_restored_when_a_detach_is_undone(config: NetworkConfig) -> None:
    """A large subnet: the detach releases the port, so undoing it re-isolates the port."""
    big = dataclasses.replace(config, vm_subnet=ipaddress.IPv4Network("10.20.0.0/22"))
    backend = FakeBackend()
    with NetworkManager(big, backend) as manager:
        manager.ensure_host()
        from netvm.policy import GuestPolicy

        vm = manager.attach("vm-1", policy=GuestPolicy(isolated=True))
        assert _link(backend, vm.tap_name).isolated
        real = manager._unguard_into

        def failing(taps: Collection[str], unguarded: list[Any]) -> None:
            raise HostError("remove the guarantees", ",".join(taps), errno.EIO)

        manager._unguard_into = failing  # type: ignore[method-assign]
        with pytest.raises(HostError):
            manager.detach("vm-1")
        manager._unguard_into = real  # type: ignore[method-assign]
        tap = _link(backend, vm.tap_name)
        assert (tap.up, tap.isolated, tap.group) == (True, True, manager.port_group)
        assert tap.master == _link(backend, "nvbr0").index


def test_a_large_subnet_frees_the_port_at_once_a_small_one_later(
    config: NetworkConfig, backend: Backend
) -> None:
    big = dataclasses.replace(config, vm_subnet=ipaddress.IPv4Network("10.20.0.0/22"))
    for settings, released in ((config, False), (big, True)):
        with NetworkManager(settings, backend) as manager:
            manager.ensure_host()
            vm = manager.attach("vm-1")
            index = _link(backend, vm.tap_name).index
            manager.detach("vm-1")
            tap = _link(backend, detached_name(index))
            assert (tap.master is None) == released
            assert manager.wait_detached()
            manager.teardown_host()


def test_gc_and_teardown_take_pending_taps_along(manager: NetworkManager) -> None:
    manager.ensure_host()
    before = snapshot(manager.backend)
    for vm_id in ("vm-1", "vm-2", "vm-3"):
        manager.attach(vm_id)
    manager.detach("vm-1")
    assert manager.gc(keep=["vm-3"]) == ["vm-2"]
    assert manager.backend.get_link(tap_name("vm-1")) is None
    manager.detach("vm-3")
    manager.teardown_host()
    assert [link.name for link in manager.backend.list_links()] == ["lo"]
    assert manager.wait_detached()  # the reaper finds its group empty: fine
    manager.ensure_host()
    assert snapshot(manager.backend) == before


def test_ensure_host_sweeps_taps_that_a_dead_process_marked(
    config: NetworkConfig, backend: Backend
) -> None:
    """A detach that committed and died before its reaper deleted: found by its mark."""
    with NetworkManager(config, backend) as first:
        first.ensure_host()
        before = snapshot(backend)
        vm = first.attach("vm-1")
        first.attach("vm-2")
        backend.set_link(vm.tap_name, up=False, alias=detaching_alias("nvbr0", "vm-1"))
        with first.leases.transaction() as tx:
            tx.release("vm-1")
    with NetworkManager(config, backend) as second:
        assert [a.vm_id for a in second.list()] == ["vm-2"]
        second.ensure_host()
        assert second.wait_detached()
        assert backend.get_link(vm.tap_name) is None
        second.detach("vm-2")
    after = NetworkManager(config, backend)
    after.close()
    assert snapshot(backend) == before


def test_close_deletes_what_is_pending(config: NetworkConfig, backend: Backend) -> None:
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        before = snapshot(backend)
        for i in range(5):
            manager.attach(f"vm-{i}")
        manager.detach_many([f"vm-{i}" for i in range(5)])
    assert snapshot(backend) == before
    closed = NetworkManager(config, backend)
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.detach("vm-1")


def test_two_managers_on_one_bridge_detach_and_attach_across(
    config: NetworkConfig, backend: Backend
) -> None:
    with NetworkManager(config, backend) as a, NetworkManager(config, backend) as b:
        a.ensure_host()
        before = snapshot(backend)
        first = a.attach("vm-1")
        a.detach("vm-1")
        assert b.attach("vm-1") == first  # renames a's pending TAP away, into b's group
        b.detach("vm-1")
        assert a.wait_detached()
        assert b.wait_detached()
        assert snapshot(backend) == before


def test_on_a_kernel_that_renames_no_device_that_is_up_detach_renames_after_down(
    config: NetworkConfig,
) -> None:
    backend = FakeBackend()
    backend.state.live_rename = False  # Linux < 6.2
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        before = snapshot(backend)
        vm = manager.attach("vm-1")
        index = _link(backend, vm.tap_name).index
        manager.detach("vm-1")
        assert _link(backend, detached_name(index)).up is False
        assert manager.attach("vm-1") == vm
        manager.detach("vm-1")
        assert manager.wait_detached()
        assert snapshot(backend) == before


@pytest.mark.parametrize("live_rename", [True, False], ids=["linux-6.2+", "older-kernel"])
def test_a_vm_moves_to_another_bridge_right_after_its_detach(
    config: NetworkConfig, live_rename: bool
) -> None:
    """On a kernel that renames no device that is up, the detached TAP keeps the VM's name
    until its reaper deletes it: the other bridge's attach renames it away (it is netvm's,
    retired), and that bridge's detach of the VM leaves it to its own reaper."""
    backend = FakeBackend()
    backend.state.live_rename = live_rename
    other = dataclasses.replace(
        config, bridge_name="nvbr1", vm_subnet=ipaddress.IPv4Network("198.51.100.0/24")
    )
    with NetworkManager(config, backend) as a, NetworkManager(other, backend) as b:
        a.ensure_host()
        b.ensure_host()
        before = snapshot(backend)
        first = a.attach("vm-1")
        old = _link(backend, first.tap_name).index
        a.detach("vm-1")
        moved = b.attach("vm-1")
        tap = _link(backend, moved.tap_name)
        assert (tap.index != old, tap.master) == (True, _link(backend, "nvbr1").index)
        assert [x.vm_id for x in b.list()] == ["vm-1"]
        assert a.list() == []
        b.detach("vm-1")
        a.attach("vm-1")  # and back, before b's reaper deleted the TAP it retired
        assert [(x.vm_id, x.on_bridge) for x in a.list()] == [("vm-1", True)]
        a.detach("vm-1")
        b.detach("vm-1")  # a TAP nvbr0 retired (or none): success, nothing of nvbr0's touched
        assert a.wait_detached()
        assert b.wait_detached()
        assert snapshot(backend) == before


def test_the_sweep_puts_an_older_netvms_taps_in_their_port_group(
    config: NetworkConfig, backend: Backend
) -> None:
    """A TAP attached before TAPs had a port group (the default group, 0) is moved into it
    by the sweep after the next ensure_host, where the bridge's input rule sees it."""
    with NetworkManager(config, backend) as first:
        first.ensure_host()
        vm = first.attach("vm-1")
        link = backend.get_link(vm.tap_name)
        assert link is not None
        assert not backend.change_links([LinkChange(link.index, group=0)])
    with NetworkManager(config, backend) as second:
        second.ensure_host()
        assert second.wait_detached()  # the sweep has run
        moved = backend.get_link(vm.tap_name)
        assert moved is not None
        assert moved.group == second.port_group
        assert [a.vm_id for a in second.list()] == ["vm-1"]
