"""Which host ports have a service listening: a port forward must not take one away.

A forward DNATs every new connection from the egress to a local address and the port, so
a forward of a port that a host service listens on (sshd's 22, say) would hand that
service's connections from the outside to the VM. Read from /proc/thread-self/net (the
namespace of the calling thread) on the namespace thread; only for attaches with forwards.
Loopback-only listeners are left out: nothing from the egress reaches them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

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
