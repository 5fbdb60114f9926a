"""Set elements written and read with nf_tables netlink messages netvm packs itself.

An attach adds a handful of elements to netvm's sets. Through libnftables that costs
0.17 ms with 10 VMs and 0.8 ms with 1000 (it lists the ruleset into its cache first, so
the cost grows with the number of VMs, measured on this machine). The messages themselves
are small and fixed: one batch of NEWSETELEM/DESTROYSETELEM, committed by the kernel as one
transaction, and a GETSETELEM by key to read a VM's record. Packed here they cost the
kernel's time plus a few microseconds, whatever the number of VMs.

Keys are laid out as nftables lays them out: an interface name in 16 bytes, a MAC in 6,
an IPv4 address in 4 (network order), a protocol in 1, a port in 2 (network order); in a
concatenation each field takes a multiple of 4 bytes.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Literal

from netvm.errors import host_error
from netvm.firewall.guard import Element, FieldType, SetSchema, Value
from netvm.firewall.listeners import SockDiag, listening
from netvm.firewall.xt import conntrack_states

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 16
NFNL_MSG_BATCH_END = 17
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
NFT_MSG_DESTROYSETELEM = 30
"""A delete that is no error where the element is gone (Linux 6.3); older kernels refuse
the message type (EINVAL) and get an add and a delete of each element instead."""
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_USERDATA = 6
NFTA_SET_ELEM_KEY_END = 10
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFT_JUMP = -3
NFTNL_UDATA_SET_ELEM_COMMENT = 0
NLA_F_NESTED = 1 << 15
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_DUMP = 0x300
NFTA_RULE_TABLE = 1
NFTA_RULE_HANDLE = 3
NFTA_RULE_EXPRESSIONS = 4
NFTA_RULE_USERDATA = 7
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
NFTA_MATCH_NAME = 1
NFTA_MATCH_REV = 2
NFTA_MATCH_INFO = 3
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_CHAIN_HOOK = 4
NFTA_HOOK_DEV = 3
NFTA_HOOK_DEVS = 4
FAMILIES = {"inet": 1, "ip": 2, "netdev": 5, "bridge": 7}
_CREATE_FLAGS = {"add": NLM_F_CREATE, "create": NLM_F_CREATE | NLM_F_EXCL}
_MESSAGES = {
    "add": NFT_MSG_NEWSETELEM,
    "create": NFT_MSG_NEWSETELEM,
    "delete": NFT_MSG_DELSETELEM,
    "destroy": NFT_MSG_DESTROYSETELEM,
}
_HEADER = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")
_U8 = struct.Struct("B")
_VALUE = struct.Struct("=HHHH")
_BE16 = struct.Struct("!H")
_WIDTH: dict[FieldType, int] = {
    "ifname": 16,
    "ether_addr": 6,
    "ipv4_addr": 4,
    "inet_proto": 1,
    "inet_service": 2,
    "verdict": 0,
}


def _attr(kind: int, payload: bytes) -> bytes:
    size = _ATTR.size + len(payload)
    return _ATTR.pack(size, kind) + payload + b"\0" * (-size & 3)


def _nested(kind: int, payload: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, payload)


def _string(value: str) -> bytes:
    return value.encode() + b"\0"


_FORMATS: dict[FieldType, str] = {
    "ifname": "16s",
    "ether_addr": "6s",
    "ipv4_addr": "4s",
    "inet_proto": "B",
    "inet_service": "H",
}


def _ifname(value: Value) -> bytes:
    assert isinstance(value, str)
    return value.encode()  # struct pads it to 16 bytes with NULs


def _ipv4(value: Value) -> bytes:
    if isinstance(value, ipaddress.IPv4Address):
        return value.packed
    return ipaddress.IPv4Address(value).packed


def _ether(value: Value) -> bytes:
    assert isinstance(value, bytes)
    if len(value) != 6:
        raise ValueError(f"not a MAC address: {value!r}")
    return value


def _integer(value: Value) -> int:
    assert isinstance(value, int)
    return value


_CONVERT: dict[FieldType, Callable[[Value], bytes | int]] = {
    "ifname": _ifname,
    "ipv4_addr": _ipv4,
    "ether_addr": _ether,
    "inet_proto": _integer,
    "inet_service": _integer,
}


class _Layout:
    """A key or datum layout as one struct, network order (its only integers are a
    protocol byte and ports), padded to 4 bytes, with its two attribute headers.

    An attach packs a dozen keys: the headers of each nesting are packed once here, and
    each field has its converter, so a key costs one struct pack and a call per field."""

    def __init__(self, kinds: Sequence[FieldType]) -> None:
        if len(kinds) == 1:
            fields = _FORMATS[kinds[0]]
        else:  # each field of a concatenation takes a multiple of 4 bytes
            fields = "".join(
                _FORMATS[kind] + f"{-struct.calcsize('!' + _FORMATS[kind]) & 3}x" for kind in kinds
            )
        size = struct.calcsize("!" + fields)
        self.kinds = tuple(kinds)
        self._value = struct.Struct("!" + fields + f"{-size & 3}x")
        self._converters = tuple(_CONVERT[kind] for kind in kinds)
        self._sizes = (_VALUE.size + self._value.size, _ATTR.size + size)
        outer, inner = self._sizes
        self._heads = {
            nested: _VALUE.pack(outer, nested | NLA_F_NESTED, inner, NFTA_DATA_VALUE)
            for nested in (NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_KEY_END, NFTA_SET_ELEM_DATA)
        }
        self._plain = (
            _ATTR.pack(_ATTR.size + outer, NFTA_LIST_ELEM | NLA_F_NESTED)
            + self._heads[NFTA_SET_ELEM_KEY]
        )

    def pack(self, nested: int, values: Sequence[Value]) -> bytes:
        """A nested attribute `nested` (key, key end or datum) holding one NFTA_DATA_VALUE
        of these values."""
        return self._heads[nested] + self._values(values)

    def element(self, values: Sequence[Value]) -> bytes:
        """A whole NFTA_LIST_ELEM of a key alone (most of an attach's elements)."""
        return self._plain + self._values(values)

    def _values(self, values: Sequence[Value]) -> bytes:
        return self._value.pack(
            *[convert(value) for convert, value in zip(self._converters, values, strict=True)]
        )


_LAYOUTS: dict[tuple[FieldType, ...], _Layout] = {}


def _layout(kinds: tuple[FieldType, ...]) -> _Layout:
    found = _LAYOUTS.get(kinds)
    if found is None:
        found = _LAYOUTS[kinds] = _Layout(kinds)
    return found


def comment_udata(comment: str) -> bytes:
    """libnftables' user data for an element comment: one TLV, NUL-terminated."""
    text = comment.encode() + b"\0"
    if len(text) > 253:
        raise ValueError(f"element comment too long ({len(text)} bytes)")
    return struct.pack("BB", NFTNL_UDATA_SET_ELEM_COMMENT, len(text)) + text


def parse_comment(udata: bytes) -> str | None:
    at = 0
    while at + 2 <= len(udata):
        kind, length = udata[at], udata[at + 1]
        value = udata[at + 2 : at + 2 + length]
        if kind == NFTNL_UDATA_SET_ELEM_COMMENT:
            return value.split(b"\0", 1)[0].decode(errors="replace")
        at += 2 + length
    return None


def _element_attr(element: Element, with_data: bool) -> bytes:
    schema = element.schema
    key = _layout(schema.key)
    if not schema.interval and (
        not with_data or (element.comment is None and (element.data is None or not schema.data))
    ):
        return key.element(element.key)
    body = key.pack(NFTA_SET_ELEM_KEY, element.key)
    if schema.interval:
        end = element.key_end if element.key_end is not None else element.key
        body += key.pack(NFTA_SET_ELEM_KEY_END, end)
    if with_data and schema.data is not None and element.data is not None:
        if schema.data == ("verdict",):
            (chain,) = element.data
            assert isinstance(chain, str)
            verdict = _attr(NFTA_VERDICT_CODE, struct.pack("!i", NFT_JUMP)) + _attr(
                NFTA_VERDICT_CHAIN, _string(chain)
            )
            body += _nested(NFTA_SET_ELEM_DATA, _nested(NFTA_DATA_VERDICT, verdict))
        else:
            body += _layout(schema.data).pack(NFTA_SET_ELEM_DATA, element.data)
    if with_data and element.comment is not None:
        body += _attr(NFTA_SET_ELEM_USERDATA, comment_udata(element.comment))
    return _ATTR.pack(_ATTR.size + len(body), NFTA_LIST_ELEM | NLA_F_NESTED) + body


_HEADS: dict[tuple[str, str, str], bytes] = {}


def _list_body(schema: SetSchema, table: str, elements: bytes) -> bytes:
    key = (schema.family, schema.name, table)
    head = _HEADS.get(key)
    if head is None:
        head = _HEADS[key] = (
            _NFGENMSG.pack(FAMILIES[schema.family], 0, 0)
            + _attr(NFTA_SET_ELEM_LIST_TABLE, _string(table))
            + _attr(NFTA_SET_ELEM_LIST_SET, _string(schema.name))
        )
    return head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, elements)


def _runs(changes: Sequence[tuple[str, Element]]) -> Iterator[tuple[str, list[Element]]]:
    """Consecutive changes of one verb and one set, as one message each: the kernel's cost
    is per message more than per element (8 elements: 68 us in 8 messages here)."""
    run: list[Element] = []
    verb = ""
    for change, element in changes:
        if run and (change != verb or element.schema is not run[0].schema):
            yield verb, run
            run = []
        verb = change
        run.append(element)
    if run:
        yield verb, run


def _without_destroy(changes: Sequence[tuple[str, Element]]) -> list[tuple[str, Element]]:
    """The destroys as an add and then a delete of each element, where the first destroy
    stood: what a destroy means, for kernels without it (the add cannot fail on an element
    that is there with the same data, and the delete then cannot fail on a missing one)."""
    gone = [element for verb, element in changes if verb == "destroy"]
    kept = [(verb, element) for verb, element in changes if verb != "destroy"]
    if not gone:
        return kept
    at = next(i for i, (verb, _) in enumerate(changes) if verb == "destroy")
    return kept[:at] + [("add", e) for e in gone] + [("delete", e) for e in gone] + kept[at:]


def _attrs(data: bytes, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    while offset + _ATTR.size <= end:
        size, kind = _ATTR.unpack_from(data, offset)
        if size < _ATTR.size:
            return
        yield kind & 0x3FFF, offset + _ATTR.size, offset + size
        offset += (size + 3) & ~3


class NetlinkElements:
    """A NETLINK_NETFILTER socket in the namespace of the thread that creates it.

    Any thread may use it afterwards (a lock keeps one exchange in flight).
    """

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self._sock.bind((0, 0))
        self._seq = 0
        self._lock = threading.Lock()
        self._destroy = True
        """False once the kernel refused NFT_MSG_DESTROYSETELEM (before Linux 6.3)."""

    def close(self) -> None:
        self._sock.close()

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _message(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        seq = self._next()
        return seq, _HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body

    def commit(
        self,
        changes: Sequence[tuple[str, Element]],
        table: str,
        operation: str,
        where: str,
    ) -> None:
        """Apply ("add" | "create" | "delete" | "destroy", element) pairs as one transaction,
        in order.

        An add of an element that exists with the same data is no change (its comment is
        kept); with other data it fails (EEXIST); a create of one that exists fails
        (EEXIST, NLM_F_EXCL); a delete of one that does not exist fails the whole batch
        (ENOENT), as in libnftables; a destroy of one that does not exist is no change.
        """
        if not changes:
            return
        if not self._destroy:
            changes = _without_destroy(changes)
        failure = self._commit(changes, table)
        if failure == errno.EINVAL and self._destroy and any(v == "destroy" for v, _ in changes):
            # A kernel before 6.3: no NFT_MSG_DESTROYSETELEM. If the same changes without
            # it pass, the message type was what it refused.
            failure = self._commit(_without_destroy(changes), table)
            if not failure:
                self._destroy = False
        if failure:
            raise host_error(operation, where, failure, "nf_tables set elements")

    def _commit(self, changes: Sequence[tuple[str, Element]], table: str) -> int:
        """One batch; the error code of its first failure, or 0."""
        with self._lock:
            begin = _NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
            first_seq, first = self._message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin)
            parts = [first]
            ours = {first_seq}
            runs = list(_runs(changes))
            for number, (verb, run) in enumerate(runs, 1):
                adding = verb in _CREATE_FLAGS
                # Only the last message asks for an ack: the kernel reports every message
                # that fails whether asked or not, and runs the whole batch before it
                # answers, so the last ack comes after any error (and after the error of
                # a failed commit, which names the batch's first message).
                flags = NLM_F_REQUEST | _CREATE_FLAGS.get(verb, 0)
                if number == len(runs):
                    flags |= NLM_F_ACK
                packed_elements = b"".join(_element_attr(e, adding) for e in run)
                body = _list_body(run[0].schema, table, packed_elements)
                kind = NFNL_SUBSYS_NFTABLES << 8 | _MESSAGES[verb]
                last_seq, packed = self._message(kind, flags, body)
                parts.append(packed)
                ours.add(last_seq)
            _, end = self._message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, begin)
            parts.append(end)
            self._sock.send(b"".join(parts))
            failure = 0
            done = False
            while not done and not failure:
                for seq, code, _, _, _ in self._receive():
                    if seq in ours:
                        failure = failure or code
                        done = done or seq == last_seq
            if failure:
                self._drain()
        return failure

    def _drain(self) -> None:
        """Read what the kernel still sends about an aborted batch."""
        while True:
            try:
                self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return

    def _receive(self) -> Iterator[tuple[int, int, int, bytes, int]]:
        """(seq, error code or 0, message type, datagram, offset) of each message received."""
        data = self._sock.recv(65536)
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _, seq, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                return
            code = 0
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                code = -code
            yield seq, code, kind, data[offset : offset + length], 0
            offset += (length + 3) & ~3

    def comment(self, element: Element, table: str, operation: str) -> str | None:
        """The comment of `element` (looked up by its key), or None if there is no such element.

        "" for an element without a comment.
        """
        body = _list_body(element.schema, table, _element_attr(element, False))
        with self._lock:
            kind = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM
            seq, packed = self._message(kind, NLM_F_REQUEST | NLM_F_ACK, body)
            self._sock.send(packed)
            found: str | None = None
            done = False
            while not done:
                for got, code, reply, message, _ in self._receive():
                    if got != seq:
                        continue
                    if reply == NLMSG_ERROR:
                        done = True
                        if code in (errno.ENOENT,):
                            return None
                        if code:
                            raise host_error(operation, table, code, "nf_tables set elements")
                    else:
                        found = _comment_of(message)
        return found

    def _dump(self, kind: int, body: bytes, operation: str, where: str) -> Iterator[bytes]:
        """The messages of one nf_tables dump (none where the table or family has nothing:
        ENOENT); HostError on another refusal."""
        with self._lock:
            seq, packed = self._message(
                NFNL_SUBSYS_NFTABLES << 8 | kind, NLM_F_REQUEST | NLM_F_DUMP, body
            )
            self._sock.send(packed)
            while True:
                for got, code, reply, message, _ in self._receive():
                    if got != seq:
                        continue
                    if reply == NLMSG_DONE or (reply == NLMSG_ERROR and code == errno.ENOENT):
                        return
                    if reply == NLMSG_ERROR:
                        raise host_error(operation, where, code, "nf_tables dump")
                    yield message

    def chain_devices(self, operation: str) -> dict[tuple[str, str], list[str]]:
        """(table, chain) -> the devices of each netdev base chain (a GETCHAIN dump):
        libnftables before 1.0.7 lists such chains without them."""
        found: dict[tuple[str, str], list[str]] = {}
        body = _NFGENMSG.pack(FAMILIES["netdev"], 0, 0)
        for message in self._dump(NFT_MSG_GETCHAIN, body, operation, "netdev"):
            table, chain, devices = _chain_devices(message)
            if devices:
                found[(table, chain)] = devices
        return found

    def rule_ctstates(self, family: str, table: str, operation: str) -> dict[int, tuple[str, ...]]:
        """handle -> states of the table's rules whose one xtables match is a plain
        `conntrack --ctstate` (a GETRULE dump); {} for a table that does not exist."""
        body = _NFGENMSG.pack(FAMILIES[family], 0, 0) + _attr(NFTA_RULE_TABLE, _string(table))
        found: dict[int, tuple[str, ...]] = {}
        for message in self._dump(NFT_MSG_GETRULE, body, operation, f"{family} {table}"):
            handle, states = _rule_ctstates(message)
            if handle is not None and states is not None:
                found[handle] = states
        return found

    def rule_comments(self, family: str, table: str, operation: str) -> dict[int, str]:
        """handle -> comment of the table's rules that have one (a GETRULE dump); {} for
        a table that does not exist."""
        body = _NFGENMSG.pack(FAMILIES[family], 0, 0) + _attr(NFTA_RULE_TABLE, _string(table))
        found: dict[int, str] = {}
        for message in self._dump(NFT_MSG_GETRULE, body, operation, f"{family} {table}"):
            handle, comment = _rule_comment(message)
            if handle is not None and comment is not None:
                found[handle] = comment
        return found


def _rule_ctstates(message: bytes) -> tuple[int | None, tuple[str, ...] | None]:
    """(handle, states) of one NEWRULE message whose only xtables match is a plain
    `conntrack --ctstate` (xt.conntrack_states), as iptables-nft writes it; (handle, None)
    for any other rule."""
    handle: int | None = None
    states: tuple[str, ...] | None = None
    matches = 0
    for kind, begin, end in _attrs(message, _HEADER.size + _NFGENMSG.size, len(message)):
        if kind == NFTA_RULE_HANDLE and end - begin == 8:
            (handle,) = struct.unpack_from(">Q", message, begin)
        elif kind == NFTA_RULE_EXPRESSIONS:
            for _, expr_begin, expr_end in _attrs(message, begin, end):
                found = _xt_match(message, expr_begin, expr_end)
                if found is None or found[0] == b"comment":
                    continue
                matches += 1
                name, revision, info = found
                if name == b"conntrack":
                    states = conntrack_states(info, revision)
    return handle, states if matches == 1 else None


def _xt_match(message: bytes, begin: int, end: int) -> tuple[bytes, int, bytes] | None:
    """(name, revision, info) of an xtables match expression; None for another one."""
    name, data = b"", (0, 0)
    for kind, start, stop in _attrs(message, begin, end):
        if kind == NFTA_EXPR_NAME:
            name = message[start:stop].split(b"\0", 1)[0]
        elif kind == NFTA_EXPR_DATA:
            data = (start, stop)
    if name != b"match":
        return None
    match, revision, info = b"", 0, b""
    for kind, start, stop in _attrs(message, *data):
        if kind == NFTA_MATCH_NAME:
            match = message[start:stop].split(b"\0", 1)[0]
        elif kind == NFTA_MATCH_REV and stop - start == 4:
            (revision,) = struct.unpack_from(">I", message, start)
        elif kind == NFTA_MATCH_INFO:
            info = message[start:stop]
    return match, revision, info


def _chain_devices(message: bytes) -> tuple[str, str, list[str]]:
    """(table, chain, devices of its hook) of one NEWCHAIN message."""
    table = chain = ""
    devices: list[str] = []

    def text(begin: int, end: int) -> str:
        return message[begin:end].split(b"\0", 1)[0].decode(errors="replace")

    for kind, begin, end in _attrs(message, _HEADER.size + _NFGENMSG.size, len(message)):
        if kind == NFTA_CHAIN_TABLE:
            table = text(begin, end)
        elif kind == NFTA_CHAIN_NAME:
            chain = text(begin, end)
        elif kind == NFTA_CHAIN_HOOK:
            for hook_kind, hook_begin, hook_end in _attrs(message, begin, end):
                if hook_kind == NFTA_HOOK_DEV:
                    devices.append(text(hook_begin, hook_end))
                elif hook_kind == NFTA_HOOK_DEVS:
                    devices += [text(b, e) for _, b, e in _attrs(message, hook_begin, hook_end)]
    return table, chain, list(dict.fromkeys(devices))  # a device can come in both forms


def _rule_comment(message: bytes) -> tuple[int | None, str | None]:
    """(handle, comment) of one NEWRULE message: the comment libnftables writes (user
    data), or the one of an xtables `comment` match, as iptables-nft-restore writes it
    (struct xt_comment_info: the text, NUL-padded), which libnftables lists without it."""
    handle: int | None = None
    comment: str | None = None
    for kind, begin, end in _attrs(message, _HEADER.size + _NFGENMSG.size, len(message)):
        if kind == NFTA_RULE_HANDLE and end - begin == 8:
            (handle,) = struct.unpack_from(">Q", message, begin)
        elif kind == NFTA_RULE_USERDATA:
            comment = parse_comment(message[begin:end]) or comment
        elif kind == NFTA_RULE_EXPRESSIONS and comment is None:
            for _, expr_begin, expr_end in _attrs(message, begin, end):
                comment = _xt_comment(message, expr_begin, expr_end)
                if comment is not None:
                    break
    return handle, comment


def _xt_comment(message: bytes, begin: int, end: int) -> str | None:
    found = _xt_match(message, begin, end)
    if found is None or found[0] != b"comment":
        return None
    return found[2].split(b"\0", 1)[0].decode(errors="replace")


def _comment_of(message: bytes) -> str:
    start = _HEADER.size + _NFGENMSG.size
    for kind, begin, end in _attrs(message, start, len(message)):
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
            continue
        for _, elem_begin, elem_end in _attrs(message, begin, end):
            for attr_kind, attr_begin, attr_end in _attrs(message, elem_begin, elem_end):
                if attr_kind == NFTA_SET_ELEM_USERDATA:
                    return parse_comment(message[attr_begin:attr_end]) or ""
    return ""


class KernelElements:
    """NetlinkElements opened on the namespace's thread on first use, then used from any
    thread (like the rtnetlink socket)."""

    def __init__(self, call: Callable[[Callable[[], Any]], Any]) -> None:
        self._call = call
        self._socket: NetlinkElements | None = None
        self._diag: SockDiag | Literal[False] | None = None
        """None: not opened yet; False: the kernel has no NETLINK_SOCK_DIAG."""
        self._lock = threading.Lock()

    def _open(self) -> NetlinkElements:
        with self._lock:
            if self._socket is None:
                self._socket = self._call(NetlinkElements)
            return self._socket

    def commit(
        self, changes: Sequence[tuple[str, Element]], table: str, operation: str, where: str
    ) -> None:
        self._open().commit(changes, table, operation, where)

    def comment(self, element: Element, table: str, operation: str) -> str | None:
        return self._open().comment(element, table, operation)

    def rule_comments(self, family: str, table: str, operation: str) -> dict[int, str]:
        return self._open().rule_comments(family, table, operation)

    def chain_devices(self, operation: str) -> dict[tuple[str, str], list[str]]:
        return self._open().chain_devices(operation)

    def rule_ctstates(self, family: str, table: str, operation: str) -> dict[int, tuple[str, ...]]:
        return self._open().rule_ctstates(family, table, operation)

    def listening(self, wanted: Collection[tuple[str, int]]) -> list[str]:
        with self._lock:
            if self._diag is None:
                try:
                    self._diag = self._call(SockDiag)
                except OSError:  # no NETLINK_SOCK_DIAG: /proc, on the namespace thread
                    self._diag = False
        diag = self._diag
        if not isinstance(diag, SockDiag):
            found: list[str] = self._call(lambda: listening(wanted))
            return found
        try:
            return diag.listening(wanted)
        except OSError:  # no inet_diag for a family or protocol (a module missing)
            fallback: list[str] = self._call(lambda: listening(wanted))
            return fallback

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            if isinstance(self._diag, SockDiag):
                self._diag.close()
            self._diag = None
