"""A lock file shared by netvm's processes: a fair lock, and the intent of its holder.

Whoever changes a bridge's leases (or a namespace's host set-up) holds the lock of its
StateFile, and before it changes the kernel in a way a crash could leave half done, it
writes what it is about to do (the intent) into the file; it clears the intent once the
change is complete or undone. The next holder finds an intent only if its writer died
mid-way, and mends the kernel from it (see docs/design.md, "Crash safety").

The lock is a queue, first come first served, built from open-file-description (OFD)
byte-range locks: a waiter takes a ticket t and waits until no lower ticket's byte is
locked. flock() alone is unfair (the releasing process usually takes it again before a
woken waiter runs: p99 60-90 ms with 8 processes on 2 vCPUs), and SQLite's busy handler
sleeps and polls. The kernel drops a dead process's locks, so a killed holder or waiter
never blocks the queue. OFD locks belong to the open file, not the process, so two
StateFiles of one process exclude each other too; threads sharing one StateFile are
serialised by its caller.

The intent lives in the first page of the file, written over in place: the page is
allocated when the file is made, so writing an intent never needs free space.

In-flight operations. An operation may go on after the lock is let go (an attach does its
kernel work there, so that the lock is held only for the lease): under the lock it takes
one of INFLIGHT_SLOTS slots (`begin_inflight`), each with its own intent page, its own
descriptor and a byte locked through that descriptor while the operation lives, plus a
byte for its key (the VM's address slot) so that a second operation on the same key waits
(`wait_for`). A header byte per slot says it is in use. The next holder of the lock finds a
slot in use whose byte nobody locks only if its operation died (or gave up, `abandon`):
`orphans` returns its intent to mend. `drain` waits until no operation is in flight, for
the holders that must see the kernel and the leases at rest (detach, gc, a rebuild).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from netvm.errors import StateStoreError

log = logging.getLogger("netvm")

STATE_DIR_HINT = (
    "state_dir (MICROVM_NETWORK_STATE_DIR) must be a writable directory with free space"
)
PAGE = 4096
_COUNTER = struct.Struct("=Q")  # next ticket, at offset 0
_RECORD_AT = 64
_LENGTH = struct.Struct("=I")  # length of the intent's JSON, then the JSON
_FLAGS_AT = 16  # one byte per in-flight slot: 1 while the slot is in use
INFLIGHT_SLOTS = 16
SIZE = PAGE * (1 + INFLIGHT_SLOTS)  # page 0: counter, flags, intent; page 1 + k: slot k
_KEYS = 1 << 38  # byte _KEYS + key is locked by the in-flight operation on key
_INFLIGHT = 1 << 39  # byte _INFLIGHT + k is locked by the operation in slot k
_GUARD = 1 << 40  # locked while a ticket is taken
_TICKETS = 1 << 41  # byte _TICKETS + t is locked by the holder of ticket t
_LAST_TICKET = (1 << 62) - _TICKETS  # the kernel's lock offsets are a signed 64-bit off_t
_MAX_INTENT = PAGE - _RECORD_AT - _LENGTH.size
_FLOCK = struct.Struct("=hh4xqqi4x")  # struct flock: type, whence, start, len, pid
T = TypeVar("T")


def make_directory(path: Path) -> None:
    """mkdir -p, and ENOTDIR (not mkdir's EEXIST) when `path` or a parent is a file."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o755)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None


def _lock(fd: int, kind: int, start: int, length: int, wait: bool) -> None:
    command = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    fcntl.fcntl(fd, command, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))


def _try_lock(fd: int, kind: int, start: int, length: int) -> bool:
    try:
        _lock(fd, kind, start, length, wait=False)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _holder(fd: int, start: int, length: int) -> int | None:
    """The first byte of [start, start + length) another open file locks, or None."""
    probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    kind, _, found, _, _ = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))
    return None if kind == fcntl.F_UNLCK else int(found)


def _after_live_tickets(fd: int) -> int:
    """The ticket after the highest one held (0 if none), for a counter that some other
    writer damaged: a lower one would let two holders in, a higher one overflows the
    kernel's lock offsets (struct.error before). Called with the ticket guard held."""
    log.warning("the ticket counter of a netvm lock file was damaged: counting again")
    start, top = _TICKETS, -1
    while (held := _holder(fd, start, 0)) is not None:  # length 0: to the end
        top, start = held - _TICKETS, held + 1
    return top + 1


def _read_record(fd: int, at: int) -> dict[str, Any] | None:
    """The intent at offset `at`: its length, then its JSON (None if there is none)."""
    head = os.pread(fd, _LENGTH.size, at)
    (length,) = _LENGTH.unpack(head) if len(head) == _LENGTH.size else (0,)
    if not 0 < length <= _MAX_INTENT:
        return None
    try:
        found = json.loads(os.pread(fd, length, at + _LENGTH.size))
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _write_record(fd: int, at: int, intent: dict[str, Any]) -> None:
    raw = json.dumps(intent, separators=(",", ":")).encode()
    if len(raw) > _MAX_INTENT:
        raise ValueError("intent too large")
    # No length, the JSON, then its length: a write cut short leaves no valid intent.
    os.pwrite(fd, _LENGTH.pack(0), at)
    os.pwrite(fd, raw, at + _LENGTH.size)
    os.pwrite(fd, _LENGTH.pack(len(raw)), at)


class InFlight:
    """An operation that goes on after the lock was let go: its slot, intent and key.

    Thread-safe against the StateFile's other users (its own descriptor and page).
    """

    def __init__(self, file: StateFile, index: int, fd: int, key: int) -> None:
        self._file, self.index, self._fd, self._key = file, index, fd, key
        self._at = PAGE * (1 + index)
        self._done = False
        self.intent: dict[str, Any] = {}

    def update(self, intent: dict[str, Any]) -> None:
        """Replace the intent (what a crash from now on must mend)."""
        self._file.guarded(_write_record, self._fd, self._at, intent)
        self.intent = intent

    def finish(self) -> None:
        """The operation is complete: nothing to mend."""
        self._file.guarded(os.pwrite, self._fd, _LENGTH.pack(0), self._at)
        self._file.guarded(os.pwrite, self._fd, b"\0", _FLAGS_AT + self.index)
        self._let_go()

    def abandon(self) -> None:
        """The operation failed: leave its intent for the next holder of the lock to mend,
        exactly as if its process had died."""
        self._let_go()

    def _let_go(self) -> None:
        """Idempotent: done only once both locks are let go (an interrupted call is
        repeated by abandon(); unlocking twice is harmless)."""
        if self._done:
            return
        # The slot first: a waiter woken by the key must find an abandoned operation among
        # the orphans (its slot no longer locked), or it would miss mending it.
        _lock(self._fd, fcntl.F_UNLCK, _INFLIGHT + self.index, 1, wait=False)
        _lock(self._fd, fcntl.F_UNLCK, _KEYS + self._key, 1, wait=False)
        self._file.slot_done(self.index)
        self._done = True


class StateFile:
    """One lock file under state_dir. Not thread-safe: its owner serialises threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._ticket: int | None = None
        self._slot_fds: dict[int, int] = {}
        """Slot -> a descriptor of its own (OFD locks of one open file never conflict)."""
        self._busy: set[int] = set()
        """Slots this object's in-flight operations use (under _slots)."""
        self._slots = threading.Lock()
        _files.add(self)

    def _forget_in_child(self) -> None:
        """In a forked child: close the copies of the parent's descriptors, unlocking
        nothing (F_UNLCK on them would release the parent's locks: an OFD lock belongs to
        the open file both share). Kept open, they would hold the parent's locks for as
        long as the child lives, also after the parent died holding them."""
        for fd in [self._fd, *self._slot_fds.values()]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd, self._ticket = None, None
        self._slot_fds, self._busy = {}, set()
        self._slots = threading.Lock()

    def _error(self, operation: str, exc: OSError) -> StateStoreError:
        code = exc.errno or errno.EIO
        detail = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
        if code in (
            errno.EROFS,
            errno.EACCES,
            errno.EPERM,
            errno.ENOSPC,
            errno.ENOTDIR,
            errno.EEXIST,
        ):
            detail += "; " + STATE_DIR_HINT
        return StateStoreError(operation, str(self.path), detail)

    def _open(self) -> int:
        if self._fd is None:
            try:
                make_directory(self.path.parent)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise self._error("open", exc) from None
        return self._fd

    def _same_file(self, fd: int) -> bool:
        """Whether the path still names the file `fd` is open on (not deleted or replaced)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def acquire(self) -> None:
        """Wait for the lock, in the order of arrival."""
        if self._ticket is not None:
            raise RuntimeError(f"{self.path} is locked already")
        while True:
            fd = self._open()
            try:
                ticket = self._take_ticket(fd)
                if ticket:
                    self._wait_turn(fd, ticket)
                self._ticket = ticket
                if self._same_file(fd):
                    return
            except OSError as exc:
                self._drop()
                raise self._error("lock", exc) from None
            # Someone deleted or replaced the file while we waited: its queue is not the
            # one later processes join. Start over on the file the path names now.
            self._drop()

    @staticmethod
    def _wait_turn(fd: int, ticket: int) -> None:
        """Wait until no lower ticket is held.

        Only the ticket just below is waited for, so that a release wakes only the next in
        line (a wait on the whole range is woken by every release, and on 2 vCPUs the herd
        of waiters that go back to sleep delays the one that may go on). A ticket below
        that one can still be held only if the one just below died waiting: the check of
        the whole range finds it, and the wait goes on with it.
        """
        below = _TICKETS + ticket - 1
        while True:
            _lock(fd, fcntl.F_RDLCK, below, 1, wait=True)
            _lock(fd, fcntl.F_UNLCK, below, 1, wait=False)
            held = _holder(fd, _TICKETS, ticket)
            if held is None:
                return
            below = held

    def _take_ticket(self, fd: int) -> int:
        _lock(fd, fcntl.F_WRLCK, _GUARD, 1, wait=True)
        try:
            size = os.fstat(fd).st_size
            if size < PAGE:
                os.pwrite(fd, bytes(SIZE), 0)  # nobody has taken a ticket yet
            elif size < SIZE:
                os.pwrite(fd, bytes(SIZE - size), size)  # a file from before in-flight slots
            (ticket,) = _COUNTER.unpack(os.pread(fd, _COUNTER.size, 0))
            # A counter at or below a live ticket (written over by someone else) would let
            # two holders in: one look at the tickets from the counter on (~1 us) sees it.
            if ticket >= _LAST_TICKET or _holder(fd, _TICKETS + ticket, 0) is not None:
                ticket = _after_live_tickets(fd)
            os.pwrite(fd, _COUNTER.pack(ticket + 1), 0)
            _lock(fd, fcntl.F_WRLCK, _TICKETS + ticket, 1, wait=False)
        finally:
            _lock(fd, fcntl.F_UNLCK, _GUARD, 1, wait=False)
        return int(ticket)

    def release(self) -> None:
        if self._ticket is None or self._fd is None:
            return
        ticket, self._ticket = self._ticket, None
        _lock(self._fd, fcntl.F_UNLCK, _TICKETS + ticket, 1, wait=False)

    def _drop(self) -> None:
        """Close the descriptor: the kernel drops every lock held through it."""
        self._ticket = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with self._slots:
            for index in [i for i in self._slot_fds if i not in self._busy]:
                os.close(self._slot_fds.pop(index))

    @property
    def held(self) -> bool:
        return self._ticket is not None

    # The intent ----------------------------------------------------------------------------

    def read_intent(self) -> dict[str, Any] | None:
        """The intent a holder left, or None. Only the holder of the lock may call this."""
        return self.guarded(_read_record, self._held_fd(), _RECORD_AT)

    def write_intent(self, intent: dict[str, Any]) -> None:
        """Record what the holder is about to do; it survives the holder's death."""
        self.guarded(_write_record, self._held_fd(), _RECORD_AT, intent)

    def clear_intent(self) -> None:
        self.guarded(os.pwrite, self._held_fd(), _LENGTH.pack(0), _RECORD_AT)

    def guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), an OSError raised as StateStoreError."""
        try:
            return fn(*args)
        except OSError as exc:
            raise self._error("write" if fn is not _read_record else "read", exc) from None

    # In-flight operations -------------------------------------------------------------------

    def begin_inflight(
        self, intent: dict[str, Any], key: int, owner: list[InFlight] | None = None
    ) -> InFlight | None:
        """Take a slot for an operation on `key` that goes on after release(), recording
        `intent` for it; None when every slot is taken or `key` is busy (the caller then
        keeps the lock for the operation). Only the holder of the lock may call this.

        `owner` gets the flight before its slot is locked: a caller whose `finally`
        abandons what it holds lets the slot go also when an exception (KeyboardInterrupt)
        comes between the locking and the return (abandoning a flight that locked nothing
        unlocks nothing)."""
        main = self._held_fd()
        with self._slots:
            free = [i for i in range(INFLIGHT_SLOTS) if i not in self._busy]
        flags = self.guarded(os.pread, main, INFLIGHT_SLOTS, _FLAGS_AT)
        for index in free:
            if flags[index : index + 1] not in (b"\0", b""):
                continue  # in use by another process, or an orphan not mended yet
            fd = self.guarded(self._slot_fd, index)
            with self._slots:
                self._busy.add(index)
            flight = InFlight(self, index, fd, key)
            if owner is not None:
                owner.append(flight)
            if not self.guarded(_try_lock, fd, fcntl.F_WRLCK, _INFLIGHT + index, 1):
                flight.abandon()
                continue
            if not self.guarded(_try_lock, fd, fcntl.F_WRLCK, _KEYS + key, 1):
                flight.abandon()
                return None
            try:
                flight.update(intent)
                self.guarded(os.pwrite, main, b"\1", _FLAGS_AT + index)
            except BaseException:
                flight.finish()
                raise
            return flight
        return None

    def _slot_fd(self, index: int) -> int:
        """Slot `index`'s descriptor, on the file the main one is open on."""
        main = os.fstat(self._held_fd())
        fd = self._slot_fds.get(index)
        if fd is not None:
            held = os.fstat(fd)
            if (held.st_dev, held.st_ino) == (main.st_dev, main.st_ino):
                return fd
            os.close(fd)
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self._slot_fds[index] = fd
        return fd

    def slot_done(self, index: int) -> None:
        with self._slots:
            self._busy.discard(index)

    def wait_for(self, key: int) -> None:
        """Wait until no in-flight operation on `key` is left. Only for the holder."""
        fd = self._held_fd()
        self.guarded(_lock, fd, fcntl.F_RDLCK, _KEYS + key, 1, True)
        self.guarded(_lock, fd, fcntl.F_UNLCK, _KEYS + key, 1, False)

    def in_use(self) -> list[int]:
        """The slots whose flag says in use (live operations and orphans)."""
        flags = self.guarded(os.pread, self._held_fd(), INFLIGHT_SLOTS, _FLAGS_AT)
        return [i for i, flag in enumerate(flags) if flag]

    def drain(self) -> None:
        """Wait until no operation is in flight (none can begin: the caller holds the lock)."""
        if self.in_use():
            fd = self._held_fd()
            self.guarded(_lock, fd, fcntl.F_WRLCK, _INFLIGHT, INFLIGHT_SLOTS, True)
            self.guarded(_lock, fd, fcntl.F_UNLCK, _INFLIGHT, INFLIGHT_SLOTS, False)

    def orphans(self) -> list[tuple[int, dict[str, Any] | None]]:
        """(slot, intent) of each slot in use whose operation died or gave up."""
        fd = self._held_fd()
        found: list[tuple[int, dict[str, Any] | None]] = []
        for index in self.in_use():
            if self.guarded(_holder, fd, _INFLIGHT + index, 1) is None:
                found.append((index, self.guarded(_read_record, fd, PAGE * (1 + index))))
        return found

    def forget_orphan(self, index: int) -> None:
        """The orphan in `index` is mended: free its slot. Only for the holder."""
        fd = self._held_fd()
        self.guarded(os.pwrite, fd, _LENGTH.pack(0), PAGE * (1 + index))
        self.guarded(os.pwrite, fd, b"\0", _FLAGS_AT + index)

    def _held_fd(self) -> int:
        if self._ticket is None or self._fd is None:
            raise RuntimeError(f"{self.path} is not locked")
        return self._fd

    def close(self) -> None:
        self._drop()


_files: weakref.WeakSet[StateFile] = weakref.WeakSet()


def _forget_in_child() -> None:
    for state_file in list(_files):
        state_file._forget_in_child()


os.register_at_fork(after_in_child=_forget_in_child)
