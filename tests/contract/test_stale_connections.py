"""The connections of a detached VM's address go on the reaper's thread, after its TAP is
deleted, not in the next attach of that address (review26 #3: two walks of the kernel's
conntrack table per address, which the attach paid, inside the lease lock in
attach_many). The slot stays stale until they are gone, so that an attach given it before
the reaper (or after a crash or a failure) still deletes them itself.

On the kernel, the VM's flows are UDP sent from its address over loopback in the test's
namespace (a ct rule makes conntrack see them), read back from /proc/net/nf_conntrack."""

from __future__ import annotations

import errno
import ipaddress
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from netvm import FakeBackend, KernelBackend, NetworkConfig, NetworkManager
from netvm.backends.base import Backend
from netvm.backends.fake import Connection
from netvm.errors import host_error
from netvm.leases import LeaseStore
from netvm.testing import run_in_netns
from tests.required import cannot_run

PEER = ipaddress.IPv4Address("127.0.0.1")


def _flows(backend: Backend, address: ipaddress.IPv4Address) -> None:
    """Conntrack entries whose original source is `address`."""
    if isinstance(backend, FakeBackend):
        backend.state.connections += [Connection(address, PEER) for _ in range(3)]
        return
    assert isinstance(backend, KernelBackend)
    assert backend.netns is not None
    netns = backend.netns
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    rule = (
        "add table ip t; add chain ip t out { type filter hook output priority 0; }; "
        "add rule ip t out ct state new counter"
    )
    subprocess.run(["ip", "netns", "exec", netns, "nft", rule], check=True)

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((str(address), 0))
            for port in range(40000, 40003):
                sock.sendto(b"x", (str(PEER), port))

    run_in_netns(netns, send)
    subprocess.run(["ip", "-n", netns, "addr", "del", f"{address}/32", "dev", "lo"], check=True)


def _flows_of(backend: Backend, address: ipaddress.IPv4Address) -> int:
    if isinstance(backend, FakeBackend):
        return sum(address in (c.original, c.reply) for c in backend.state.connections)
    assert isinstance(backend, KernelBackend)
    assert backend.netns is not None
    listing = Path("/proc/net/nf_conntrack")
    if not listing.exists():
        cannot_run("conntrack test", "this kernel has no /proc/net/nf_conntrack to check against")
    out = subprocess.run(
        ["ip", "netns", "exec", backend.netns, "cat", str(listing)],
        capture_output=True,
        text=True,
        check=True,
    )
    return sum(f"src={address} " in line for line in out.stdout.splitlines())


def _stale(manager: NetworkManager) -> list[int]:
    with manager._changing() as tx:
        return [slot for slot, _ in tx.stale_marks()]


def test_a_detach_deletes_its_addresss_connections_before_any_attach(
    manager: NetworkManager, backend: Backend
) -> None:
    manager.ensure_host()
    network = manager.attach("vm-a")
    _flows(backend, network.guest_ip)
    assert _flows_of(backend, network.guest_ip) == 3
    manager.detach("vm-a")
    assert manager.wait_detached()
    assert _flows_of(backend, network.guest_ip) == 0
    assert _stale(manager) == [], "deleted: no attach needs to walk the table again"


def test_without_the_reaper_the_next_attach_of_the_address_deletes_them(
    manager: NetworkManager, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper's deletion fails (or its process died first): the slot stays stale, and
    the VM given the address next does not get the old one's flows."""
    manager.ensure_host()
    network = manager.attach("vm-a")
    _flows(backend, network.guest_ip)
    real = backend.forget_connections
    calls: list[ipaddress.IPv4Address] = []

    def refused(address: ipaddress.IPv4Address) -> None:
        calls.append(address)
        raise host_error("delete the connections of " + str(address), None, errno.ENOBUFS)

    monkeypatch.setattr(backend, "forget_connections", refused)
    manager.detach("vm-a")
    assert manager.wait_detached()
    assert calls == [network.guest_ip], "the reaper tried"
    assert _flows_of(backend, network.guest_ip) == 3
    monkeypatch.setattr(backend, "forget_connections", real)
    assert _stale(manager), "still stale"
    assert manager.attach("vm-a").guest_ip == network.guest_ip  # a new lease, same slot
    assert _flows_of(backend, network.guest_ip) == 0
    assert _stale(manager) == []


def test_a_slot_freed_again_meanwhile_stays_stale(config: NetworkConfig) -> None:
    """The reaper read a slot's mark, deleted its connections; meanwhile the slot was leased
    and freed again (a new tenant's flows): clearing the old mark leaves the new one."""
    store = LeaseStore(config.state_dir, "nvbr0.test", config.vm_subnet)
    try:
        with store.transaction() as tx:
            slot = tx.acquire("vm-a")[0].slot
            tx.release("vm-a")
            tx.commit()
        with store.transaction() as tx:
            seen = tx.stale_marks()
            tx.commit()
        assert [s for s, _ in seen] == [slot]
        with store.transaction() as tx:
            assert tx.acquire("vm-a")[0].slot == slot
            assert tx.take_stale(slot)
            tx.release("vm-a")
            tx.commit()
        with store.transaction() as tx:
            tx.clear_stale(seen)
            assert [s for s, _ in tx.stale_marks()] == [slot]
            tx.clear_stale(tx.stale_marks())
            assert tx.stale_marks() == []
            tx.commit()
    finally:
        store.close()


def test_a_store_from_before_the_mark_gets_it(config: NetworkConfig) -> None:
    """A store whose `stale` table has no `mark` column (the netvm of the stop before)."""
    store = LeaseStore(config.state_dir, "nvbr0.test", config.vm_subnet)
    path = store.path
    with store.transaction() as tx:
        tx.acquire("vm-a")
        tx.commit()
    store.close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE stale")
    db.execute("CREATE TABLE stale (slot INTEGER PRIMARY KEY)")
    db.execute("INSERT INTO stale VALUES (7)")
    db.close()
    store = LeaseStore(config.state_dir, "nvbr0.test", config.vm_subnet)
    try:
        with store.transaction() as tx:
            assert tx.stale_marks() == [(7, 0)]
            tx.release("vm-a")
            assert len(tx.stale_marks()) == 2
            tx.commit()
    finally:
        store.close()
