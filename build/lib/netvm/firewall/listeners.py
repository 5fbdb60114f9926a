"""Which host ports have a service listening: a port forward must not take one away.

A forward DNATs every new connection from the egress to a local address and the port, so
a forward of a port that a host service listens on (sshd's 22, say) would hand that
service's connections from the outside to the VM. Asked of the kernel's socket diagnostics
(NETLINK_SOCK_DIAG: TCP listeners, bound unconnected UDP sockets, IPv4 and IPv6) on a
socket opened in the namespace; only for attaches with forwards. /proc/net/tcp says the
same but costs ~6 ms here (it walks the whole connection hash); it is the fallback where
the kernel has no inet_diag. Loopback-only listeners are left out: nothing from the egress
reaches them.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
from collections.abc import Collection, Iterator

TCP_LISTEN = "0A"
UDP_BOUND = "07"
"""The `st` column of /proc/net/udp for a bound, unconnected socket."""
FILES = {"tcp": ("tcp", "tcp6"), "udp": ("udp", "udp6")}


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net's hex address: 32-bit words in host order (little-endian here)."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def listening(
    wanted: Collection[tuple[str, int]], root: str = "/proc/thread-self/net"
) -> list[str]:
    """`ADDRESS:PORT/PROTOCOL` of each non-loopback socket listening (TCP) or bound (UDP)
    on one of the (protocol, port) pairs in `wanted`, in this thread's namespace."""
    found: list[str] = []
    for protocol, names in FILES.items():
        ports = {port for proto, port in wanted if proto == protocol}
        if not ports:
            continue
        state = TCP_LISTEN if protocol == "tcp" else UDP_BOUND
        for name in names:
            try:
                with open(f"{root}/{name}", encoding="ascii") as table:
                    lines = table.read().splitlines()[1:]
            except FileNotFoundError:  # no IPv6 in this kernel
                continue
            for line in lines:
                fields = line.split()
                if len(fields) < 4 or fields[3] != state:
                    continue
                host, _, port_hex = fields[1].partition(":")
                port = int(port_hex, 16)
                if port not in ports:
                    continue
                address = _address(host)
                if not _loopback(address):
                    shown = f"[{address}]" if address.version == 6 else str(address)
                    found.append(f"{shown}:{port}/{protocol}")
    return sorted(set(found))


NETLINK_SOCK_DIAG = 4
TCPDIAG_GETSOCK = 18
"""The original inet_diag request: TCP only, but both families in one walk of the
listening hash (the kernel dumps it as AF_UNSPEC). Half the cost of one dump per family."""
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
STATES = {"tcp": 1 << 10, "udp": 1 << 7}
"""TCP_LISTEN; TCP_CLOSE, the state of a bound, unconnected UDP socket."""
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_HEADER = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, states, id
_LEGACY_REQUEST = struct.Struct("=B3x48xII")  # inet_diag_req: family, ..., id, states, dbs
_MESSAGE = struct.Struct("=BBBB2s2s16s")  # inet_diag_msg: family, state, ..., sport, dport, src
_SPORT = struct.Struct("!H")
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_EQ = 11
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes (jump if true), no (if false)
MAX_FILTERED_PORTS = 1024
"""More ports than this: no filter (the jumps are 16-bit offsets)."""


def port_filter(ports: Collection[int]) -> bytes:
    """INET_DIAG_REQ_BYTECODE that keeps only sockets bound to one of `ports` ("" if too
    many): the kernel then sends what matters, and usually nothing, which saves a read
    (NLMSG_DONE comes with the first answer) and the parsing of every other listener.

    The ports are ORed as `ss` compiles it, since the kernel accepts a jump only to an op
    on the path of `yes` jumps: per port an S_EQ op and its operand (true: on to the next
    op; false: to the next port, or past the end, dropping, after the last), then, but
    for the last port, a JMP whose `no` goes to the end (keeping).
    """
    ordered = sorted(set(ports))
    if not ordered or len(ordered) > MAX_FILTERED_PORTS:
        return b""
    size = 12 * len(ordered) - 4
    code = b""
    for port in ordered:
        at = len(code)
        code += _BC_OP.pack(INET_DIAG_BC_S_EQ, 8, 12) + _BC_OP.pack(0, 0, port)
        if at + 8 < size:
            code += _BC_OP.pack(INET_DIAG_BC_JMP, 4, size - at - 8)
    return struct.pack("=HH", 4 + size, INET_DIAG_REQ_BYTECODE) + code


class SockDiag:
    """A NETLINK_SOCK_DIAG socket in the namespace of the thread that makes it, usable from
    any thread afterwards (one dump at a time)."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
        )
        self._sock.bind((0, 0))
        self._lock = threading.Lock()
        self._seq = 0
        self._legacy = True
        """False once the kernel refused TCPDIAG_GETSOCK: one dump per family then."""
        self._filter = True
        """False once the kernel refused a port filter (port_filter)."""

    def close(self) -> None:
        self._sock.close()

    def _dump(self, kind: int, body: bytes) -> Iterator[tuple[int, int, bytes]]:
        """(family, port, address bytes) of each socket the dump request reports."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        flags = NLM_F_REQUEST | NLM_F_DUMP
        self._sock.send(_HEADER.pack(_HEADER.size + len(body), kind, flags, self._seq, 0) + body)
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, reply, _, seq, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    return
                if seq == self._seq:
                    if reply == NLMSG_DONE:
                        return
                    if reply == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                        raise OSError(-code, f"sock_diag: {errno.errorcode.get(-code, code)}")
                    if reply == kind:
                        family, _, _, _, sport, _, src = _MESSAGE.unpack_from(
                            data, offset + _HEADER.size
                        )
                        size = 4 if family == socket.AF_INET else 16
                        yield family, _SPORT.unpack(sport)[0], src[:size]
                offset += (length + 3) & ~3

    def _sockets(self, protocol: str, ports: Collection[int]) -> list[tuple[int, int, bytes]]:
        """The sockets of `protocol` in their listening state, IPv4 and IPv6 (only those on
        `ports` where the kernel filters them: the caller checks the port still)."""
        bytecode = port_filter(ports) if self._filter else b""
        try:
            return self._ask(protocol, bytecode)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not bytecode:
                raise
            self._filter = False  # the kernel refused the filter: every listener, then
            return self._ask(protocol, b"")

    def _ask(self, protocol: str, bytecode: bytes) -> list[tuple[int, int, bytes]]:
        states = STATES[protocol]
        if protocol == "tcp" and self._legacy:
            try:
                body = _LEGACY_REQUEST.pack(0, states, 0) + bytecode
                return list(self._dump(TCPDIAG_GETSOCK, body))
            except OSError as exc:
                if exc.errno == errno.EINVAL and bytecode:
                    raise  # the filter, perhaps: _sockets asks again without it
                self._legacy = False  # a kernel without the original request
        found: list[tuple[int, int, bytes]] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            body = _REQUEST.pack(family, PROTOCOLS[protocol], 0, states) + bytecode
            found += self._dump(SOCK_DIAG_BY_FAMILY, body)
        return found

    def listening(self, wanted: Collection[tuple[str, int]]) -> list[str]:
        """As `listening()`, from the kernel's socket tables."""
        found: set[str] = set()
        with self._lock:
            for protocol in FILES:
                ports = {port for proto, port in wanted if proto == protocol}
                if not ports:
                    continue
                for _, port, raw in self._sockets(protocol, ports):
                    if port not in ports:
                        continue
                    address = ipaddress.ip_address(raw)
                    if not _loopback(address):
                        shown = f"[{address}]" if address.version == 6 else str(address)
                        found.add(f"{shown}:{port}/{protocol}")
        return sorted(found)
