"""The lease store: vm_id <-> guest slot, collision-free, shared by every process on the host.

SQLite (standard library) was chosen over a lease directory: one `BEGIN IMMEDIATE`
transaction serialises attachers across processes (the manager keeps it open while it
creates the TAP, so a failed attach rolls its lease back with it, and two processes
attaching the same vm_id cannot race), UNIQUE constraints make a double lease impossible,
and the `free` table with its primary-key index finds the next free slot in O(log n), so an
attach costs the same with 1 or 1000 leases. One database per bridge lives under
`state_dir` (default /run/netvm: a tmpfs that, like the kernel state it describes, does not
survive a reboot).
"""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from netvm import naming
from netvm.errors import ConfigError, ConflictError, HostError, SubnetExhausted

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leases ("
    " vm_id TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE, tap_name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS free (slot INTEGER PRIMARY KEY)",
)


LOCK_TIMEOUT = 60.0
"""Seconds to wait for another process's lease transaction before giving up."""
STATE_DIR_HINT = "state_dir must be a writable directory (state_dir, MICROVM_NETWORK_STATE_DIR)"


@dataclass(frozen=True)
class Lease:
    vm_id: str
    slot: int
    tap_name: str


class LeaseTransaction:
    """Reads and changes of the lease table inside one exclusive transaction."""

    def __init__(self, db: sqlite3.Connection, store: LeaseStore) -> None:
        self._db = db
        self._store = store

    def get(self, vm_id: str) -> Lease | None:
        row = self._db.execute(
            "SELECT slot, tap_name FROM leases WHERE vm_id = ?", (vm_id,)
        ).fetchone()
        return None if row is None else Lease(vm_id, row[0], row[1])

    def all(self) -> list[Lease]:
        rows = self._db.execute("SELECT vm_id, slot, tap_name FROM leases ORDER BY slot")
        return [Lease(*row) for row in rows.fetchall()]

    def acquire(self, vm_id: str) -> tuple[Lease, bool]:
        """Return the vm_id's lease, creating it if needed; the bool says whether it is new."""
        existing = self.get(vm_id)
        if existing is not None:
            return existing, False
        tap = naming.tap_name(vm_id)
        holder = self._db.execute("SELECT vm_id FROM leases WHERE tap_name = ?", (tap,)).fetchone()
        if holder is not None:
            raise ConflictError(
                f"vm_id {vm_id!r} and the leased {holder[0]!r} hash to the same TAP name {tap}; "
                "use another vm_id"
            )
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
        self._db.execute("DELETE FROM free WHERE slot = ?", (row[0],))
        self._db.execute("INSERT INTO leases VALUES (?, ?, ?)", (vm_id, row[0], tap))
        return Lease(vm_id, int(row[0]), tap), True

    def release(self, vm_id: str) -> bool:
        """Free the vm_id's lease; False when it had none."""
        lease = self.get(vm_id)
        if lease is None:
            return False
        self._db.execute("DELETE FROM leases WHERE vm_id = ?", (vm_id,))
        self._db.execute("INSERT INTO free VALUES (?)", (lease.slot,))
        return True


class LeaseStore:
    """Leases of one bridge's subnet, in `<state_dir>/<name>.sqlite`.

    The manager names it after the bridge and the network namespace.
    """

    def __init__(self, state_dir: Path, name: str, subnet: ipaddress.IPv4Network) -> None:
        self.subnet = subnet
        self.capacity = naming.guest_capacity(subnet)
        self.path = Path(state_dir) / f"{name}.sqlite"
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            db = sqlite3.connect(
                self.path, timeout=LOCK_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            self._switch_to_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
        except (OSError, sqlite3.Error) as exc:
            code = getattr(exc, "errno", None) or 0
            raise HostError(
                "open lease store", str(self.path), code, f"{exc}; {STATE_DIR_HINT}"
            ) from exc
        try:
            for statement in _SCHEMA:
                db.execute(statement)
            self._check_subnet(db)
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise
        db.execute("COMMIT")
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

    def open(self) -> None:
        """Open (and on first use create) the database now rather than at the first lease."""
        with self._lock:
            if self._db is None:
                self._db = self._open()

    @contextmanager
    def transaction(self) -> Iterator[LeaseTransaction]:
        """One exclusive write transaction (across processes and threads).

        It commits when the block ends normally and rolls back on any exception.
        """
        with self._lock:
            if self._db is None:
                self._db = self._open()
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise HostError("lock lease store", str(self.path), 0, str(exc)) from exc
            try:
                yield LeaseTransaction(db, self)
            except sqlite3.Error as exc:
                db.execute("ROLLBACK")
                raise HostError("use lease store", str(self.path), 0, str(exc)) from exc
            except BaseException:
                db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                db.execute("ROLLBACK")
                raise HostError("commit lease store", str(self.path), 0, str(exc)) from exc

    def all(self) -> list[Lease]:
        with self.transaction() as tx:
            return tx.all()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
