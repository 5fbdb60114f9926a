"""The lease store: vm_id <-> guest slot, collision-free, shared by every process on the host.

SQLite (standard library) was chosen over a lease directory: a transaction stays open while
the manager creates the TAP, so a failed attach rolls its lease back with it; UNIQUE
constraints make a double lease impossible; and the `free` table with its primary-key index
finds the next free slot in O(log n), so an attach costs the same with 1 or 1000 leases.
One database per bridge lives under `state_dir` (default /run/netvm: a tmpfs that, like the
kernel state it describes, does not survive a reboot).

Processes are serialised by a StateFile next to the database (a fair queue lock that also
holds the intent of an operation in flight), not by SQLite's busy handler, which sleeps and
polls. The store is a cache of what the kernel holds: every netvm TAP records its vm_id and
slot in its ifalias, so a database that is lost, replaced, truncated or damaged is rebuilt
from the kernel (the manager's `repair` hook) instead of handing out addresses again.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netvm import forkgate, naming
from netvm.errors import (
    ConfigError,
    ConflictError,
    StateStoreError,
    SubnetExhausted,
    UsedAfterFork,
)
from netvm.statefile import STATE_DIR_HINT, InFlight, StateFile, make_directory
from netvm.undo import Undo

log = logging.getLogger("netvm")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leases ("
    " vm_id TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE, tap_name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS free (slot INTEGER PRIMARY KEY)",
    # The policy each VM was last attached with (GuestPolicy.describe()): what ensure_host
    # gives back to a VM whose guarantees the firewall lost (a foreign `nft flush ruleset`).
    "CREATE TABLE IF NOT EXISTS policies (vm_id TEXT PRIMARY KEY, policy TEXT NOT NULL)",
    # Slots freed whose address may still have conntrack entries (the VM's flows): deleted
    # (backends/conntrack.py) before the address is a new lease's.
    "CREATE TABLE IF NOT EXISTS stale (slot INTEGER PRIMARY KEY)",
)

LOCK_TIMEOUT = 60.0
"""Seconds SQLite waits for a connection that is not netvm's (netvm's own wait in the queue)."""
_DAMAGED = {10, 11, 19, 26}
"""SQLITE_IOERR (e.g. a -shm whose WAL was deleted: its frames cannot be read), SQLITE_CORRUPT,
SQLITE_CONSTRAINT (netvm checks before every insert: a violated UNIQUE means tables that
contradict each other, edited by hand), SQLITE_NOTADB."""
_SQLITE_ERROR = 1
_SQLITE_IOERR = 10
_NO_ROOM = {8, 13, 14}  # SQLITE_READONLY, SQLITE_FULL, SQLITE_CANTOPEN
_SMALLEST_DATABASE = 512
"""A database in WAL mode has at least its first page: a shorter file was truncated."""

Repair = Callable[["LeaseTransaction"], None]


@dataclass(frozen=True)
class Lease:
    vm_id: str
    slot: int
    tap_name: str


class DamagedStore(StateStoreError):
    """The database turned out damaged during a transaction; the next one rebuilds it."""


def _code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


ROOM_NEEDED = 1 << 20
"""Bytes free in state_dir below which an I/O error is taken for a full disk, not damage:
SQLite reports a -shm or WAL it cannot grow as SQLITE_IOERR, not SQLITE_FULL."""


def _out_of_room(directory: Path) -> bool:
    try:
        fs = os.statvfs(directory)
    except OSError:
        return False
    no_inodes = fs.f_files > 0 and fs.f_favail == 0  # 0 files: no inode limit (tmpfs, btrfs)
    return fs.f_bavail * fs.f_frsize < ROOM_NEEDED or no_inodes


class LeaseTransaction:
    """Reads and changes of the lease table inside one exclusive transaction."""

    def __init__(self, db: sqlite3.Connection, store: LeaseStore, fresh: bool) -> None:
        self._db = db
        self._store = store
        self.fresh = fresh
        """The database was (re)opened for this transaction: it may lag behind the kernel."""
        self._open = True
        self.orphans: list[tuple[int, dict[str, Any] | None]] = []
        """In-flight operations that died or gave up: (slot, intent) for `repair` to mend."""
        self.undo = Undo()
        """Kernel changes made inside the transaction that no intent covers, to be undone
        if it does not commit (NetworkManager._changing runs it)."""

    # Leases -----------------------------------------------------------------------------

    def _lease(self, vm_id: object, slot: object, tap_name: object) -> Lease:
        """A row as a Lease; one no attach could have written (a slot outside the subnet,
        a value of another type: an edited or foreign database) marks the store damaged,
        so that the next transaction rebuilds it from the kernel."""
        if (
            not isinstance(vm_id, str)
            or not isinstance(tap_name, str)
            or isinstance(slot, bool)
            or not isinstance(slot, int)
            or not 0 <= slot < self._store.capacity
        ):
            self._store.mark_damaged()
            raise DamagedStore(
                "read",
                str(self._store.path),
                f"lease row {(vm_id, slot, tap_name)!r} is not one netvm writes (slots 0 "
                f"to {self._store.capacity - 1}): the next call rebuilds it from the kernel",
            )
        return Lease(vm_id, slot, tap_name)

    def get(self, vm_id: str) -> Lease | None:
        row = self._db.execute(
            "SELECT slot, tap_name FROM leases WHERE vm_id = ?", (vm_id,)
        ).fetchone()
        return None if row is None else self._lease(vm_id, row[0], row[1])

    def holder(self, slot: int) -> str | None:
        """The vm_id leasing `slot`, if any."""
        row = self._db.execute("SELECT vm_id FROM leases WHERE slot = ?", (slot,)).fetchone()
        return None if row is None else str(row[0])

    def all(self) -> list[Lease]:
        rows = self._db.execute("SELECT vm_id, slot, tap_name FROM leases ORDER BY slot")
        return [self._lease(*row) for row in rows.fetchall()]

    def acquire(self, vm_id: str) -> tuple[Lease, bool]:
        """Return the vm_id's lease, creating it if needed; the bool says whether it is new."""
        existing = self.get(vm_id)
        if existing is not None:
            return existing, False
        self._check_tap_name(vm_id)
        preferred = naming.preferred_slot(vm_id, self._store.capacity)
        row = (
            self._db.execute(
                "SELECT slot FROM free WHERE slot >= ? ORDER BY slot LIMIT 1", (preferred,)
            ).fetchone()
            or self._db.execute("SELECT slot FROM free ORDER BY slot LIMIT 1").fetchone()
        )
        if row is None:
            subnet = self._store.subnet
            raise SubnetExhausted(subnet, self._store.capacity, naming.capacity_reason(subnet))
        return self._insert(vm_id, int(row[0])), True

    def claim(self, vm_id: str, slot: int) -> Lease | None:
        """Lease exactly `slot` to `vm_id` (what its TAP records), moving its lease if it had
        another; None when the slot is outside the subnet or another vm_id holds it."""
        if not 0 <= slot < self._store.capacity:
            return None
        holder = self.holder(slot)
        if holder is not None:
            return self.get(vm_id) if holder == vm_id else None
        self._check_tap_name(vm_id)
        self._free(vm_id)
        return self._insert(vm_id, slot)

    def _check_tap_name(self, vm_id: str) -> None:
        tap = naming.tap_name(vm_id)
        holder = self._db.execute("SELECT vm_id FROM leases WHERE tap_name = ?", (tap,)).fetchone()
        if holder is not None and holder[0] != vm_id:
            raise ConflictError(
                f"vm_id {vm_id!r} and the leased {holder[0]!r} hash to the same TAP name {tap}; "
                "use another vm_id"
            )

    def _insert(self, vm_id: str, slot: int) -> Lease:
        tap = naming.tap_name(vm_id)
        self._db.execute("DELETE FROM free WHERE slot = ?", (slot,))
        self._db.execute("INSERT INTO leases VALUES (?, ?, ?)", (vm_id, slot, tap))
        return Lease(vm_id, slot, tap)

    def take_stale(self, slot: int) -> bool:
        """Whether the address of `slot` was a VM's since its connections were last
        deleted; it is not from now on (the caller deletes them before the address is
        used; a crash before that frees the new lease again, and marks the slot anew)."""
        return self._db.execute("DELETE FROM stale WHERE slot = ?", (slot,)).rowcount > 0

    def release(self, vm_id: str, forget_policy: bool = True) -> bool:
        """Free the vm_id's lease and (unless told not to: a lease being moved) forget its
        policy; False when it had no lease."""
        if forget_policy:
            self.forget_policy(vm_id)
        return self._free(vm_id)

    def forget_policy(self, vm_id: str) -> None:
        self._db.execute("DELETE FROM policies WHERE vm_id = ?", (vm_id,))

    def _free(self, vm_id: str) -> bool:
        lease = self.get(vm_id)
        if lease is None:
            return False
        self._db.execute("DELETE FROM leases WHERE vm_id = ?", (vm_id,))
        self._db.execute("INSERT INTO free VALUES (?)", (lease.slot,))
        self._db.execute("INSERT OR IGNORE INTO stale VALUES (?)", (lease.slot,))
        return True

    # Policies ---------------------------------------------------------------------------

    def set_policy(self, vm_id: str, policy: str) -> None:
        """Remember the policy (GuestPolicy.describe()) the VM is attached with."""
        self._db.execute("INSERT OR REPLACE INTO policies VALUES (?, ?)", (vm_id, policy))

    def policy(self, vm_id: str) -> str | None:
        row = self._db.execute("SELECT policy FROM policies WHERE vm_id = ?", (vm_id,)).fetchone()
        return None if row is None else str(row[0])

    def policies(self) -> dict[str, str]:
        """The remembered policy of each leased VM (a rebuilt store learns them from the
        firewall's records: manager._relearn_policies)."""
        rows = self._db.execute(
            "SELECT p.vm_id, p.policy FROM policies p JOIN leases l ON l.vm_id = p.vm_id"
        )
        return {str(vm_id): str(policy) for vm_id, policy in rows.fetchall()}

    def unremembered(self) -> list[Lease]:
        """The leases whose VM has no remembered policy."""
        rows = self._db.execute(
            "SELECT l.vm_id, l.slot, l.tap_name FROM leases l"
            " LEFT JOIN policies p ON p.vm_id = l.vm_id WHERE p.vm_id IS NULL ORDER BY l.slot"
        )
        return [self._lease(*row) for row in rows.fetchall()]

    # The intent (see statefile.py) ------------------------------------------------------

    @property
    def intent(self) -> dict[str, Any] | None:
        """What the holder of the lock is changing in the kernel (or a dead holder was)."""
        return self._store.file.read_intent()

    def intend(self, intent: dict[str, Any]) -> None:
        self._store.file.write_intent(intent)

    def clear_intent(self) -> None:
        self._store.file.clear_intent()

    def begin_inflight(
        self, intent: dict[str, Any], key: int, owner: list[InFlight] | None = None
    ) -> InFlight | None:
        """An operation on `key` (an address slot) that goes on after this transaction has
        committed and let go of the lock; None: do it inside the transaction instead.
        `owner`: as StateFile.begin_inflight."""
        return self._store.file.begin_inflight(intent, key, owner)

    def wait_for(self, key: int) -> None:
        """Wait for the in-flight operation on `key`, if there is one; `orphans` is read
        again (that operation may have died or failed meanwhile)."""
        self._store.file.wait_for(key)
        self.orphans = self._store.file.orphans()

    def forget_orphan(self, index: int) -> None:
        self._store.file.forget_orphan(index)

    # Ending -----------------------------------------------------------------------------

    def commit(self) -> None:
        """Make the changes durable; StateStoreError (after a rollback) if they cannot be."""
        if not self._open:
            return
        self._open = False
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise self._store.error("commit to", exc) from None
        self.undo = Undo()  # committed: a later failure must not undo what this kept

    def rollback(self) -> None:
        if self._open:
            self._open = False
            with suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def restart(self) -> None:
        """Commit what is done so far and go on in a new transaction, still locked."""
        self.commit()
        self._store.begin(self._db)
        self._open = True


class LeaseStore:
    """Leases of one bridge's subnet, in `<state_dir>/<name>.sqlite`, locked by
    `<state_dir>/<name>.lock`. The manager names it after the bridge and the namespace.

    `repair(tx)` runs at the start of a transaction whose database was (re)opened or that
    finds the intent of a holder that died; what it does is committed on its own.
    """

    def __init__(
        self,
        state_dir: Path,
        name: str,
        subnet: ipaddress.IPv4Network,
        repair: Repair | None = None,
    ) -> None:
        self.subnet = subnet
        self.capacity = naming.guest_capacity(subnet)
        self.path = Path(state_dir) / f"{name}.sqlite"
        self.file = StateFile(Path(state_dir) / f"{name}.lock")
        self._repair = repair
        self._pid = os.getpid()
        _stores.add(self)
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, ...] | None = None
        self._damaged = False
        self._unrepaired = False
        """The database was (re)opened and `repair` has not completed on it yet."""

    def mark_damaged(self) -> None:
        """The database holds what netvm never writes: the next transaction rebuilds it."""
        self._damaged = True

    def _tables_missing(self) -> bool:
        """Whether a table of netvm's schema is gone from the open database (dropped by
        hand or by another program: SQLite then says only SQLITE_ERROR, no such table)."""
        if self._db is None:
            return False
        try:
            rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            present = {str(row[0]) for row in rows.fetchall()}
        except sqlite3.Error:
            return False
        return not {"meta", "leases", "free", "policies"} <= present

    def error(self, operation: str, exc: sqlite3.Error) -> StateStoreError:
        code = _code(exc)
        if code == _SQLITE_ERROR and self._tables_missing():
            self._damaged = True
            return DamagedStore(
                operation,
                str(self.path),
                f"{exc}: a table of the database is gone; the next call rebuilds it from "
                "the kernel",
            )
        full = code in _NO_ROOM or (code in (_SQLITE_IOERR, 0) and _out_of_room(self.path.parent))
        if code in _DAMAGED and not full:
            self._damaged = True
            return DamagedStore(
                operation,
                str(self.path),
                f"{exc}: the database is damaged; the next call rebuilds it from the kernel",
            )
        hint = f"; {STATE_DIR_HINT}" if full else ""
        return StateStoreError(operation, str(self.path), f"{exc}{hint}")

    # Opening ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            make_directory(self.path.parent)
        except OSError as exc:
            raise StateStoreError(
                "create", str(self.path.parent), f"{exc.strerror}; {STATE_DIR_HINT}"
            ) from None
        try:
            db = sqlite3.connect(
                self.path, timeout=LOCK_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self.error("open", exc) from None
        try:
            self._switch_to_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA quick_check").fetchone() != ("ok",):
                raise sqlite3.DatabaseError("quick_check failed")
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                db.execute(statement)
            self._check_subnet(db)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            db.close()
            if (
                type(exc) is sqlite3.DatabaseError
                and not _code(exc)
                and not _out_of_room(self.path.parent)
            ):
                self._damaged = True
                raise DamagedStore("check", str(self.path), str(exc)) from None
            raise self.error("open", exc) from None
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _switch_to_wal(db: sqlite3.Connection) -> None:
        """PRAGMA journal_mode=WAL, retried: while another connection is creating the
        database, SQLite answers "database is locked" at once, without its busy timeout."""
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _check_subnet(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT value FROM meta WHERE key = 'subnet'").fetchone()
        if row is not None and row[0] == str(self.subnet):
            return
        if row is not None:
            leased = db.execute("SELECT count(*) FROM leases").fetchone()[0]
            if leased:
                raise ConfigError(
                    "vm_subnet",
                    str(self.subnet),
                    f"{self.path} holds {leased} leases in {row[0]}; "
                    "detach them (or tear the host down) before changing the subnet",
                )
        db.execute("INSERT OR REPLACE INTO meta VALUES ('subnet', ?)", (str(self.subnet),))
        db.execute("DELETE FROM free")
        db.executemany("INSERT INTO free VALUES (?)", ((s,) for s in range(self.capacity)))

    def _current(self) -> tuple[int, ...] | None:
        """(device, inode) of the database file and the inodes of its -wal and -shm (0 when
        missing); None if the database is gone or cut short.

        All three: a -shm or -wal deleted under an open connection makes the next process
        make new ones, and the two would each see the other's writes through another WAL
        index (one slot leased twice, measured). A connection that finds one replaced
        opens the store again, and the leases are reconciled with the kernel."""
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateStoreError("stat", str(self.path), exc.strerror or "") from None
        if found.st_size < _SMALLEST_DATABASE:
            return None
        companions = []
        for suffix in ("-wal", "-shm"):
            try:
                companions.append(os.stat(f"{self.path}{suffix}").st_ino)
            except FileNotFoundError:
                companions.append(0)
            except OSError as exc:
                raise StateStoreError("stat", f"{self.path}{suffix}", exc.strerror or "") from None
        return found.st_dev, found.st_ino, *companions

    def _quarantine(self) -> None:
        """Move a damaged database aside (the newest one is kept for a post-mortem)."""
        log.warning("lease store %s is damaged: rebuilding it from the kernel", self.path)
        try:
            if self.path.exists():
                os.replace(self.path, self.path.with_name(self.path.name + ".damaged"))
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        except OSError as exc:
            raise StateStoreError(
                "replace the damaged", str(self.path), f"{exc.strerror}; {STATE_DIR_HINT}"
            ) from None
        self._damaged = False

    def _ensure_open(self) -> tuple[sqlite3.Connection, bool]:
        """The connection, (re)opened if the file was deleted, replaced or damaged; the bool
        says whether it was (re)opened now. Called with the StateFile held."""
        if self._db is not None and not self._damaged:
            identity = self._current()
            if identity is not None and identity == self._identity:
                return self._db, False
            log.warning("lease store %s was deleted or replaced: rebuilding it", self.path)
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._damaged:
            self._quarantine()
        try:
            db = self._connect()
        except DamagedStore:
            self._quarantine()
            db = self._connect()
        self._db = db
        self._identity = self._current()
        self._unrepaired = True
        return db, True

    def begin(self, db: sqlite3.Connection) -> None:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self.error("lock", exc) from None

    def open(self) -> None:
        """Open (and on first use create) the database now rather than at the first lease."""
        with self.transaction():
            pass

    # Transactions -----------------------------------------------------------------------

    @contextmanager
    def transaction(self, drain: bool = True) -> Iterator[LeaseTransaction]:
        """One exclusive write transaction (across processes and threads).

        It commits when the block ends normally (unless the block committed already) and
        rolls back on any exception. The StateFile is held throughout. With `drain`, it
        first waits for every in-flight operation (statefile.py), so the block sees the
        leases and the kernel at rest; without, it sees the leases of in-flight attaches
        whose kernel work is under way (an attach waits only for one on its own VM).
        """
        if self._pid != os.getpid():
            raise UsedAfterFork(f"the lease store {self.path}", self._pid)
        with self._lock:
            if self.file.held:
                raise RuntimeError("lease transactions do not nest")
            self.file.acquire()
            try:
                with forkgate.GATE.inside():  # no fork copies this transaction
                    tx = self._start(drain)
                    try:
                        yield tx
                        tx.commit()
                        if self.file.read_intent() is not None:
                            self.file.clear_intent()
                    except sqlite3.Error as exc:
                        tx.rollback()
                        raise self.error("use", exc) from None
                    except BaseException:
                        tx.rollback()
                        raise
            finally:
                self.file.release()

    def _start(self, drain: bool) -> LeaseTransaction:
        """Open, begin and repair, retrying once on a database found damaged meanwhile."""
        for attempt in (1, 2):
            db, _ = self._ensure_open()
            if drain or self._unrepaired:
                self.file.drain()  # a rebuild must not miss the lease of an attach under way
            self.begin(db)
            tx = LeaseTransaction(db, self, self._unrepaired)
            try:
                tx.orphans = self.file.orphans()
                if self._repair is not None and (
                    tx.fresh or tx.orphans or self.file.read_intent() is not None
                ):
                    self._repair(tx)
                    tx.restart()
                self._unrepaired = tx.fresh = False
                return tx
            except sqlite3.Error as exc:
                tx.rollback()
                error = self.error("repair", exc)
            except BaseException:
                tx.rollback()
                raise
            if attempt == 2 or not isinstance(error, DamagedStore):
                raise error
        raise AssertionError("unreachable")

    def all(self) -> list[Lease]:
        with self.transaction() as tx:
            return tx.all()

    def close(self) -> None:
        if self._pid != os.getpid():
            return  # the parent's: its connection and lock file stay as they are
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            self.file.close()


_stores: weakref.WeakSet[LeaseStore] = weakref.WeakSet()
_parents_connections: list[sqlite3.Connection] = []
"""In a forked child: the parent's connections, never closed (closing the last connection
of a WAL database may checkpoint it and delete its WAL under the parent's feet)."""


def _keep_in_child() -> None:
    for store in list(_stores):
        if store._db is not None:
            _parents_connections.append(store._db)


os.register_at_fork(after_in_child=_keep_in_child)
