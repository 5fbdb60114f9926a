"""Cancelling AsyncNetworkManager calls: never a TAP without its lease or a lease without
its TAP. A cancelled attach is undone (only what it created); other calls complete.

A Gate holds one backend call on the worker thread, so that the cancellation lands while
the sync attach is in the middle of its work, deterministically."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from netvm import NetworkManager, naming
from netvm.aio import AsyncNetworkManager
from netvm.policy import OPEN, GuestPolicy

pytestmark = pytest.mark.asyncio

HalfStates = Callable[[NetworkManager], list[str]]
Leased = Callable[[NetworkManager], set[str]]
Gates = Callable[..., Any]  # conftest.Gate


async def _still_running(task: asyncio.Task[object]) -> bool:
    """Give the loop a few turns; True if the task has not ended."""
    for _ in range(20):
        await asyncio.sleep(0)
    return not task.done()


# create_tap: before the TAP exists. set_link: the TAP exists, not on the bridge yet, the
# lease transaction still open.
@pytest.mark.parametrize("step", ["create_tap", "set_link"])
async def test_attach_cancelled_midway_is_undone(
    net: AsyncNetworkManager,
    manager: NetworkManager,
    gates: Gates,
    half_states: HalfStates,
    leased: Leased,
    step: str,
) -> None:
    gate = gates(manager.backend, step, naming.tap_name("vm-c"))
    task = asyncio.create_task(net.attach("vm-c"))
    await gate.wait_entered()
    task.cancel()
    assert await _still_running(task), "the cancelled attach returned while the sync one ran"
    task.cancel()  # a second cancellation does not cut the wait short either
    assert await _still_running(task)
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.held == 1
    assert "vm-c" not in leased(manager)
    assert manager.wait_detached()  # the TAP's deletion follows the detach
    assert manager.backend.get_link(naming.tap_name("vm-c")) is None
    assert half_states(manager) == []
    # The manager goes on working, and the vm_id can be attached again.
    vm = await net.attach("vm-c")
    assert vm.vm_id == "vm-c"
    assert half_states(manager) == []


async def test_attach_cancelled_while_queued_never_runs(
    net: AsyncNetworkManager, manager: NetworkManager, gates: Gates, leased: Leased
) -> None:
    gate = gates(manager.backend, "create_tap", naming.tap_name("first"))
    first = asyncio.create_task(net.attach("first"))
    await gate.wait_entered()
    queued = asyncio.create_task(net.attach("queued"))
    await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued  # at once: the worker is still busy with `first`
    assert not first.done()
    gate.release()
    assert (await first).vm_id == "first"
    assert leased(manager) == {"first"}


async def test_cancelled_reattach_leaves_the_existing_vm(
    net: AsyncNetworkManager,
    manager: NetworkManager,
    gates: Gates,
    half_states: HalfStates,
    leased: Leased,
) -> None:
    vm = await net.attach("kept")
    gate = gates(manager.backend, "create_tap", naming.tap_name("kept"))
    task = asyncio.create_task(net.attach("kept"))
    await gate.wait_entered()
    task.cancel()
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leased(manager) == {"kept"}
    assert (await net.attach("kept")) == vm
    assert half_states(manager) == []


async def test_attach_cancelled_after_its_job_ended_is_undone(
    net: AsyncNetworkManager, manager: NetworkManager, half_states: HalfStates, leased: Leased
) -> None:
    """The cancellation reaches the coroutine after the worker finished the attach: the
    loop's thread is held (on purpose) until then, so the coroutine never saw the result."""
    task = asyncio.create_task(net.attach("late"))
    await asyncio.sleep(0)  # the job is submitted
    assert net._main.queued == 1
    deadline = time.monotonic() + 30
    while net._main.queued and time.monotonic() < deadline:
        time.sleep(0.001)  # holds the loop: the task cannot resume meanwhile
    assert net._main.queued == 0, "the attach job did not end"
    assert "late" in leased(manager)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "late" not in leased(manager)
    assert half_states(manager) == []


async def test_cancelled_attach_keeps_what_another_attach_returned(
    net: AsyncNetworkManager,
    manager: NetworkManager,
    gates: Gates,
    half_states: HalfStates,
    leased: Leased,
) -> None:
    gate = gates(manager.backend, "set_link", naming.tap_name("shared"))
    cancelled = asyncio.create_task(net.attach("shared"))
    await gate.wait_entered()
    other = asyncio.create_task(net.attach("shared"))
    await asyncio.sleep(0)
    cancelled.cancel()
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    vm = await other
    assert vm.vm_id == "shared"
    assert leased(manager) == {"shared"}
    assert half_states(manager) == []


async def test_timeout_around_attach_leaves_no_half_state(
    net: AsyncNetworkManager,
    manager: NetworkManager,
    gates: Gates,
    half_states: HalfStates,
    leased: Leased,
) -> None:
    gate = gates(manager.backend, "set_link", naming.tap_name("slow"))

    async def release_later() -> None:
        await gate.wait_entered()
        await asyncio.sleep(0.2)
        gate.release()

    releaser = asyncio.create_task(release_later())
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await net.attach("slow")
    await releaser
    assert "slow" not in leased(manager)
    assert half_states(manager) == []


async def test_attach_many_cancelled_midway_undoes_what_it_attached(
    net: AsyncNetworkManager,
    manager: NetworkManager,
    gates: Gates,
    half_states: HalfStates,
    leased: Leased,
) -> None:
    manager.attach_many = None  # type: ignore[assignment, method-assign]  # the fallback
    await net.attach("m-0")
    gate = gates(manager.backend, "create_tap", naming.tap_name("m-3"))
    task = asyncio.create_task(net.attach_many([f"m-{n}" for n in range(5)]))
    await gate.wait_entered()
    task.cancel()
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leased(manager) == {"m-0"}
    assert half_states(manager) == []


async def test_cancelled_detach_completes(
    net: AsyncNetworkManager,
    manager: NetworkManager,
    gates: Gates,
    half_states: HalfStates,
    leased: Leased,
) -> None:
    await net.attach("gone")
    gate = gates(manager.backend, "get_link", naming.tap_name("gone"))
    task = asyncio.create_task(net.detach("gone"))
    await gate.wait_entered()
    task.cancel()
    assert await _still_running(task)
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leased(manager) == set()
    assert manager.wait_detached()  # the TAP's deletion follows the detach
    assert manager.backend.get_link(naming.tap_name("gone")) is None
    assert half_states(manager) == []


async def test_random_cancellations_of_mixed_calls_leave_no_half_state(
    net: AsyncNetworkManager, manager: NetworkManager, half_states: HalfStates
) -> None:
    chooser = random.Random(11)
    vm_ids = [f"r-{n}" for n in range(12)]

    async def one(number: int) -> None:
        vm_id = chooser.choice(vm_ids)
        if number % 3 == 2:
            await net.detach(vm_id)
        elif number % 7 == 0:
            await net.attach_many(chooser.sample(vm_ids, 3))
        else:
            await net.attach(vm_id)

    tasks = [asyncio.create_task(one(n)) for n in range(150)]
    for _ in range(60):
        await asyncio.sleep(chooser.choice([0, 0, 0.0005, 0.002]))
        chooser.choice(tasks).cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)]
    assert errors == []
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert 0 < cancelled < len(tasks)
    assert half_states(manager) == []
    listed = await net.list()
    assert all(a.on_bridge and a.network is not None for a in listed)


async def test_a_cancelled_reattach_puts_the_policy_from_before_back(
    net: AsyncNetworkManager, manager: NetworkManager, gates: Gates, half_states: HalfStates
) -> None:
    """A cancelled change of policy must not stay: here it would loosen a tenant's."""
    strict = GuestPolicy.of(isolated=True, egress_deny=["198.51.100.0/24"])
    await net.attach("tenant", policy=strict)
    gate = gates(manager.backend, "create_tap", naming.tap_name("tenant"))
    task = asyncio.create_task(net.attach("tenant", policy=OPEN))
    await gate.wait_entered()
    task.cancel()
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {a.vm_id: a.policy for a in manager.list()} == {"tenant": strict}
    assert half_states(manager) == []
    await net.attach("tenant", policy=OPEN)  # the control: not cancelled, the change stays
    assert {a.vm_id: a.policy for a in manager.list()} == {"tenant": None}


async def test_the_undo_of_a_cancelled_reattach_does_not_bring_back_a_detached_vm(
    net: AsyncNetworkManager, manager: NetworkManager, leased: Leased
) -> None:
    """The cancellation reaches the coroutine after its job ended, so the undo runs as a
    job of its own; before it, another process (here the sync manager) detaches the VM.
    The undo puts a policy back only on a VM still leased: it must not make it again."""
    await net.attach("tenant", policy=GuestPolicy.of(isolated=True))
    started, go = threading.Event(), threading.Event()

    def someone_else_detaches() -> None:
        started.set()
        go.wait(10)
        manager.detach("tenant")

    task = asyncio.create_task(net.attach("tenant", policy=OPEN))
    await asyncio.sleep(0)  # the attach job is submitted
    queued = net._submit(net._main, someone_else_detaches)  # and this behind it
    assert started.wait(10)  # the loop is held here: the attach job has ended
    task.cancel()  # before the coroutine saw its result
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    queued.result(10)
    assert leased(manager) == set()
    assert [a.vm_id for a in manager.list()] == []
