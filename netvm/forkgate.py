"""fork() never copies a lease transaction into the child.

SQLite keeps per-process lock state (which connection of the process holds which lock of a
file, and of its WAL index). A child forked while another thread of the parent is inside a
transaction inherits that state as its own: a connection the child then opens on the same
database finds a write lock "held by the process" that no one in it will ever let go, and
gets "database is locked" for ever. The reaper's thread runs a transaction of its own (the
sweep after ensure_host), so a program that forks at any moment would meet this through no
fault of its own.

So a transaction enters the gate once it holds the lock file, and fork() (through
os.register_at_fork) waits until no other thread is inside; from then until the fork is
done, none enters. A transaction is inside for milliseconds (kernel work and SQLite
statements, never the wait for another process's lock). New transactions may enter while
a fork waits (a transaction inside may be waiting for one of them: the reaper's sweep
for a detach, say), so a fork waits at most FORK_WAIT seconds, then goes on with a
warning rather than hang a program.

The child gets no usable copy of a parent's manager either way (its netlink socket is
the parent's too): a lease store refuses to be used in another process than the one that
made it, and a child makes managers of its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("netvm")

FORK_WAIT = 10.0
"""Seconds a fork() waits for other threads' lease transactions to end."""


class ForkGate:
    def __init__(self) -> None:
        self._reset({})

    def _reset(self, inside: dict[int, int]) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = inside
        """Thread ident -> how many transactions (of different stores) it is inside."""
        self._held = False

    @contextmanager
    def inside(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            self._inside[me] = self._inside.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._inside[me] - 1
                if left:
                    self._inside[me] = left
                else:
                    del self._inside[me]
                    self._cond.notify_all()

    def _others(self, me: int) -> bool:
        return any(thread != me for thread in self._inside)

    def before_fork(self) -> None:
        """Wait for other threads' transactions; return holding the gate (none enters).
        The forking thread's own transactions do not count: it cannot wait for itself."""
        me = threading.get_ident()
        self._cond.acquire()
        self._held = True
        deadline = time.monotonic() + FORK_WAIT
        while self._others(me):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "fork() while another thread is in a lease transaction: the child's "
                    "lease store may report the database locked"
                )
                return
            self._cond.wait(left)

    def after_in_parent(self) -> None:
        if self._held:
            self._held = False
            self._cond.release()

    def after_in_child(self) -> None:
        """Only the forking thread lives on: its transactions are the only ones left."""
        me = threading.get_ident()
        self._reset({me: self._inside[me]} if me in self._inside else {})


GATE = ForkGate()
os.register_at_fork(
    before=GATE.before_fork,
    after_in_parent=GATE.after_in_parent,
    after_in_child=GATE.after_in_child,
)
