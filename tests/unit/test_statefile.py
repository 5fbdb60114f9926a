"""The lock file: its fair queue, and operations that stay in flight after the lock is let go."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from netvm.statefile import INFLIGHT_SLOTS, PAGE, SIZE, InFlight, StateFile


def _holding(path: Path) -> StateFile:
    file = StateFile(path)
    file.acquire()
    return file


def test_an_operation_in_flight_outlives_the_lock_and_leaves_nothing_when_finished(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.lock"
    first = _holding(path)
    flight = first.begin_inflight({"op": "attach", "vm_id": "a"}, key=7)
    assert flight is not None
    first.release()
    # Another open file takes the lock at once: the operation does not hold it.
    second = _holding(path)
    assert second.in_use() == [flight.index]
    assert second.orphans() == []  # alive: not an orphan
    second.release()
    flight.finish()
    third = _holding(path)
    assert third.in_use() == []
    assert third.orphans() == []
    third.close()
    first.close()
    second.close()


def test_an_abandoned_operation_is_an_orphan_with_its_intent_until_forgotten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.lock"
    first = _holding(path)
    flight = first.begin_inflight({"op": "attach", "vm_id": "a"}, key=3)
    assert flight is not None
    first.release()
    flight.update({"op": "attach", "vm_id": "a", "failed": True})
    flight.abandon()
    second = _holding(path)
    assert second.orphans() == [(flight.index, {"op": "attach", "vm_id": "a", "failed": True})]
    second.forget_orphan(flight.index)
    assert second.orphans() == []
    assert second.in_use() == []
    second.close()
    first.close()


def _die_in_flight(path: Path, ready: multiprocessing.synchronize.Event) -> None:
    file = _holding(path)
    assert file.begin_inflight({"op": "attach", "vm_id": "dead"}, key=1) is not None
    file.release()
    ready.set()
    time.sleep(60)


def test_the_operation_of_a_killed_process_is_an_orphan(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_die_in_flight, args=(path, ready))
    child.start()
    assert ready.wait(10)
    probe = _holding(path)
    assert probe.orphans() == []  # the child lives: its operation is in flight
    probe.release()
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    probe.acquire()
    ((_, intent),) = probe.orphans()
    assert intent == {"op": "attach", "vm_id": "dead"}
    probe.close()


def test_drain_and_wait_for_wait_until_the_operation_ends(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first = _holding(path)
    flight = first.begin_inflight({"op": "attach"}, key=5)
    assert flight is not None
    first.release()
    second = _holding(path)
    # The key is busy: a second operation on it cannot go in flight.
    assert second.begin_inflight({"op": "attach"}, key=5) is None
    other = second.begin_inflight({"op": "attach"}, key=6)
    assert other is not None
    other.finish()
    ended: list[str] = []

    def end(name: str, ending: InFlight) -> None:
        ended.append(name)
        ending.finish()

    timer = threading.Timer(0.2, end, ("finished", flight))
    timer.start()
    second.wait_for(5)
    assert ended == ["finished"]
    flight = second.begin_inflight({"op": "attach"}, key=5)
    assert flight is not None
    timer = threading.Timer(0.2, end, ("again", flight))
    timer.start()
    second.drain()
    assert ended == ["finished", "again"]
    timer.join()
    second.close()
    first.close()


def test_every_slot_taken_means_no_flight(tmp_path: Path) -> None:
    file = _holding(tmp_path / "x.lock")
    flights = [file.begin_inflight({"n": k}, key=k) for k in range(INFLIGHT_SLOTS)]
    assert all(f is not None for f in flights)
    assert file.begin_inflight({"n": "one more"}, key=99) is None
    for flight in flights:
        assert flight is not None
        flight.finish()
    file.close()


def test_a_lock_file_of_one_page_grows_its_slots_and_keeps_its_intent(tmp_path: Path) -> None:
    path = tmp_path / "old.lock"
    old = _holding(path)
    old.write_intent({"op": "create-bridge", "bridge": "br0"})
    old.close()
    with open(path, "r+b") as raw:
        raw.truncate(PAGE)  # as a netvm from before in-flight slots left it
    file = _holding(path)
    assert path.stat().st_size == SIZE
    assert file.read_intent() == {"op": "create-bridge", "bridge": "br0"}
    assert file.begin_inflight({"op": "attach"}, key=1) is not None
    file.close()


def _queue(path: Path, order: list[int], me: int, started: threading.Event) -> None:
    file = StateFile(path)
    started.set()
    file.acquire()
    order.append(me)
    file.release()
    file.close()


def test_waiters_get_the_lock_in_the_order_they_came(tmp_path: Path) -> None:
    path = tmp_path / "q.lock"
    holder = _holding(path)
    order: list[int] = []
    threads = []
    for me in range(6):
        started = threading.Event()
        thread = threading.Thread(target=_queue, args=(path, order, me, started))
        thread.start()
        started.wait()
        time.sleep(0.05)  # it has taken its ticket and waits
        threads.append(thread)
    holder.release()
    for thread in threads:
        thread.join(10)
    assert order == list(range(6))
    holder.close()


def _wait_for_lock(path: Path, got: multiprocessing.synchronize.Event) -> None:
    file = StateFile(path)
    file.acquire()
    got.set()
    time.sleep(60)


def test_a_waiter_that_dies_does_not_let_the_next_one_past_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "q.lock"
    holder = _holding(path)
    context = multiprocessing.get_context("fork")
    events = [context.Event(), context.Event()]
    waiters = [context.Process(target=_wait_for_lock, args=(path, e)) for e in events]
    for waiter in waiters:
        waiter.start()
        time.sleep(0.2)  # in the queue, in this order
    assert waiters[0].pid is not None
    os.kill(waiters[0].pid, signal.SIGKILL)  # the one just before the second waiter
    waiters[0].join(10)
    # The second one waited for the dead one; now it must wait for the holder.
    assert not events[1].wait(0.5)
    holder.release()
    assert events[1].wait(10)
    assert waiters[1].pid is not None
    os.kill(waiters[1].pid, signal.SIGKILL)
    waiters[1].join(10)
    holder.close()


@pytest.mark.parametrize("damage", [b"\xff" * 8, bytes(8)], ids=["garbage", "zeroed"])
def test_a_damaged_ticket_counter_counts_again_after_the_live_tickets(
    tmp_path: Path, damage: bytes
) -> None:
    """Garbage over the counter (0xff...) made every lock fail with struct.error, so that
    not even gc or teardown could run; a counter written back to a live ticket or below
    (zeroed) let a newcomer take a ticket nobody waits behind, beside the holder. The next
    ticket now follows the highest one held, and the queue still excludes: the newcomer
    waits for the holder."""
    path = tmp_path / "x.lock"
    for _ in range(3):  # the holder's ticket is not 0
        _holding(path).close()
    holder = _holding(path)
    with open(path, "r+b") as raw:
        raw.write(damage)
    got = threading.Event()

    def newcomer() -> None:
        file = _holding(path)
        got.set()
        file.release()
        file.close()

    waiter = threading.Thread(target=newcomer)
    waiter.start()
    assert not got.wait(0.3)  # the holder still holds it
    holder.release()
    assert got.wait(10)
    waiter.join()
    holder.close()
    alone = _holding(path)  # and with nobody holding any: from 0 again, at once
    alone.release()
    alone.close()


def _hold_and_fork(path: Path, ready: Any, pids: Any, hooks: bool) -> None:
    """Hold the lock with an operation in flight, fork a child that just lives on, and
    wait to be killed. `hooks`: os.fork (Python's at-fork hooks run); else libc's fork()
    itself, as C code forking would (no hook runs)."""
    file = _holding(path)
    assert file.begin_inflight({"op": "attach"}, 1) is not None
    if hooks:
        pid = os.fork()
    else:
        import ctypes

        pid = ctypes.CDLL(None, use_errno=True).fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    pids.put(pid)
    ready.set()
    time.sleep(60)


@pytest.mark.parametrize("hooks", [True, False], ids=["os-fork", "control-fork-without-hooks"])
def test_a_forked_child_does_not_keep_a_dead_parents_locks(tmp_path: Path, hooks: bool) -> None:
    """A child forked by a netvm user (a multiprocessing worker, say) that outlives its
    parent must not hold the locks the parent died with: every other process would wait
    for the child. The control forks without Python's hooks: the child keeps them."""
    path = tmp_path / "x.lock"
    context = multiprocessing.get_context("fork")
    ready, pids = context.Event(), context.Queue()
    holder = context.Process(target=_hold_and_fork, args=(path, ready, pids, hooks))
    holder.start()
    child = None
    try:
        assert ready.wait(10)
        child = pids.get(timeout=10)
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while holder.is_alive() and time.monotonic() < deadline:  # join() would wait for the
            time.sleep(0.01)  # child too: it holds the sentinel pipe multiprocessing waits on
        got = threading.Event()
        probe = StateFile(path)

        def take() -> None:
            probe.acquire()
            probe.drain()  # the dead parent's operation in flight does not hold it either
            got.set()

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        assert got.wait(5 if hooks else 1) is hooks
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)  # not ours to wait for: its parent died
    taker.join(10)
    assert got.is_set()
    probe.release()
    probe.close()
