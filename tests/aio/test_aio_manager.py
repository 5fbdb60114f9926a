"""AsyncNetworkManager on the fake and on the kernel: the sync manager's semantics and
errors, many coroutines at once, every sync call off the loop's thread."""

from __future__ import annotations

import asyncio
import errno
import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest

from netvm import (
    ConfigError,
    ConflictError,
    GuestPolicy,
    HostError,
    NetworkManager,
    NotFound,
    naming,
)
from netvm.aio import AsyncNetworkManager
from netvm.attaching import AttachManyResult
from netvm.diagnosis import doctor
from netvm.errors import host_error

pytestmark = pytest.mark.asyncio

HalfStates = Callable[[NetworkManager], list[str]]
Leased = Callable[[NetworkManager], set[str]]


async def test_operations_match_the_sync_manager(
    net: AsyncNetworkManager, manager: NetworkManager, half_states: HalfStates
) -> None:
    status = await net.status()
    assert status.ready, status.problems()
    await net.ensure_host()  # idempotent, as the sync one
    vm = await net.attach("vm-1")
    assert vm.vm_id == "vm-1"
    assert vm.guest_ip in net.config.vm_subnet
    assert await net.attach("vm-1") == vm
    (attachment,) = await net.list()
    assert (attachment.vm_id, attachment.network, attachment.on_bridge) == ("vm-1", vm, True)
    assert (await net.status()).vms_attached == 1
    await net.attach("vm-2")
    assert await net.gc(keep=["vm-2"]) == ["vm-1"]
    await net.detach("vm-2")
    await net.detach("vm-2")  # a VM already gone is success
    assert await net.list() == []
    assert half_states(manager) == []
    await net.teardown_host()
    assert not (await net.status()).bridge_present


async def test_many_coroutines_never_share_an_address(
    net: AsyncNetworkManager, manager: NetworkManager, half_states: HalfStates
) -> None:
    vm_ids = [f"vm-{n}" for n in range(60)]
    # Each vm_id twice, interleaved: the second attach must get the same network.
    networks = await asyncio.gather(*(net.attach(v) for v in vm_ids + vm_ids[::-1]))
    first, again = networks[:60], networks[60:][::-1]
    assert first == again
    assert len({vm.guest_ip for vm in first}) == 60
    assert len({vm.guest_mac for vm in first}) == 60
    assert len({vm.tap_name for vm in first}) == 60
    listed = await net.list()
    assert {a.vm_id for a in listed if a.on_bridge} == set(vm_ids)
    assert half_states(manager) == []
    await asyncio.gather(*(net.detach(v) for v in vm_ids))
    assert await net.list() == []
    assert half_states(manager) == []


async def test_netvm_errors_arrive_unchanged(
    net: AsyncNetworkManager, manager: NetworkManager, leased: Leased
) -> None:
    with pytest.raises(ConfigError) as bad:
        await net.attach("no spaces")
    assert type(bad.value) is ConfigError
    assert bad.value.field == "vm_id"
    with pytest.raises(ConfigError):
        await net.detach("")
    # A device netvm did not make stands where the TAP would go.
    manager.backend.create_bridge(naming.tap_name("squatted"), 1500)
    with pytest.raises(ConflictError, match="is not netvm's TAP"):
        await net.attach("squatted")
    with pytest.raises(ConflictError, match="is not netvm's TAP"):
        await net.detach("squatted")
    assert "squatted" not in leased(manager)
    # attach_many: each VM on its own (partial success), the error per VM.
    result = await net.attach_many(["fine-1", "squatted"])
    assert isinstance(result.errors["squatted"], ConflictError)
    assert list(result.networks) == ["fine-1"]
    assert "squatted" not in leased(manager)
    assert "fine-1" in leased(manager)


async def test_attach_before_ensure_host_raises_the_sync_error(
    manager: NetworkManager,
) -> None:
    async with AsyncNetworkManager(manager) as net:
        with pytest.raises(NotFound) as missing:
            await net.attach("vm-1")
    assert missing.value.errno == errno.ENODEV
    assert "run ensure_host() first" in str(missing.value)


def _record_threads(target: object, names: list[str], calls: list[tuple[str, int, bool]]) -> None:
    """Wrap target's methods `names` to record (name, thread id, a loop runs there)."""
    for name in names:
        original: Callable[..., Any] = getattr(target, name)

        def recorded(*args: Any, _name: str = name, _fn: Any = original, **kw: Any) -> Any:
            try:
                asyncio.get_running_loop()
                loop_here = True
            except RuntimeError:
                loop_here = False
            calls.append((_name, threading.get_ident(), loop_here))
            return _fn(*args, **kw)

        setattr(target, name, functools.wraps(original)(recorded))


BACKEND_METHODS = [
    "get_link",
    "list_links",
    "create_bridge",
    "create_tap",
    "set_link",
    "delete_link",
    "delete_links",
    "get_links",
    "change_links",
    "list_addresses",
    "add_address",
    "get_ip_forward",
    "set_ip_forward",
    "list_chains",
    "create_chain",
    "list_rules",
    "insert_rule",
    "delete_rule",
    "delete_chain",
    "firewall",
]
MANAGER_METHODS = [
    "ensure_host",
    "attach",
    "detach",
    "detach_many",
    "list",
    "gc",
    "teardown_host",
    "close",
]


async def test_no_sync_call_runs_on_the_loops_thread(manager: NetworkManager) -> None:
    calls: list[tuple[str, int, bool]] = []
    _record_threads(manager, MANAGER_METHODS, calls)
    _record_threads(manager.backend, BACKEND_METHODS, calls)
    _record_threads(manager.leases, ["transaction", "all", "open"], calls)
    loop_thread = threading.get_ident()
    async with AsyncNetworkManager(manager) as net:
        await net.ensure_host()
        await asyncio.gather(*(net.attach(f"vm-{n}") for n in range(10)))
        await net.attach_many(["many-1", "many-2"])
        await net.status()
        await net.list()
        await net.detach_many(["many-1", "many-2"])
        await asyncio.gather(*(net.detach(f"vm-{n}") for n in range(5)))
        await net.gc()
        await net.teardown_host()
    called = {name for name, _, _ in calls}
    # The recording saw the work (else the test would prove nothing).
    assert {"ensure_host", "attach", "create_tap", "change_links", "transaction"} <= called
    assert {"detach", "detach_many", "get_links"} <= called
    assert {"firewall", "close", "teardown_host", "gc"} <= called
    on_loop = [name for name, thread, loop_here in calls if thread == loop_thread or loop_here]
    assert on_loop == []


async def test_attach_many_is_all_or_nothing(
    net: AsyncNetworkManager, manager: NetworkManager, leased: Leased, half_states: HalfStates
) -> None:
    manager.attach_many = None  # type: ignore[assignment, method-assign]  # the fallback
    before = await net.attach("before")
    networks = list((await net.attach_many(["a-1", "before", "a-2"])).networks.values())
    assert [vm.vm_id for vm in networks] == ["a-1", "before", "a-2"]
    assert networks[1] == before
    refused = host_error("create tap", naming.tap_name("c-3"), errno.EIO, "injected")
    original = manager.backend.create_tap

    def create_tap(name: str, options: Any) -> int:
        if name == naming.tap_name("c-3"):
            raise refused
        return original(name, options)

    manager.backend.create_tap = create_tap  # type: ignore[method-assign]
    with pytest.raises(HostError) as failed:
        await net.attach_many(["c-1", "before", "c-2", "c-3", "c-4"])
    assert failed.value is refused
    assert leased(manager) == {"before", "a-1", "a-2"}
    assert half_states(manager) == []


async def test_detach_many_tries_every_vm_and_raises_the_first_error(
    net: AsyncNetworkManager, manager: NetworkManager, leased: Leased
) -> None:
    manager.detach_many = None  # type: ignore[method-assign, assignment]  # the fallback, always
    await net.attach_many([f"d-{n}" for n in range(6)])
    manager.backend.create_bridge(naming.tap_name("squatted"), 1500)
    with pytest.raises(ConflictError, match="is not netvm's TAP"):
        await net.detach_many(["d-0", "squatted", "d-1", "gone-already", "d-2"])
    assert leased(manager) == {"d-3", "d-4", "d-5"}
    await net.detach_many(f"d-{n}" for n in range(6))
    assert leased(manager) == set()


async def test_attach_many_and_detach_many_delegate_when_the_manager_has_them(
    manager: NetworkManager,
) -> None:
    seen: list[tuple[str, list[str]]] = []

    def attach_many(vm_ids: list[str], tap: Any = None, policy: Any = None) -> AttachManyResult:
        seen.append(("attach_many", list(vm_ids)))
        return AttachManyResult({vm_id: manager.attach(vm_id, tap) for vm_id in vm_ids})

    def detach_many(vm_ids: list[str]) -> None:
        seen.append(("detach_many", list(vm_ids)))
        for vm_id in vm_ids:
            manager.detach(vm_id)

    manager.attach_many = attach_many  # type: ignore[method-assign, assignment]
    manager.detach_many = detach_many  # type: ignore[method-assign, assignment]
    async with AsyncNetworkManager(manager) as net:
        await net.ensure_host()
        result = await net.attach_many(iter(["x-1", "x-2"]))
        assert [vm.vm_id for vm in result.networks.values()] == ["x-1", "x-2"]
        await net.detach_many(["x-1", "x-2"])
        assert await net.list() == []
    assert seen == [("attach_many", ["x-1", "x-2"]), ("detach_many", ["x-1", "x-2"])]


async def test_closed_manager_refuses_calls(manager: NetworkManager) -> None:
    net = AsyncNetworkManager(manager)
    await net.ensure_host()
    await asyncio.gather(net.aclose(), net.aclose())
    await net.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await net.attach("vm-1")


async def test_a_str_for_a_sequence_of_vm_ids_is_refused(manager: NetworkManager) -> None:
    async with AsyncNetworkManager(manager) as net:
        await net.ensure_host()
        await net.attach("vm-a")
        with pytest.raises(ConfigError, match="not a str"):
            await net.gc(keep="vm-a")
        with pytest.raises(ConfigError, match="not a str"):
            await net.attach_many("vm-b")
        with pytest.raises(ConfigError, match="not a str"):
            await net.detach_many("vm-a")
        assert [a.vm_id for a in await net.list()] == ["vm-a"]


async def test_attach_takes_the_policy_as_the_sync_one(
    net: AsyncNetworkManager, manager: NetworkManager
) -> None:
    await net.ensure_host()
    isolated = GuestPolicy.of(isolated=True)
    await net.attach("vm-p", policy=isolated)
    await net.attach("vm-d")
    policies = {a.vm_id: a.policy for a in manager.list()}
    assert policies["vm-p"] == isolated
    assert policies["vm-d"] != isolated  # the control: the default is another policy


async def test_wait_detached_and_doctor_are_there_as_on_the_sync_manager(
    net: AsyncNetworkManager, manager: NetworkManager
) -> None:
    await net.attach("vm-a")
    await net.detach("vm-a")
    assert await net.wait_detached(10)
    names = [link.name for link in manager.backend.list_links()]
    assert not [name for name in names if name.startswith(("nvdel", "tap-"))]
    findings = await net.doctor()
    assert {f.code for f in findings} == {f.code for f in doctor(manager)}
