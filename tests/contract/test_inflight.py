"""An attach in flight: the lease lock is let go before its kernel work (fake and kernel).

The kernel work of a new VM's attach runs after the lease transaction committed, with its
intent in a slot of the lock file (netvm/statefile.py). These tests stop an attach in the
middle of that work and check what other callers see meanwhile, and that a failure there
is undone like a failure inside the transaction.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from netvm import HostError, NetworkConfig, NetworkManager
from netvm.backends.base import Backend
from netvm.errors import host_error
from netvm.leases import LeaseStore
from netvm.policy import OPEN


@contextmanager
def during_enslave(backend: Backend, probe: Callable[[], None]) -> Iterator[None]:
    """Run `probe` when the backend is asked to put a TAP on a bridge (once)."""
    real = backend.set_link
    done: list[bool] = []

    def set_link(name: str, **changes: Any) -> None:
        if changes.get("master") is not None and not done:
            done.append(True)
            probe()
        real(name, **changes)

    backend.set_link = set_link  # type: ignore[method-assign]
    try:
        yield
    finally:
        backend.set_link = real  # type: ignore[method-assign]
    assert done, "the probe never ran"


def ensure_host_settled(manager: NetworkManager) -> None:
    """ensure_host, then wait for the sweep it asks of the reaper's thread (a draining
    transaction: it would wait for the attach these tests hold in flight, and a probe's
    transaction would queue behind it)."""
    manager.ensure_host()
    assert manager.wait_detached()


def other_store(manager: NetworkManager) -> LeaseStore:
    """The same lease store, opened a second time (as another process opens it)."""
    return LeaseStore(manager.config.state_dir, manager.leases.path.stem, manager.config.vm_subnet)


def test_the_lock_is_free_while_the_tap_is_made(manager: NetworkManager) -> None:
    ensure_host_settled(manager)
    seen: list[object] = []
    store = other_store(manager)
    store.open()  # opened before: a store's first transaction waits for attaches in flight

    def probe() -> None:
        with store.transaction(drain=False) as tx:  # would block if the lock were held
            lease = tx.get("vm-1")
            seen.append(lease.slot if lease is not None else None)

    try:
        with during_enslave(manager.backend, probe):
            vm = manager.attach("vm-1", policy=OPEN)
    finally:
        store.close()
    assert seen == [manager.leases.all()[0].slot]
    assert str(vm.guest_ip) == str(manager.list()[0].network.guest_ip)  # type: ignore[union-attr]


def test_a_draining_transaction_waits_for_the_attach_in_flight(manager: NetworkManager) -> None:
    ensure_host_settled(manager)
    order: list[str] = []
    waiter: list[threading.Thread] = []

    def drain() -> None:
        store = other_store(manager)
        try:
            with store.transaction() as tx:
                order.append(f"drained with {len(tx.all())} lease(s)")
        finally:
            store.close()

    def probe() -> None:
        thread = threading.Thread(target=drain)
        thread.start()
        waiter.append(thread)
        thread.join(0.3)
        assert thread.is_alive(), "a draining transaction went past an attach in flight"
        order.append("enslaved")

    with during_enslave(manager.backend, probe):
        manager.attach("vm-1", policy=OPEN)
    order.append("attached")
    waiter[0].join(10)
    assert order[0] == "enslaved"
    assert sorted(order[1:]) == ["attached", "drained with 1 lease(s)"]


def test_a_second_attach_of_the_same_vm_waits_and_gets_the_same_network(
    config: NetworkConfig, manager: NetworkManager
) -> None:
    ensure_host_settled(manager)
    results: list[object] = []
    second: list[threading.Thread] = []

    def attach_again() -> None:
        with NetworkManager(config, manager.backend) as other:
            results.append(other.attach("vm-1", policy=OPEN))

    def probe() -> None:
        thread = threading.Thread(target=attach_again)
        thread.start()
        second.append(thread)
        thread.join(0.3)
        assert thread.is_alive(), "the second attach did not wait for the first"

    with during_enslave(manager.backend, probe):
        first = manager.attach("vm-1", policy=OPEN)
    second[0].join(10)
    assert results == [first]
    assert len(manager.leases.all()) == 1


def test_a_failure_in_flight_is_undone(manager: NetworkManager, backend: Backend) -> None:
    ensure_host_settled(manager)
    manager.attach("vm-0", policy=OPEN)

    def refuse() -> None:
        raise host_error("set link", "injected", errno.EXFULL)

    with pytest.raises(HostError), during_enslave(backend, refuse):
        manager.attach("vm-1", policy=OPEN)
    assert [lease.vm_id for lease in manager.leases.all()] == ["vm-0"]
    assert [a.vm_id for a in manager.list()] == ["vm-0"]
    taps = [link.name for link in backend.list_links() if link.kind == "tun"]
    assert taps == [manager.list()[0].tap_name]
    with manager.leases.transaction() as tx:
        assert manager.leases.file.in_use() == []
        assert tx.orphans == []
    # And the VM attaches normally afterwards, at its address.
    assert manager.attach("vm-1", policy=OPEN).vm_id == "vm-1"


def test_a_second_attach_of_a_vm_whose_attach_in_flight_fails_succeeds(
    config: NetworkConfig, manager: NetworkManager
) -> None:
    ensure_host_settled(manager)
    results: list[object] = []
    second: list[threading.Thread] = []
    other = NetworkManager(config, manager.backend)
    other.leases.open()  # opened already: its transaction waits for vm-1's attach only

    def attach_again() -> None:
        results.append(other.attach("vm-1", policy=OPEN))

    def probe() -> None:
        thread = threading.Thread(target=attach_again)
        thread.start()
        second.append(thread)
        thread.join(0.3)
        assert thread.is_alive(), "the second attach did not wait for the first"
        raise host_error("set link", "injected", errno.EXFULL)

    try:
        with pytest.raises(HostError), during_enslave(manager.backend, probe):
            manager.attach("vm-1", policy=OPEN)
        second[0].join(10)
    finally:
        other.close()
    (network,) = results
    (attached,) = manager.list()
    assert attached.network == network
    assert attached.on_bridge
    assert [link.name for link in manager.backend.list_links() if link.kind == "tun"] == [
        attached.tap_name
    ]
