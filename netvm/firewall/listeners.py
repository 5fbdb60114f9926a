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

    def _sockets(self, protocol: str) -> list[tuple[int, int, bytes]]:
        """Every socket of `protocol` in its listening state, IPv4 and IPv6."""
        states = STATES[protocol]
        if protocol == "tcp" and self._legacy:
            try:
                return list(self._dump(TCPDIAG_GETSOCK, _LEGACY_REQUEST.pack(0, states, 0)))
            except OSError:  # a kernel without the original request: one per family
                self._legacy = False
        found: list[tuple[int, int, bytes]] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            body = _REQUEST.pack(family, PROTOCOLS[protocol], 0, states)
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
                for _, port, raw in self._sockets(protocol):
                    if port not in ports:
                        continue
                    address = ipaddress.ip_address(raw)
                    if not _loopback(address):
                        shown = f"[{address}]" if address.version == 6 else str(address)
                        found.add(f"{shown}:{port}/{protocol}")
        return sorted(found)
