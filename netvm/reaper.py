"""The reaper: deletes detached TAPs many at a time, on a thread of its own.

Deleting a device makes the kernel wait for an RCU grace period (~16 ms here), per
request, whoever asks. So a detach does not delete: under the lease lock it takes the TAP
down (and off the bridge where it can fill up), renames it away from its VM's name, marks
it `netvm-detaching:<bridge>:<vm_id>` and moves it into the reaper's current link group,
all in one request, then returns. The
reaper's thread deletes that group in one RTM_DELLINK, paying the grace period once for
every TAP detached meanwhile, on a netlink socket of its own (GroupDeleter), so the
manager's callers never wait behind it.

Protocol with the detaches: begin() hands out the current group and counts the detach as
in flight; end() says how many TAPs it put there. The reaper switches to a fresh group
before it deletes one, and waits for the detaches still using the old group to end, so a
TAP can never land in a group after its deletion. Groups are random numbers in
[2**20, 2**31) that no device uses when they are picked: the kernel deletes whatever is in
a group, and only netvm's detaches, on TAPs they checked, put devices there.

If the process dies before the deletion, the TAPs stay down, off the bridge and marked;
the next detach intent recovery, ensure_host (sweep), gc or teardown_host deletes them
(docs/design.md). close() waits a bounded time for the pending deletions; so does an
atexit hook for managers that were never closed. After fork() the child forgets the
parent's pending groups (the parent's thread deletes them) and starts its own thread
when it first needs one.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from netvm.backends.base import GroupDeleter

log = logging.getLogger("netvm")

LINGER = 0.005
"""Seconds the thread waits after the first detach of a batch, gathering more."""
CLOSE_WAIT = 5.0
"""Seconds close() (and the atexit hook) waits for pending deletions."""
RECHECK = 10.0
"""Seconds a group-only dump is trusted to say that netvm's emptied group is still unused."""
IDLE_EXIT = 10.0
"""Seconds without work after which the thread ends (the next detach starts another), so
that a manager dropped without close() leaves no thread; its socket goes with it."""
_GROUPS = (1 << 20, 1 << 31)

_live: weakref.WeakSet[Reaper] = weakref.WeakSet()


class Reaper:
    """The deferred deletions of one manager. `open_deleter` is called once, lazily.

    `sweep`, if given, is run on the thread when request_sweep() asks for it: the manager
    hands it the TAPs that dead processes marked (it calls begin()/end() itself).
    """

    def __init__(
        self,
        open_deleter: Callable[[], GroupDeleter],
        name: str = "netvm-reaper",
        sweep: Callable[[], None] | None = None,
    ) -> None:
        self._open_deleter = open_deleter
        self._name = name
        self._sweep = sweep
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        """A fresh state (also in a forked child, where the thread and its locks are gone)."""
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._deleter_lock = threading.Lock()
        self._deleter: GroupDeleter | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._thread: threading.Thread | None = None
        self._group: int | None = None
        self._next: int | None = None
        self._users: dict[int, int] = {}
        self._pending: dict[int, int] = {}
        """group -> TAPs put into it and not yet deleted."""
        self._doomed: set[int] = set()
        """Other groups to delete (found by recovery)."""
        self._spare: int | None = None
        """The group deleted last: empty, and free for the next batch."""
        self._checked = 0.0
        """When a dump last showed which groups are in use (time.monotonic())."""
        self._busy = False
        self._sweeping = False
        self._stopping = False
        self._closed = False

    # The detaches' side ---------------------------------------------------------------

    def begin(self) -> int:
        """The group a detach moves its TAPs into; end() must follow."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the manager is closed")
            if self._group is None:
                ready = self._next if self._next is not None else self._spare_group()
                self._group = ready if ready is not None else self._pick()
                self._next = None
            group = self._group
            self._users[group] = self._users.get(group, 0) + 1
            return group

    def end(self, group: int, added: int) -> None:
        """The detach that began with `group` put `added` TAPs there (or none)."""
        with self._cond:
            self._users[group] -= 1
            if not self._users[group]:
                del self._users[group]
            if added:
                self._pending[group] = self._pending.get(group, 0) + added
                self._start()
            self._cond.notify_all()

    def doom(self, group: int) -> None:
        """Delete group `group` too (one a dead process was filling)."""
        with self._cond:
            if group != self._group:
                self._doomed.add(group)
                self._start()
                self._cond.notify_all()

    def request_sweep(self) -> None:
        """Run the sweep on the thread, off the caller's path (at most one queued)."""
        if self._sweep is None:
            return
        with self._cond:
            if self._closed:
                return
            self._sweeping = True
            self._start()
            self._cond.notify_all()

    # Waiting and closing ----------------------------------------------------------------

    def pending(self) -> int:
        """TAPs detached and not yet deleted (by this reaper)."""
        with self._cond:
            return sum(self._pending.values())

    def wait(self, timeout: float | None = CLOSE_WAIT) -> bool:
        """Wait until every TAP handed over so far is deleted; False on timeout."""
        with self._cond:
            if self._pid != os.getpid():
                return True
            return self._cond.wait_for(self._idle, timeout)

    def close(self, timeout: float | None = CLOSE_WAIT) -> bool:
        """Delete what is pending (waiting at most `timeout`), stop the thread, close the
        deleter. False if deletions were left to gc (timeout, or an error logged)."""
        with self._cond:
            if self._pid != os.getpid():
                self._reset()  # a forked child: the parent's thread deletes its groups
            if self._closed:
                return True
            self._closed = True
            self._stopping = True
            self._sweeping = False
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "detached TAPs not deleted within %ss: the next gc or ensure_host will",
                    timeout,
                )
                return False
        with self._cond:
            left = not self._idle()
        with self._deleter_lock:
            if self._finalizer is not None:
                self._finalizer()  # closes the deleter, once
            self._deleter = self._finalizer = None
        return not left

    # The thread -------------------------------------------------------------------------

    def _idle(self) -> bool:
        return not (self._pending or self._doomed or self._busy or self._sweeping)

    def _start(self) -> None:
        """Under the lock: the thread, if it is not running (first use, or after fork)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _ensure_deleter(self) -> GroupDeleter:
        with self._deleter_lock:
            if self._deleter is None:
                deleter = self._open_deleter()
                self._deleter = deleter
                # Closed by close(), or when a manager dropped without it is collected.
                self._finalizer = weakref.finalize(self, deleter.close)
                self._finalizer.atexit = False  # at exit, _flush_at_exit needs it first
            return self._deleter

    def _spare_group(self) -> int | None:
        """Under the lock: the group deleted last (this reaper's own, emptied by its
        deletion) while the dump that showed it unused is fresh. The reuse spares a dump
        (milliseconds of Python at 1000 links, which callers would wait for through the
        GIL) at every batch."""
        spare, self._spare = self._spare, None
        fresh = time.monotonic() - self._checked < RECHECK
        if spare is None or not fresh or spare in self._pending or spare in self._doomed:
            return None
        return spare

    def _pick(self) -> int:
        """A new group number no device uses (one group-only dump)."""
        used = self._ensure_deleter().link_groups() | set(self._pending) | self._doomed
        self._checked = time.monotonic()
        while True:
            group = random.randrange(*_GROUPS)
            if group not in used:
                return group

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: not self._idle() or self._stopping, IDLE_EXIT)
                if self._idle():  # stopping, or nothing to do for a while
                    self._thread = None
                    return
                sweep, self._sweeping = self._sweeping, False
                self._busy = True
            if sweep and self._sweep is not None:
                try:
                    self._sweep()
                except Exception as exc:  # the thread must go on: gc finishes the job
                    log.error("sweep of detached TAPs failed (gc will finish it): %s", exc)
            self._prepare()
            with self._cond:
                if self._pending and not self._stopping:
                    self._cond.wait_for(lambda: self._stopping, LINGER)
                groups = self._take()
            self._delete(groups)
            self._prepare()

    def _take(self) -> list[int]:
        """Under the lock: switch to the next group and return the groups to delete once
        no detach uses them."""
        current = self._group
        if current is not None and self._pending.get(current):
            self._group = self._next
            self._next = None
        groups = sorted(set(self._pending) | self._doomed)
        self._doomed = set()
        self._cond.wait_for(lambda: not any(g in self._users for g in groups))
        return groups

    def _delete(self, groups: list[int]) -> None:
        try:
            for group in groups:
                try:
                    self._ensure_deleter().delete_group(group)
                except Exception as exc:  # the thread must go on: gc finishes the job
                    log.error("could not delete detached TAPs (gc will): %s", exc)
                with self._cond:
                    if self._pending.pop(group, None) is not None:
                        self._spare = group  # one of this reaper's own
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _prepare(self) -> None:
        """Pick the next group off the callers' path."""
        with self._cond:
            if self._next is not None or self._stopping:
                return
            spare = self._spare_group()
            if spare is not None and spare != self._group:
                self._next = spare
                return
        try:
            group = self._pick()
        except Exception as exc:
            log.debug("no group picked ahead: %s", exc)
            return
        with self._cond:
            if self._next is None and group != self._group:
                self._next = group


def _forget_in_child() -> None:
    for reaper in list(_live):
        reaper._reset()


def _flush_at_exit() -> None:
    """Managers that were never closed: give their pending deletions a bounded wait."""
    for reaper in list(_live):
        if reaper._pid == os.getpid():
            reaper.close()


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(_flush_at_exit)
