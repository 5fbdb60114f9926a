"""The kernel's connection tracking entries of one address, deleted through ctnetlink.

A guest's connections outlive its detach in conntrack: the next VM given its address would
receive the old tenant's flows (a port forward's peers, replies to its own connections; a
steady flow refreshes its entry for ever). netvm deletes the entries whose original or
reply source is the address when it hands the address to another VM.

Two IPCTNL_MSG_CT_DELETE requests without a full tuple but with CTA_FILTER (original
source, then reply source): the kernel walks its table once per request and deletes what
matches (Linux 6.12 and later). An older kernel reads the tuple as one to look up and
refuses it (EINVAL): then the entries are dumped with the same filter (Linux 5.8 and later)
and deleted one by one, each by the CTA_TUPLE_ORIG the dump gave, and only if its own
tuples name the address (a kernel that ignored the filter would dump every entry). The way
that worked is kept for the socket's life. A kernel without ctnetlink refuses both (or the
socket): there is nothing netvm can delete, and it says so once. Like the rtnetlink
messages (rtnl.py), packed by hand on one NETLINK_NETFILTER socket: no library of the
standard set speaks ctnetlink, and a process (`conntrack -D`) is what netvm never starts.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
from collections.abc import Iterator

from netvm.backends.rtnl import NLA_F_NESTED, RtnlError, attr, attrs

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_TUPLE_IP = 1
CTA_IP_V4_SRC = 1
CTA_FILTER = 25
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_REPLY_FLAGS = 2
CTA_FILTER_FLAG_CTA_IP_SRC = 1 << 0
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
_HEADER = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_ERRNO = struct.Struct("=i")
_U32 = struct.Struct("=I")
REFUSED_FILTER = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT})
"""What a kernel answers a message it cannot take: a filter where it wants a tuple (before
6.12), or ctnetlink absent (no such subsystem)."""


def _filter(address: ipaddress.IPv4Address, direction: int) -> bytes:
    """CTA_TUPLE_ORIG or _REPLY with only the source address, and CTA_FILTER saying so."""
    tuple_ip = attr(CTA_TUPLE_IP | NLA_F_NESTED, attr(CTA_IP_V4_SRC, address.packed))
    orig = CTA_FILTER_FLAG_CTA_IP_SRC if direction == CTA_TUPLE_ORIG else 0
    reply = CTA_FILTER_FLAG_CTA_IP_SRC if direction == CTA_TUPLE_REPLY else 0
    flags = attr(CTA_FILTER_ORIG_FLAGS, _U32.pack(orig))
    flags += attr(CTA_FILTER_REPLY_FLAGS, _U32.pack(reply))
    return attr(direction | NLA_F_NESTED, tuple_ip) + attr(CTA_FILTER | NLA_F_NESTED, flags)


class Conntrack:
    """One NETLINK_NETFILTER socket, in the namespace of the thread that creates it."""

    def __init__(self) -> None:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        try:
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._seq = 0
        self._lock = threading.Lock()
        self._buffer = bytearray(1 << 16)
        self._filtered: bool | None = None
        """Whether the kernel deletes by filter (None: not known yet)."""

    def close(self) -> None:
        self._sock.close()

    def _message(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        payload = _NFGENMSG.pack(socket.AF_INET, 0, 0) + body
        kind = NFNL_SUBSYS_CTNETLINK << 8 | kind
        header = _HEADER.pack(
            _HEADER.size + len(payload), kind, flags | NLM_F_REQUEST, self._seq, 0
        )
        return self._seq, header + payload

    def _answers(self, pending: set[int]) -> Iterator[tuple[int, int, int, int]]:
        """(seq, type, offset, end) of each message answering one of `pending`; an error
        or ack (type NLMSG_ERROR, the errno at offset) or NLMSG_DONE ends its sequence."""
        while pending:
            size = self._sock.recv_into(self._buffer)
            offset = 0
            while offset + _HEADER.size <= size:
                length, kind, _, seq, _ = _HEADER.unpack_from(self._buffer, offset)
                if length < _HEADER.size:
                    break
                if seq in pending:
                    if kind in (NLMSG_ERROR, NLMSG_DONE):
                        pending.discard(seq)
                    yield seq, kind, offset, offset + length
                offset += (length + 3) & ~3

    def _code(self, offset: int) -> int:
        (code,) = _ERRNO.unpack_from(self._buffer, offset + _HEADER.size)
        return -int(code)

    def forget(self, address: ipaddress.IPv4Address) -> int | None:
        """Delete every entry whose original or reply source is `address`: -1 when deleted
        by filter (the kernel does not say how many), else how many were deleted one by
        one; None when this kernel has no ctnetlink to ask. RtnlError on another refusal."""
        with self._lock:
            if self._filtered is not False:
                refused = self._filtered_delete(address)
                if not refused:
                    self._filtered = True
                    return -1
                if refused - REFUSED_FILTER:
                    raise RtnlError(next(iter(refused - REFUSED_FILTER)))
                self._filtered = False  # before 6.12: the filter is read as a tuple
            return self._forget_one_by_one(address)

    def _filtered_delete(self, address: ipaddress.IPv4Address) -> set[int]:
        requests = [
            self._message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, _filter(address, direction))
            for direction in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY)
        ]
        self._sock.send(b"".join(message for _, message in requests))
        codes = [
            self._code(offset)
            for _, kind, offset, _ in self._answers({seq for seq, _ in requests})
            if kind == NLMSG_ERROR
        ]
        return {code for code in codes if code}

    def _forget_one_by_one(self, address: ipaddress.IPv4Address) -> int | None:
        """Before filtered deletes: dump with the filter, delete each entry that names the
        address by its original tuple; None if the kernel refuses the dump too."""
        tuples: list[bytes] = []
        for direction in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
            seq, message = self._message(IPCTNL_MSG_CT_GET, NLM_F_DUMP, _filter(address, direction))
            self._sock.send(message)
            for _, kind, offset, end in self._answers({seq}):
                if kind == NLMSG_ERROR:
                    code = self._code(offset)
                    if code in REFUSED_FILTER:
                        return None
                    if code:
                        raise RtnlError(code)
                    continue
                if kind == NLMSG_DONE:
                    continue
                found = self._entry(offset, end)
                if found is not None and address in found[1]:
                    tuples.append(found[0])
        deleted = 0
        for tuple_attr in dict.fromkeys(tuples):
            seq, message = self._message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, tuple_attr)
            self._sock.send(message)
            for _, kind, offset, _ in self._answers({seq}):
                code = self._code(offset) if kind == NLMSG_ERROR else 0
                if code and code != errno.ENOENT:  # ENOENT: gone meanwhile
                    raise RtnlError(code)
                deleted += not code
        return deleted

    def _entry(self, offset: int, end: int) -> tuple[bytes, set[ipaddress.IPv4Address]] | None:
        """One dumped entry: its CTA_TUPLE_ORIG (to delete it by) and the source addresses
        of its two tuples."""
        view = memoryview(self._buffer)
        start = offset + _HEADER.size + _NFGENMSG.size
        original: bytes | None = None
        sources: set[ipaddress.IPv4Address] = set()
        for kind, attr_start, attr_end in attrs(view, start, end):
            if kind not in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
                continue
            if kind == CTA_TUPLE_ORIG:
                raw = bytes(view[attr_start:attr_end])
                original = attr(CTA_TUPLE_ORIG | NLA_F_NESTED, raw)
            for part, part_start, part_end in attrs(view, attr_start, attr_end):
                if part != CTA_TUPLE_IP:
                    continue
                for field, field_start, field_end in attrs(view, part_start, part_end):
                    if field == CTA_IP_V4_SRC and field_end - field_start == 4:
                        packed = bytes(view[field_start:field_end])
                        sources.add(ipaddress.IPv4Address(packed))
        return (original, sources) if original is not None else None
