"""The legacy xtables tables through python-iptables (libiptc): chains and rules.

What netvm needs of python-iptables' internals (a process-free import, errno, entry
insertion and deletion without fd 1 swaps, raw match bytes) is in `iptc_compat`, which
checks the version it supports.
libiptc keeps process-wide state (one cached handle per table, global extension registry), and
a handle reads and commits in the namespace of the thread that initialised it: every use goes
through `_LOCK` and starts with a fresh handle made in the calling (namespace) thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from netvm.backends import iptc_compat
from netvm.backends.base import STANDARD_TARGETS, Rule
from netvm.backends.iptc_compat import load_iptc
from netvm.errors import host_error
from netvm.firewall.xt import conntrack_states

_LOCK = threading.RLock()
T = TypeVar("T")

IPT_SO_GET_INFO = 64
IPT_SO_GET_ENTRIES = 65
_GETINFO = struct.Struct("=32sI5I5III")  # struct ipt_getinfo
_ENTRIES_HEADER = 40  # struct ipt_get_entries up to entrytable (8-byte aligned)
_ENTRY_SIZE = 112  # struct ipt_entry
_NEXT_OFFSET = struct.Struct("=H")  # ipt_entry.next_offset, at byte 90
_COUNTERS_AT = 96  # ipt_entry.counters: two u64 that change with every packet
_libc = ctypes.CDLL(None, use_errno=True)
ACCEPT_VERDICT = -2  # a standard target's verdict: -NF_ACCEPT - 1
XT_HEADER = 32
"""struct xt_entry_match / xt_entry_target: u16 size, char name[29], u8 revision."""


class TableReader:
    """The kernel's copy of one legacy xtables table, read with two getsockopt calls (what
    libiptc reads first), packet counters zeroed: equal bytes mean equal rules.

    python-iptables takes ~0.1 ms per rule to turn a table into Rule objects (ctypes, and
    each match's save() captured through a pipe); ensure_host reads the tables six times.
    The firewall keeps what it decoded together with these bytes, and decodes again only
    when they differ.
    """

    def __init__(self) -> None:
        # Opened in the calling (namespace) thread: the socket reads that namespace's tables.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 255)

    def close(self) -> None:
        self._sock.close()

    def _getsockopt(self, option: int, buffer: ctypes.Array[ctypes.c_char]) -> bool:
        size = ctypes.c_uint(len(buffer))
        fd = self._sock.fileno()
        result: int = _libc.getsockopt(fd, socket.SOL_IP, option, buffer, ctypes.byref(size))
        return result == 0

    def holds_rules(self, table: str) -> bool:
        """The table has a rule, a user chain, or a built-in policy other than ACCEPT."""
        name = table.encode()
        info = ctypes.create_string_buffer(_GETINFO.pack(name, 0, *[0] * 10, 0, 0), _GETINFO.size)
        if not self._getsockopt(IPT_SO_GET_INFO, info):
            return False
        _, hooks, *offsets, entries, size = _GETINFO.unpack(info.raw)
        underflows = offsets[5:]
        valid = [hook for hook in range(5) if hooks & (1 << hook)]
        if entries != len(valid) + 1:
            return True
        blob = ctypes.create_string_buffer(_ENTRIES_HEADER + size)
        struct.pack_into("=32sI", blob, 0, name, size)
        if not self._getsockopt(IPT_SO_GET_ENTRIES, blob):
            return True  # changing as we read: someone is writing it
        raw = blob.raw[_ENTRIES_HEADER:]
        for hook in valid:
            entry = underflows[hook]
            (target_offset,) = struct.unpack_from("=H", raw, entry + 88)
            (verdict,) = struct.unpack_from("=i", raw, entry + target_offset + XT_HEADER)
            if verdict != ACCEPT_VERDICT:
                return True
        return False

    def fingerprint(self, table: str) -> bytes | None:
        """The table's rules as the kernel holds them, or None if they cannot be read."""
        name = table.encode()
        info = ctypes.create_string_buffer(_GETINFO.pack(name, 0, *[0] * 10, 0, 0), _GETINFO.size)
        if not self._getsockopt(IPT_SO_GET_INFO, info):
            return None
        size = _GETINFO.unpack(info.raw)[-1]
        entries = ctypes.create_string_buffer(_ENTRIES_HEADER + size)
        struct.pack_into("=32sI", entries, 0, name, size)
        if not self._getsockopt(IPT_SO_GET_ENTRIES, entries):
            return None  # e.g. EAGAIN: the table changed in between
        blob = bytearray(entries.raw[_ENTRIES_HEADER:])
        offset = 0
        while offset + _ENTRY_SIZE <= len(blob):
            blob[offset + _COUNTERS_AT : offset + _ENTRY_SIZE] = bytes(16)
            (step,) = _NEXT_OFFSET.unpack_from(blob, offset + 90)
            if step < _ENTRY_SIZE:
                return None
            offset += step
        return info.raw[32:] + bytes(blob)


XTABLES_LOCK = "/run/xtables.lock"


@contextmanager
def _xtables_lock(operation: str, where: str) -> Iterator[None]:
    """The lock every iptables(-legacy) command takes before it changes a table."""
    path = os.environ.get("XTABLES_LOCKFILE", XTABLES_LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise host_error(operation, where, exc.errno or errno.EIO, f"open {path}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class IptablesFirewall:
    """Chains and rules over python-iptables; every method must run in the namespace's thread."""

    def __init__(self) -> None:
        self._iptc = load_iptc()
        self._reader: TableReader | None
        try:
            self._reader = TableReader()
        except OSError:
            self._reader = None
        # table -> (fingerprint, {what was read: its decoded value})
        self._decoded: dict[str, tuple[bytes, dict[str, Any]]] = {}

    def close(self) -> None:
        """Close the table reader's socket (not part of the Firewall protocol)."""
        with _LOCK:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self._decoded.clear()

    def _fingerprint(self, table: str) -> bytes | None:
        return None if self._reader is None else self._reader.fingerprint(table)

    def _read(self, table: str, key: str, decode: Callable[[], T]) -> T:
        """decode(), or what it returned last time if the table has not changed since."""
        with _LOCK:
            before = self._fingerprint(table)
            known = self._decoded.get(table)
            if before is not None and known is not None and known[0] == before and key in known[1]:
                cached: T = known[1][key]
                return cached
            value = decode()
            if before is not None and self._fingerprint(table) == before:
                if known is None or known[0] != before:
                    known = (before, {})
                    self._decoded[table] = known
                known[1][key] = value
            return value

    def _changed(self, table: str) -> None:
        self._decoded.pop(table, None)

    @contextmanager
    def _table(self, operation: str, table: str, where: str, commit: bool) -> Iterator[Any]:
        """A fresh libiptc handle of `table`; committed at the end when `commit`.

        A change holds the xtables lock from read to commit, as iptables-legacy does:
        libiptc replaces the whole table, so a change made in between by another writer
        would otherwise be lost or make the commit fail with EAGAIN.
        """
        iptc = self._iptc
        with _LOCK, _xtables_lock(operation, where) if commit else contextlib.nullcontext():
            try:
                handle = iptc.Table(table, autocommit=False)
                handle.refresh()
                yield handle
                if commit:
                    self._changed(table)
                    handle.commit()
            except iptc.IPTCError as exc:
                code = iptc_compat.last_errno(iptc) or errno.EIO
                raise host_error(operation, where, code, str(exc)) from None

    def list_chains(self, table: str) -> list[str]:
        def decode() -> tuple[str, ...]:
            with self._table("list chains", table, f"table {table}", commit=False) as handle:
                return tuple(chain.name for chain in handle.chains)

        return list(self._read(table, "", decode))

    def policy(self, table: str, chain: str) -> str:
        """A built-in chain's policy ("ACCEPT", "DROP"...)."""
        with self._table("read policy", table, f"chain {table}/{chain}", commit=False) as handle:
            found: Any = self._chain(handle, "read policy", table, chain).get_policy()
            return str(found.name) if found is not None else "ACCEPT"

    def create_chain(self, table: str, chain: str) -> None:
        where = f"chain {table}/{chain}"
        with self._table("create chain", table, where, commit=True) as handle:
            if handle.is_chain(chain):
                raise host_error("create chain", where, errno.EEXIST)
            handle.create_chain(chain)

    def delete_chain(self, table: str, chain: str) -> None:
        where = f"chain {table}/{chain}"
        with self._table("delete chain", table, where, commit=True) as handle:
            if not handle.is_chain(chain):
                raise host_error("delete chain", where, errno.ENOENT)
            handle.delete_chain(chain)

    def _chain(self, handle: Any, operation: str, table: str, chain: str) -> Any:
        if not handle.is_chain(chain):
            raise host_error(operation, f"chain {table}/{chain}", errno.ENOENT)
        return self._iptc.Chain(handle, chain)

    def list_rules(self, table: str, chain: str) -> list[Rule]:
        where = f"chain {table}/{chain}"

        def decode() -> tuple[Rule, ...]:
            with self._table("list rules", table, where, commit=False) as handle:
                entries = self._chain(handle, "list rules", table, chain).rules
                return tuple(to_rule(entry, handle.is_chain) for entry in entries)

        return list(self._read(table, "chain:" + chain, decode))

    def insert_rule(self, table: str, chain: str, rule: Rule, position: int = 0) -> None:
        where = f"chain {table}/{chain}"
        with self._table("insert rule", table, where, commit=True) as handle:
            target_chain = self._chain(handle, "insert rule", table, chain)
            if len(target_chain.rules) < position or position < 0:
                raise host_error("insert rule", where, errno.E2BIG)
            if rule.target not in STANDARD_TARGETS and not handle.is_chain(rule.target):
                raise host_error("insert rule", where, errno.ENOENT, f"no target {rule.target}")
            iptc_compat.insert_entry(handle, chain, self._to_iptc(rule), position)

    def delete_rule(self, table: str, chain: str, rule: Rule) -> None:
        where = f"chain {table}/{chain}"
        with self._table("delete rule", table, where, commit=True) as handle:
            target_chain = self._chain(handle, "delete rule", table, chain)
            for number, candidate in enumerate(target_chain.rules):
                if to_rule(candidate, handle.is_chain) == rule:
                    iptc_compat.delete_entry(self._iptc, handle, chain, number)
                    return
            raise host_error("delete rule", where, errno.ENOENT)

    def _to_iptc(self, rule: Rule) -> Any:
        if rule.other:
            raise ValueError(f"cannot write a rule with unmodelled parts: {rule.other}")
        result = self._iptc.Rule()
        if rule.source is not None:
            result.src = str(rule.source)
        if rule.in_iface is not None:
            result.in_interface = rule.in_iface
        if rule.out_iface is not None:
            result.out_interface = rule.out_iface
        if rule.ctstate:
            match = result.create_match("conntrack")
            match.ctstate = ",".join(rule.ctstate)
        if rule.comment is not None:
            match = result.create_match("comment")
            match.comment = rule.comment
        result.target = result.create_target(rule.target)
        return result


def _parameters(thing: Any) -> str:
    """iptables-save notation of a match's or target's options, from libxtables.

    python-iptables gets it by swapping the process's fd 1 for a pipe while libxtables
    prints: output of other threads in that moment is lost. netvm's own matches and
    targets are decoded from their bytes instead (`_decode_match`, `_plain_target`); this
    is only for what netvm does not write.
    """
    params: dict[str, list[str]] = thing.get_all_parameters()
    return " ".join(f"--{k} {' '.join(v)}".strip() for k, v in sorted(params.items()))


def _decode_match(match: Any) -> tuple[str, str] | None:
    """("comment", text) or ("ctstate", "A,B") from a match's bytes; None if it is not a
    plain comment or a plain --ctstate (revision 3) match."""
    raw = iptc_compat.match_bytes(match)
    data, revision = raw[XT_HEADER:], raw[XT_HEADER - 1]
    if match.name == "comment":
        return "comment", data[:256].split(b"\0", 1)[0].decode(errors="replace")
    if match.name == "conntrack":
        states = conntrack_states(data, revision)
        if states is not None:
            return "ctstate", ",".join(states)
    return None


def _plain_target(target: Any, is_chain: Callable[[str], bool]) -> bool:
    """True for a target without options: a verdict, a chain, or a bare MASQUERADE."""
    if target.name in ("ACCEPT", "DROP", "RETURN") or is_chain(target.name):
        return True
    if target.name != "MASQUERADE":
        return False
    data = iptc_compat.target_bytes(target)[XT_HEADER:]
    # nf_nat_ipv4_multi_range_compat: rangesize 1 and a range whose flags, addresses and
    # ports are all zero (no --to-ports, no --random).
    return data[:4] == struct.pack("=I", 1) and not any(data[4:20])


def to_rule(entry: Any, is_chain: Callable[[str], bool]) -> Rule:
    """Read a libiptc entry into a Rule; what netvm does not model goes into `other`."""
    other: list[str] = []
    source: ipaddress.IPv4Network | None = None
    src = entry.src
    if src not in ("0.0.0.0/0.0.0.0", "0.0.0.0/0"):
        try:
            source = ipaddress.IPv4Network(src)
        except ValueError:
            other.append(f"-s {src}")
    if entry.dst not in ("0.0.0.0/0.0.0.0", "0.0.0.0/0"):
        other.append(f"-d {entry.dst}")
    if entry.protocol not in ("ip", "0", 0, None):
        other.append(f"-p {entry.protocol}")
    if entry.fragment:
        other.append("-f")  # second and later fragments only
    comment: str | None = None
    ctstate: tuple[str, ...] = ()
    for match in entry.matches:
        decoded = _decode_match(match)
        if decoded is not None and decoded[0] == "comment" and comment is None:
            comment = decoded[1]
        elif decoded is not None and decoded[0] == "ctstate" and not ctstate:
            ctstate = tuple(sorted(decoded[1].split(",")))
        else:
            other.append(f"-m {match.name} {_parameters(match)}".strip())
    target = entry.target.name if entry.target is not None else ""
    if entry.target is not None and getattr(entry.target, "_goto", False):
        other.append(f"-g {target}")  # a goto: the chain's end is not a return here
    elif entry.target is not None and not _plain_target(entry.target, is_chain):
        other.append(f"-j {target} {_parameters(entry.target)}".strip())
    for attr, flag in (("in_interface", "-i"), ("out_interface", "-o")):
        value = getattr(entry, attr)
        if value is not None and value.startswith("!"):
            other.append(f"{flag} {value}")
    in_iface = entry.in_interface if entry.in_interface and "!" not in entry.in_interface else None
    out_iface = (
        entry.out_interface if entry.out_interface and "!" not in entry.out_interface else None
    )
    return Rule(
        target=target,
        source=source,
        in_iface=in_iface,
        out_iface=out_iface,
        ctstate=ctstate,
        comment=comment,
        other=" ".join(other),
    )


__all__ = ["IptablesFirewall", "TableReader", "load_iptc", "to_rule"]
