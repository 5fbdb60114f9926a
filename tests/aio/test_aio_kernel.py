"""AsyncNetworkManager with detach managers, on the kernel in a throwaway namespace: each
has its own KernelBackend (own netlink socket), as open() makes them."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager
from netvm.aio import AsyncNetworkManager

pytestmark = [pytest.mark.asyncio, pytest.mark.privileged]

HalfStates = Callable[[NetworkManager], list[str]]


def _recording_detach(manager: NetworkManager, seen: list[tuple[int, str]], number: int) -> None:
    original = manager.detach

    def detach(vm_id: str) -> None:
        seen.append((number, threading.current_thread().name))
        original(vm_id)

    manager.detach = detach  # type: ignore[method-assign]


async def test_detaches_run_on_the_detach_managers(
    netns: str, config: NetworkConfig, half_states: HalfStates
) -> None:
    backends = [KernelBackend(netns) for _ in range(3)]
    managers = [NetworkManager(config, backend) for backend in backends]
    seen: list[tuple[int, str]] = []
    for number, manager in enumerate(managers):
        _recording_detach(manager, seen, number)
    try:
        async with AsyncNetworkManager(managers[0], detach_managers=managers[1:]) as net:
            await net.ensure_host()
            vm_ids = [f"vm-{n}" for n in range(40)]
            await asyncio.gather(*(net.attach(v) for v in vm_ids))
            await asyncio.gather(*(net.detach(v) for v in vm_ids))
            assert await net.list() == []
            # Attaches and detaches of the same vm_ids at once, across the managers.
            await asyncio.gather(
                *(net.attach(v) for v in vm_ids), *(net.detach(v) for v in vm_ids[::2])
            )
            assert half_states(managers[0]) == []
            await net.detach_many(vm_ids)
            assert half_states(managers[0]) == []
            assert await net.list() == []
            await net.teardown_host()
        used = {number for number, _ in seen}
        assert used == {1, 2}, "detaches must spread over the detach managers, not the main"
        assert all(name.startswith("netvm-aio-detach") for _, name in seen)
    finally:
        for backend in backends:
            backend.close()


async def test_open_owns_its_managers_and_survives_random_cancellations(
    netns: str, config: NetworkConfig, half_states: HalfStates
) -> None:
    net = await AsyncNetworkManager.open(config, netns)
    chooser = random.Random(7)
    vm_ids = [f"r-{n}" for n in range(16)]
    try:
        await net.ensure_host()

        async def one(number: int) -> None:
            vm_id = chooser.choice(vm_ids)
            if number % 2:
                await net.detach(vm_id)
            else:
                await net.attach(vm_id)

        tasks = [asyncio.create_task(one(n)) for n in range(200)]
        for _ in range(80):
            await asyncio.sleep(chooser.choice([0, 0.0005, 0.002, 0.005]))
            chooser.choice(tasks).cancel()
        results: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
        problems = [r for r in results if r is not None and not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, Exception)]
        assert problems == errors == []
        assert 0 < sum(isinstance(r, asyncio.CancelledError) for r in results) < len(tasks)
    finally:
        await net.aclose()
    with NetworkManager(config, KernelBackend(netns)) as check:
        try:
            assert half_states(check) == []
            check.teardown_host()
        finally:
            check.backend.close()
    # aclose closed the backends open() made: their namespace threads have ended.
    assert not [t.name for t in threading.enumerate() if t.name == f"netvm:{netns}"]
