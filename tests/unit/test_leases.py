"""The lease store: collision-free, stable, shared by processes (SQLite, no kernel)."""

from __future__ import annotations

import ipaddress
import multiprocessing
from pathlib import Path

import pytest

from netvm import ConfigError, HostError, StateStoreError, SubnetExhausted, naming
from netvm.leases import LeaseStore

SLASH24 = ipaddress.IPv4Network("192.0.2.0/24")


def acquire(store: LeaseStore, vm_id: str) -> tuple[int, bool]:
    with store.transaction() as tx:
        lease, created = tx.acquire(vm_id)
    return lease.slot, created


def test_a_slash_24_holds_253_distinct_guests_and_refuses_the_254th(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path, "br0", SLASH24)
    slots = [acquire(store, f"vm-{i}")[0] for i in range(253)]
    ips = {naming.guest_ip(SLASH24, s) for s in slots}
    macs = {naming.guest_mac(ip) for ip in ips}
    assert len(ips) == len(macs) == 253
    assert SLASH24.network_address + 1 not in ips
    assert SLASH24.broadcast_address not in ips
    with pytest.raises(SubnetExhausted) as full:
        acquire(store, "vm-253")
    assert "192.0.2.0/24" in str(full.value)
    assert "253" in str(full.value)
    assert full.value.capacity == 253


def test_a_slash_30_holds_exactly_one_guest(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path, "br0", ipaddress.IPv4Network("192.0.2.0/30"))
    assert acquire(store, "a") == (0, True)
    with pytest.raises(SubnetExhausted):
        acquire(store, "b")


def test_a_large_subnet_is_capped_by_the_bridge_port_limit(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path, "br0", ipaddress.IPv4Network("10.200.0.0/20"))
    assert store.capacity == 1023
    with store.transaction() as tx:
        for i in range(1023):
            tx.acquire(f"vm-{i}")
        with pytest.raises(SubnetExhausted, match="at most 1023 ports"):
            tx.acquire("one-too-many")


def test_the_same_vm_id_gets_the_same_lease_and_release_frees_it(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path, "br0", SLASH24)
    slot, created = acquire(store, "vm-a")
    assert created
    assert acquire(store, "vm-a") == (slot, False)
    assert acquire(LeaseStore(tmp_path, "br0", SLASH24), "vm-a") == (slot, False)
    with store.transaction() as tx:
        assert tx.release("vm-a") is True
        assert tx.release("vm-a") is False
    assert store.all() == []


def test_a_vm_id_prefers_its_hashed_slot_on_a_fresh_host(tmp_path: Path) -> None:
    preferred = naming.preferred_slot("vm-x", 253)
    assert acquire(LeaseStore(tmp_path / "a", "br0", SLASH24), "vm-x")[0] == preferred
    assert acquire(LeaseStore(tmp_path / "b", "br0", SLASH24), "vm-x")[0] == preferred


def test_a_collision_on_the_preferred_slot_takes_the_next_free_one(tmp_path: Path) -> None:
    capacity = naming.guest_capacity(SLASH24)
    first = "vm-0"
    target = naming.preferred_slot(first, capacity)
    rival = next(
        f"rival-{i}"
        for i in range(100_000)
        if naming.preferred_slot(f"rival-{i}", capacity) == target
    )
    store = LeaseStore(tmp_path, "br0", SLASH24)
    assert acquire(store, first)[0] == target
    assert acquire(store, rival)[0] == (target + 1) % capacity


def test_a_failed_transaction_leaves_no_lease(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path, "br0", SLASH24)

    def attach_that_fails() -> None:
        with store.transaction() as tx:
            tx.acquire("vm-a")
            raise RuntimeError("the TAP could not be made")

    with pytest.raises(RuntimeError):
        attach_that_fails()
    assert store.all() == []


def test_changing_the_subnet_under_live_leases_is_refused(tmp_path: Path) -> None:
    acquire(LeaseStore(tmp_path, "br0", SLASH24), "vm-a")
    other = LeaseStore(tmp_path, "br0", ipaddress.IPv4Network("198.51.100.0/24"))
    with pytest.raises(ConfigError, match="holds 1 leases"):
        other.all()


def _acquire_many(state_dir: str, prefix: str, count: int) -> list[tuple[str, int]]:
    store = LeaseStore(Path(state_dir), "br0", SLASH24)
    result = []
    for i in range(count):
        with store.transaction() as tx:
            lease, _ = tx.acquire(f"{prefix}-{i}" if prefix else "shared")
        result.append((lease.vm_id, lease.slot))
    store.close()
    return result


def test_processes_attaching_at_once_get_distinct_slots(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        # A timeout: a worker that dies (or cannot import this module) must fail the test,
        # not hang it.
        args = [(str(tmp_path), f"p{n}", 40) for n in range(4)]
        runs = pool.starmap_async(_acquire_many, args).get(timeout=120)
    leases = [lease for run in runs for lease in run]
    assert len(leases) == 160
    assert len({slot for _, slot in leases}) == 160
    with context.Pool(4) as pool:
        shared = pool.starmap_async(_acquire_many, [(str(tmp_path), "", 1)] * 4).get(timeout=120)
    assert len({run[0] for run in shared}) == 1
    assert len(LeaseStore(tmp_path, "br0", SLASH24).all()) == 161


def test_an_unwritable_state_dir_says_what_to_set(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = LeaseStore(blocker / "state", "br0", SLASH24)
    with pytest.raises(StateStoreError) as error:
        store.all()
    assert "Not a directory" in str(error.value)
    assert "MICROVM_NETWORK_STATE_DIR" in str(error.value)
    assert not isinstance(error.value, HostError)


@pytest.mark.parametrize("inside", [False, True], ids=["the-file", "under-the-file"])
def test_a_state_dir_that_is_a_file_is_named_not_a_directory(tmp_path: Path, inside: bool) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    state_dir = plain / "sub" if inside else plain
    with pytest.raises(StateStoreError, match=r"Not a directory \(ENOTDIR\)") as raised:
        LeaseStore(state_dir, "br0", SLASH24).open()
    assert str(raised.value).count("must be a writable directory") == 1
