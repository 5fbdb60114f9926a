"""Fixtures of the asyncio tests: an AsyncNetworkManager over the shared `manager` fixture
(fake and kernel), gates that hold a backend call until the test lets it go, and a check
that the host holds no half attached VM.

The tests are coroutines run by pytest-asyncio (its strict mode: each module marks itself).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

from netvm import NetworkManager, naming
from netvm.aio import AsyncNetworkManager
from netvm.backends.base import Backend


@pytest_asyncio.fixture
async def net(manager: NetworkManager) -> AsyncIterator[AsyncNetworkManager]:
    """The shared manager (fake or kernel), host set up, behind an AsyncNetworkManager."""
    async_manager = AsyncNetworkManager(manager)
    await async_manager.ensure_host()
    yield async_manager
    await async_manager.aclose()


class Gate:
    """Holds calls of one backend method (for one device, or any) until released.

    `entered` is set when a call is held; after release() calls pass straight through.
    """

    def __init__(self, backend: Backend, method: str, device: str | None = None) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        self.held = 0
        original: Callable[..., Any] = getattr(backend, method)

        def gated(*args: Any, **kwargs: Any) -> Any:
            if (device is None or args[0] == device) and not self._release.is_set():
                self.held += 1
                self.entered.set()
                self._release.wait(30)
            return original(*args, **kwargs)

        setattr(backend, method, gated)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "the gated call never came"

    def release(self) -> None:
        self._release.set()


@pytest.fixture
def gates() -> Iterator[Callable[..., Gate]]:
    """Make Gates; every one is released at the end, so a failed test cannot hang aclose."""
    made: list[Gate] = []

    def make(backend: Backend, method: str, device: str | None = None) -> Gate:
        gate = Gate(backend, method, device)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.release()


@pytest.fixture
def half_states() -> Callable[[NetworkManager], list[str]]:
    return _half_states


@pytest.fixture
def leased() -> Callable[[NetworkManager], set[str]]:
    return _leased


def _half_states(manager: NetworkManager) -> list[str]:
    """Leases without their TAP on the bridge, and netvm TAPs (on the bridge or not) without
    a lease, read from the backend and the lease store directly. Call it while no call of
    the async manager is running."""
    bridge_name = manager.config.bridge_name
    leases = {lease.vm_id: lease.tap_name for lease in manager.leases.all()}
    bridge = manager.backend.get_link(bridge_name)
    assert bridge is not None
    taps = {link.name: link for link in manager.backend.list_links() if link.kind == "tun"}
    problems = []
    for vm_id, tap in leases.items():
        link = taps.get(tap)
        if link is None or link.master != bridge.index or not link.up:
            problems.append(f"lease of {vm_id} without its TAP on the bridge")
        elif naming.vm_id_from_alias(link.alias, bridge_name) != vm_id:
            problems.append(f"lease of {vm_id}: {tap} has alias {link.alias!r}")
    for name, link in taps.items():
        if name in leases.values():
            continue
        awaiting_deletion = (
            naming.detaching_vm_id(link.alias, bridge_name) is not None
            and not link.up
            and link.group != 0
        )
        if not awaiting_deletion:  # a detached TAP the reaper deletes is no half state
            problems.append(f"TAP {name} ({link.alias!r}) without a lease")
    return problems


def _leased(manager: NetworkManager) -> set[str]:
    return {lease.vm_id for lease in manager.leases.all()}
