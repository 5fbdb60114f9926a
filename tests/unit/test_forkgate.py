"""fork() and the lease store: no transaction is copied into a child, and a child cannot
use its parent's store (SQLite, no kernel)."""

from __future__ import annotations

import ipaddress
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from netvm import UsedAfterFork, forkgate
from netvm.leases import LeaseStore

SLASH24 = ipaddress.IPv4Network("192.0.2.0/24")


def _child_result(pid: int, read_end: int, wait: float) -> bytes:
    """What the child wrote before it exited, or b"hung" (then it is killed)."""
    ready, _, _ = select.select([read_end], [], [], wait)
    if not ready:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return b"hung"
    out = os.read(read_end, 4096)
    os.waitpid(pid, 0)
    return out


def _in_a_child(work: Callable[[], bytes], wait: float = 8) -> bytes:
    """What `work` returns in a forked child (or its exception's repr, or b"hung")."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        answer = b"error"
        try:
            answer = work()
        except BaseException as exc:
            answer = repr(exc).encode()
        finally:
            os.write(write_end, answer)
            os._exit(0)
    os.close(write_end)
    try:
        return _child_result(pid, read_end, wait)
    finally:
        os.close(read_end)


def _fork_while_a_thread_is_inside(tmp_path: Path, store: LeaseStore, hold: float) -> bytes:
    """Fork while another thread's transaction lasts `hold` seconds; the child opens a
    store of its own on the same database and leases."""
    inside = threading.Event()

    def transaction_on_a_thread() -> None:
        with store.transaction() as tx:
            tx.acquire("vm-thread")
            inside.set()
            time.sleep(hold)

    thread = threading.Thread(target=transaction_on_a_thread)
    thread.start()
    assert inside.wait(10)

    def lease_in_the_child() -> bytes:
        child = LeaseStore(tmp_path, "br0", SLASH24)
        with child.transaction() as tx:
            lease, _ = tx.acquire("vm-child")
        return f"slot {lease.slot}".encode()

    try:
        return _in_a_child(lease_in_the_child)
    finally:
        thread.join()


def test_a_child_forked_while_a_thread_is_in_a_transaction_can_use_the_store(
    tmp_path: Path,
) -> None:
    store = LeaseStore(tmp_path, "br0", SLASH24)
    store.open()
    assert _fork_while_a_thread_is_inside(tmp_path, store, 0.3).startswith(b"slot ")
    with store.transaction() as tx:
        assert {lease.vm_id for lease in tx.all()} == {"vm-thread", "vm-child"}


def test_without_the_gate_such_a_child_finds_the_database_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The negative control: what the gate prevents happens when the fork does not wait."""
    monkeypatch.setattr(forkgate.GATE, "_others", lambda me: False)
    store = LeaseStore(tmp_path, "br0", SLASH24)
    store.open()
    monkeypatch.setattr("netvm.leases.LOCK_TIMEOUT", 1.0)
    answer = _fork_while_a_thread_is_inside(tmp_path, store, 2)
    assert not answer.startswith(b"slot ")
    assert b"locked" in answer or answer == b"hung"


def test_a_child_cannot_use_its_parents_store_and_closing_it_changes_nothing(
    tmp_path: Path,
) -> None:
    store = LeaseStore(tmp_path, "br0", SLASH24)
    with store.transaction() as tx:
        tx.acquire("vm-a")

    def use_the_parents() -> bytes:
        try:
            store.all()
            answer = b"used the parent's store"
        except UsedAfterFork as exc:
            answer = str(exc).encode()
        store.close()
        return answer

    answer = _in_a_child(use_the_parents)
    assert b"before a fork()" in answer
    assert b"make a new KernelBackend and NetworkManager in the child" in answer
    with store.transaction() as tx:
        assert tx.acquire("vm-b")[1]
        assert {lease.vm_id for lease in tx.all()} == {"vm-a", "vm-b"}


def test_a_fork_waits_a_bounded_time_for_a_transaction_that_does_not_end(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(forkgate, "FORK_WAIT", 0.2)
    gate = forkgate.ForkGate()
    inside, done = threading.Event(), threading.Event()

    def stuck() -> None:
        with gate.inside():
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=stuck)
    thread.start()
    assert inside.wait(10)
    start = time.monotonic()
    gate.before_fork()
    waited = time.monotonic() - start
    gate.after_in_parent()
    done.set()
    thread.join()
    assert 0.2 <= waited < 5
    assert "lease transaction" in caplog.text


def test_a_fork_from_inside_a_transaction_does_not_wait_for_itself() -> None:
    gate = forkgate.ForkGate()
    with gate.inside():
        start = time.monotonic()
        gate.before_fork()
        gate.after_in_parent()
        assert time.monotonic() - start < 1
