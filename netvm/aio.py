"""AsyncNetworkManager: NetworkManager's operations as coroutines, for asyncio programs.

    from netvm.aio import AsyncNetworkManager

    async with await AsyncNetworkManager.open(config) as net:
        await net.ensure_host()
        vm = await net.attach("vm-1")

The event loop only submits work and awaits it: every call of a NetworkManager (netlink,
ioctls, libiptc, SQLite) runs on a worker thread.

Threads. A NetworkManager is never called from two threads at once: each manager this
class drives is confined to its own single-thread executor, so its calls run one at a time,
in the order they were made. The *main* manager runs every operation. Extra *detach
managers*, each with its own backend and socket, run detaches beside it (made when a
detach held its socket for the kernel's ~16 ms grace period; now each manager's reaper
thread pays that off the caller's path, docs/design.md). They share the
lease database and the namespace with the main manager exactly as several netvm processes
on one host do, which netvm is built for. `open()` makes two of them by default.

Cancellation leaves no half state (no TAP without its lease, no lease without its TAP):
- a call cancelled while it waits for its worker never runs;
- otherwise the sync call runs to its end (the coroutine waits for it through any further
  cancellations), then the cancellation propagates;
- a cancelled attach or attach_many is undone: what it attached is detached before the
  CancelledError is raised. Only what the call created is undone: a vm_id that had a lease
  before the call is left attached, with the policy it had before put back, and one that
  another attach of this manager returned meanwhile is left as that attach made it. A
  cancelled detach, gc, ensure_host or teardown_host completes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from netvm import naming
from netvm.attaching import AttachManyResult
from netvm.backends.base import Backend, TapOptions
from netvm.backends.kernel import KernelBackend
from netvm.config import NetworkConfig
from netvm.errors import Closed, NetvmError
from netvm.manager import Attachment, NetworkManager
from netvm.naming import VmNetwork
from netvm.policy import GuestPolicy
from netvm.reaper import CLOSE_WAIT
from netvm.status import HostStatus, host_status

if TYPE_CHECKING:
    from netvm.diagnosis import Finding

log = logging.getLogger("netvm")
T = TypeVar("T")

DETACH_MANAGERS = 2
"""Detach managers open() makes: ~3x the detach throughput of one (docs/asyncio.md)."""


class _Lane:
    """One NetworkManager and the one thread that runs its calls."""

    def __init__(self, manager: NetworkManager, name: str) -> None:
        self.manager = manager
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.queued = 0
        """Jobs submitted and not finished (under AsyncNetworkManager._lock)."""


class _Ticket:
    """What an attach job and its coroutine tell each other about a cancellation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._finished = False
        self.created: list[str] = []
        self.previous: dict[str, str] = {}
        """vm_id -> the policy it had before the call (leased already), to put back."""
        self.tap: TapOptions | None = None
        self.generation = 0

    def finish(self) -> bool:
        """The job is done; True when the coroutine was cancelled before that."""
        with self._lock:
            self._finished = True
            return self._abandoned

    def abandon(self) -> bool:
        """The coroutine was cancelled; True when the job had finished already."""
        with self._lock:
            self._abandoned = True
            return self._finished


async def _wait_out(waiter: asyncio.Future[Any]) -> None:
    """Wait until `waiter` is done, through any number of cancellations, and retrieve its
    outcome (so that an exception nobody awaits is not reported as never retrieved)."""
    while not waiter.done():
        try:
            await asyncio.wait([waiter])
        except asyncio.CancelledError:
            continue
    if not waiter.cancelled():
        waiter.exception()


async def _outcome(future: Future[T]) -> T:
    """Await a job: its result or its exception, unchanged. Cancelled, the job is dropped
    if it has not started, else waited for; then the cancellation propagates."""
    waiter = asyncio.wrap_future(future)
    try:
        return await asyncio.shield(waiter)
    except asyncio.CancelledError:
        if not future.cancel():
            await _wait_out(waiter)
        raise


class AsyncNetworkManager:
    """NetworkManager for asyncio: the same operations and errors, as coroutines.

    It takes over `manager` (and each of `detach_managers`): from now on use them only
    through this object, which closes them in aclose(). `detach_managers` are managers of
    the same config and namespace, each with its own backend (a KernelBackend each; never
    two FakeBackends over one FakeState, which is not thread-safe): they run detaches
    beside the main manager. Usable from any running loop, and from several coroutines at
    once.
    """

    def __init__(
        self, manager: NetworkManager, *, detach_managers: Sequence[NetworkManager] = ()
    ) -> None:
        self._main = _Lane(manager, "netvm-aio")
        self._detachers = [
            _Lane(other, f"netvm-aio-detach{number}")
            for number, other in enumerate(detach_managers)
        ]
        self._lock = threading.Lock()
        self._closed = False
        self._closing: Future[None] | None = None
        self._owned_backends: list[Backend] = []
        """Backends open() made: closed after their managers."""
        self._generation = 0
        self._attached_by: dict[str, int] = {}
        """vm_id -> generation of the last attach of it that this object ran (under _lock)."""

    @classmethod
    async def open(
        cls,
        config: NetworkConfig | None = None,
        netns: str | None = None,
        *,
        detach_managers: int = DETACH_MANAGERS,
    ) -> AsyncNetworkManager:
        """Managers on the kernel in `netns` (None: this process's namespace), made off the
        loop: a KernelBackend starts a thread and waits for it."""
        settings = config if config is not None else NetworkConfig()

        def build() -> list[NetworkManager]:
            made: list[NetworkManager] = []
            try:
                for _ in range(1 + detach_managers):
                    backend = KernelBackend(netns)
                    try:
                        made.append(NetworkManager(settings, backend))
                    except BaseException:
                        backend.close()
                        raise
            except BaseException:
                _close_all(made)
                raise
            return made

        builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netvm-aio-open")
        job = builder.submit(build)
        builder.shutdown(wait=False)
        waiter = asyncio.wrap_future(job)
        try:
            managers = await asyncio.shield(waiter)
        except asyncio.CancelledError:
            await _wait_out(waiter)
            if not waiter.cancelled() and waiter.exception() is None:
                _close_off_loop(waiter.result())
            raise
        made = cls(managers[0], detach_managers=managers[1:])
        made._owned_backends = [manager.backend for manager in managers]
        return made

    @classmethod
    async def from_env(
        cls, netns: str | None = None, *, detach_managers: int = DETACH_MANAGERS
    ) -> AsyncNetworkManager:
        """open() with NetworkConfig.from_env()."""
        return await cls.open(NetworkConfig.from_env(), netns, detach_managers=detach_managers)

    @property
    def config(self) -> NetworkConfig:
        return self._main.manager.config

    # Plumbing ---------------------------------------------------------------------------

    def _submit(self, lane: _Lane, fn: Callable[[], T], *, closing: bool = False) -> Future[T]:
        with self._lock:
            if self._closed and not closing:
                raise Closed("the AsyncNetworkManager")
            future = lane.executor.submit(fn)
            lane.queued += 1
        future.add_done_callback(lambda _: self._done(lane))
        return future

    def _done(self, lane: _Lane) -> None:
        with self._lock:
            lane.queued -= 1

    def _detach_lane(self) -> _Lane:
        if not self._detachers:
            return self._main
        with self._lock:
            return min(self._detachers, key=lambda lane: lane.queued)

    def _detach_on(self, manager: NetworkManager, vm_id: str) -> None:
        manager.detach(vm_id)
        with self._lock:
            self._attached_by.pop(vm_id, None)

    # Host -------------------------------------------------------------------------------

    async def ensure_host(self) -> None:
        """NetworkManager.ensure_host: bridge, gateway, ip_forward, NAT and FORWARD rules."""
        await _outcome(self._submit(self._main, self._main.manager.ensure_host))

    async def teardown_host(self) -> None:
        """NetworkManager.teardown_host: every netvm TAP, rule and chain, and the bridge."""

        def job() -> None:
            try:
                self._main.manager.teardown_host()
            finally:
                with self._lock:
                    self._attached_by.clear()

        await _outcome(self._submit(self._main, job))

    async def status(self) -> HostStatus:
        """netvm.status.host_status of the main manager: read-only."""
        return await _outcome(self._submit(self._main, lambda: host_status(self._main.manager)))

    async def doctor(self) -> list[Finding]:
        """netvm.doctor of the main manager: read-only."""

        def job() -> list[Finding]:
            from netvm.diagnosis import doctor

            return doctor(self._main.manager)

        return await _outcome(self._submit(self._main, job))

    async def wait_detached(self, timeout: float | None = CLOSE_WAIT) -> bool:
        """NetworkManager.wait_detached for every manager this object detaches on: True
        once the TAPs detached so far are deleted, False after `timeout` seconds. It waits
        on a thread of its own, not behind the calls queued on the managers'."""
        if self._closed:
            raise Closed("the AsyncNetworkManager")
        managers = [self._main.manager, *(lane.manager for lane in self._detachers)]

        def wait() -> bool:
            deadline = None if timeout is None else time.monotonic() + timeout
            for manager in managers:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not manager.wait_detached(left):
                    return False
            return True

        return await asyncio.to_thread(wait)

    # VMs --------------------------------------------------------------------------------

    async def attach(
        self, vm_id: str, tap: TapOptions | None = None, policy: GuestPolicy | None = None
    ) -> VmNetwork:
        """NetworkManager.attach. Cancelled, it is undone if this call created the lease."""
        vm_id = naming.validate_vm_id(vm_id)
        result = await self._attach([vm_id], tap, many=False, policy=policy)
        return result.networks[vm_id]

    async def attach_many(
        self,
        vm_ids: Iterable[str],
        tap: TapOptions | None = None,
        policy: GuestPolicy | None = None,
    ) -> AttachManyResult:
        """NetworkManager.attach_many: per VM its network or its error (partial success).

        Cancelled, the VMs it attached that had no lease before the call are detached.
        """
        ids = naming.validate_vm_ids("vm_ids", vm_ids)
        return await self._attach(ids, tap, many=True, policy=policy)

    async def _attach(
        self,
        vm_ids: list[str],
        tap: TapOptions | None,
        *,
        many: bool,
        policy: GuestPolicy | None = None,
    ) -> AttachManyResult:
        manager = self._main.manager
        ticket = _Ticket()

        def job() -> AttachManyResult:
            try:
                for vm_id in vm_ids:
                    naming.validate_vm_id(vm_id)
                created, previous = _before(manager, vm_ids)
                result = self._attach_now(manager, vm_ids, created, tap, many, policy)
                with self._lock:
                    self._generation += 1
                    ticket.generation = self._generation
                    for vm_id in result.networks:
                        self._attached_by[vm_id] = ticket.generation
                ticket.created = [vm_id for vm_id in result.networks if vm_id in created]
                ticket.previous = {v: previous[v] for v in result.networks if v in previous}
                ticket.tap = tap
            except BaseException:
                ticket.finish()
                raise
            if ticket.finish():
                self._undo(ticket)
            return result

        future = self._submit(self._main, job)
        waiter = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            if future.cancel():
                raise
            late = ticket.abandon()
            await _wait_out(waiter)
            if late and not waiter.cancelled() and waiter.exception() is None:
                # The job ended before the cancellation reached it: undo in a second job.
                try:
                    undo = self._submit(self._main, lambda: self._undo(ticket), closing=True)
                except RuntimeError:
                    log.error("cancelled attach of %s not undone: manager closed", ticket.created)
                else:
                    await _wait_out(asyncio.wrap_future(undo))
            raise

    def _attach_now(
        self,
        manager: NetworkManager,
        vm_ids: list[str],
        created: set[str],
        tap: TapOptions | None,
        many: bool,
        policy: GuestPolicy | None,
    ) -> AttachManyResult:
        if not many:
            return AttachManyResult({vm_ids[0]: manager.attach(vm_ids[0], tap, policy)})
        delegate: Callable[..., AttachManyResult] | None = getattr(manager, "attach_many", None)
        if delegate is not None:
            return delegate(vm_ids, tap, policy)
        # A manager without attach_many (a stand-in): one by one, all or nothing.
        networks: dict[str, VmNetwork] = {}
        try:
            for vm_id in vm_ids:
                networks[vm_id] = manager.attach(vm_id, tap, policy)
        except BaseException:
            for vm_id in reversed(networks):
                if vm_id in created:
                    _detach_quietly(manager, vm_id, "attach_many rollback")
            raise
        return AttachManyResult(networks)

    def _undo(self, ticket: _Ticket) -> None:
        """Detach what a cancelled attach created, and give the VMs it attached again
        their policy from before (a cancelled change of policy must not stay: it may
        have loosened a tenant's guarantees), unless another attach ran since."""
        manager = self._main.manager
        for vm_id in reversed(ticket.created):
            with self._lock:
                if self._attached_by.get(vm_id) != ticket.generation:
                    continue
            _detach_quietly(manager, vm_id, "cancelled attach")
            with self._lock:
                if self._attached_by.get(vm_id) == ticket.generation:
                    del self._attached_by[vm_id]
        for vm_id, text in ticket.previous.items():
            with self._lock:
                if self._attached_by.get(vm_id) != ticket.generation:
                    continue
            try:
                # Only while it is leased: a detach since (of this object, or of another
                # process) must not be undone by the undo.
                manager._reattach_if_leased(vm_id, ticket.tap, GuestPolicy.parse(text))
            except NetvmError as exc:
                log.error("cancelled attach: the policy of %s not put back: %s", vm_id, exc)

    async def detach(self, vm_id: str) -> None:
        """NetworkManager.detach; it runs on a detach manager when there is one."""
        lane = self._detach_lane()
        await _outcome(self._submit(lane, lambda: self._detach_on(lane.manager, vm_id)))

    async def detach_many(self, vm_ids: Iterable[str]) -> None:
        """Detach each vm_id. Delegated to the sync manager's detach_many where it has one;
        otherwise every detach is tried (spread over the detach managers) and the first
        error, in the order of `vm_ids`, is raised after all have run."""
        wanted = naming.validate_vm_ids("vm_ids", vm_ids)
        lane = self._detach_lane()
        delegate: Callable[[list[str]], object] | None = getattr(lane.manager, "detach_many", None)
        if delegate is not None:

            def job() -> None:
                delegate(wanted)
                with self._lock:
                    for vm_id in wanted:
                        self._attached_by.pop(vm_id, None)

            await _outcome(self._submit(lane, job))
            return
        results = await asyncio.gather(
            *(self.detach(vm_id) for vm_id in wanted), return_exceptions=True
        )
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                raise result
        errors = [result for result in results if isinstance(result, BaseException)]
        for error in errors[1:]:
            log.error("detach_many: %s", error)
        if errors:
            raise errors[0]

    async def gc(self, keep: Iterable[str] = ()) -> list[str]:
        """NetworkManager.gc: detach every VM whose vm_id is not in `keep`."""
        kept = naming.validate_vm_ids("keep", keep)

        def job() -> list[str]:
            gone = self._main.manager.gc(kept)
            with self._lock:
                for vm_id in gone:
                    self._attached_by.pop(vm_id, None)
            return gone

        return await _outcome(self._submit(self._main, job))

    # Closing ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Let submitted calls finish, then close every manager; later calls raise
        RuntimeError. Cancelled, it still completes."""
        with self._lock:
            self._closed = True
            if self._closing is None:
                self._closing = self._main.executor.submit(self._close_job)
                self._main.executor.shutdown(wait=False)
            closing = self._closing
        waiter = asyncio.wrap_future(closing)
        await _wait_out(waiter)
        error = waiter.exception()
        if error is not None:
            raise error

    def _close_job(self) -> None:
        """On the main thread: finish the detach threads' jobs, then close every manager."""
        for lane in self._detachers:
            lane.executor.shutdown(wait=True)
        for lane in [*self._detachers, self._main]:
            lane.manager.close()
        for backend in self._owned_backends:
            backend.close()

    async def __aenter__(self) -> AsyncNetworkManager:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # Defined last: inside the class body, the name `list` is this method from here on.
    async def list(self) -> list[Attachment]:
        """NetworkManager.list: leased VMs and netvm TAPs on the bridge without a lease."""
        return await _outcome(self._submit(self._main, self._main.manager.list))


def _before(manager: NetworkManager, vm_ids: Sequence[str]) -> tuple[set[str], dict[str, str]]:
    """The vm_ids without a lease now (those an attach that follows will create), and the
    remembered policy of those with one."""
    with manager.leases.transaction() as tx:
        created = {vm_id for vm_id in vm_ids if tx.get(vm_id) is None}
        policies = {vm_id: tx.policy(vm_id) for vm_id in vm_ids if vm_id not in created}
    return created, {vm_id: text for vm_id, text in policies.items() if text is not None}


def _detach_quietly(manager: NetworkManager, vm_id: str, why: str) -> None:
    try:
        manager.detach(vm_id)
    except NetvmError as exc:
        log.error("%s: could not detach %s: %s", why, vm_id, exc)


def _close_all(managers: Sequence[NetworkManager]) -> None:
    """Close each manager and the backend open() made for it."""
    for manager in managers:
        manager.close()
        manager.backend.close()


def _close_off_loop(managers: Sequence[NetworkManager]) -> None:
    closer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netvm-aio-close")
    closer.submit(_close_all, managers)
    closer.shutdown(wait=False)
