"""Probes that run on threads inside a namespace: ICMP echo, UDP request, a UDP echo server."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import secrets
import select
import socket
import struct
import threading
import time
from typing import Any

from netvm.testing.namespaces import run_in_netns
from netvm.testing.watcher import SocketWatcher, bound_socket

PING_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
IP_UDP_HEADERS = 28
"""IPv4 (20) and UDP or ICMP echo (8) header bytes: payload + 28 = the IP packet's size."""


def allow_ping() -> None:
    """Let every group use ICMP datagram ("ping") sockets in the calling thread's namespace."""
    with open(PING_GROUP_RANGE, "w") as switch:
        switch.write("0 2147483647\n")


def up_loopback(ipr: Any) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _unreached(exc: OSError) -> bool:
    """Errors that mean "the packet did not get there", not "the probe is broken"."""
    return exc.errno in (
        errno.EMSGSIZE,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ECONNREFUSED,
        errno.EHOSTDOWN,
    )


def _dont_fragment(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)


IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2


def ping(
    netns: str | None,
    destination: str | ipaddress.IPv4Address,
    *,
    payload: int = 56,
    timeout: float = 1.0,
    dont_fragment: bool = False,
) -> bool:
    """Send one ICMP echo request from inside `netns`; True if the matching reply came back.

    Uses an ICMP datagram socket, so the namespace's net.ipv4.ping_group_range must allow it
    (the namespaces made by this module do). With `dont_fragment`, a packet larger than the
    path MTU is refused (False) instead of fragmented. The IP packet is `payload + 28` bytes.
    """
    target = str(destination)

    def probe() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) as sock:
            if dont_fragment:
                _dont_fragment(sock)
            sequence = secrets.randbelow(1 << 16)
            body = secrets.token_bytes(payload)
            header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, 0, sequence)
            deadline = time.monotonic() + timeout
            try:
                sock.sendto(header + body, (target, 0))
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    data, peer = sock.recvfrom(65535)
                    kind, _, _, _, seq = struct.unpack("!BBHHH", data[:8])
                    if (kind, seq, peer[0], data[8:]) == (ICMP_ECHO_REPLY, sequence, target, body):
                        return True
            except TimeoutError:
                return False
            except OSError as exc:
                if _unreached(exc):
                    return False
                raise
            return False

    return run_in_netns(netns, probe)


def udp_request(
    netns: str | None,
    destination: str | ipaddress.IPv4Address,
    port: int,
    payload: bytes = b"netvm",
    *,
    timeout: float = 1.0,
    dont_fragment: bool = False,
) -> bytes | None:
    """Send one UDP datagram from a fresh socket inside `netns`; return the reply or None.

    Only a datagram from (`destination`, `port`) counts as the reply. With `dont_fragment`,
    a datagram larger than the path MTU is refused (None) instead of fragmented.
    """
    target = str(destination)

    def probe() -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if dont_fragment:
                _dont_fragment(sock)
            deadline = time.monotonic() + timeout
            try:
                sock.sendto(payload, (target, port))
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    data, peer = sock.recvfrom(65535)
                    if peer == (target, port):
                        return data
            except TimeoutError:
                return None
            except OSError as exc:
                if _unreached(exc):
                    return None
                raise
            return None

    return run_in_netns(netns, probe)


class UdpEchoServer(SocketWatcher):
    """A UDP echo server on a thread inside `netns` that records who sent each datagram.

    `peers` lists the (address, port) of every datagram received, in order: what a host
    "on the internet" sees of a masqueraded guest. Use it as a context manager.
    """

    def __init__(
        self, netns: str | None, address: str | ipaddress.IPv4Address = "0.0.0.0", port: int = 0
    ) -> None:
        self.netns = netns
        self.peers: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        where = (str(address), port)
        super().__init__(
            netns,
            lambda: bound_socket(socket.AF_INET, socket.SOCK_DGRAM, 0, where),
            "netvm-udp-echo",
        )
        self.address, self.port = self._sock.getsockname()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop in ready:
                return
            data, peer = self._sock.recvfrom(65535)
            with self._lock:
                self.peers.append((peer[0], peer[1]))
            with contextlib.suppress(OSError):
                self._sock.sendto(data, peer)

    def seen(self) -> list[str]:
        """The source addresses seen so far, in order."""
        with self._lock:
            return [address for address, _ in self.peers]
