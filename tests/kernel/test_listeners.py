"""The host services a port forward must not take: sock_diag and /proc say the same."""

from __future__ import annotations

import socket
import subprocess

import pytest

from netvm.firewall.listeners import SockDiag, listening
from netvm.testing import run_in_netns, throwaway_netns

pytestmark = pytest.mark.privileged

WANTED = [
    ("tcp", 2222),
    ("tcp", 2223),
    ("tcp", 2224),
    ("tcp", 2225),
    ("udp", 5353),
    ("udp", 5354),
    ("udp", 2222),
    ("tcp", 80),
]


def test_sock_diag_and_proc_find_the_same_services() -> None:
    with throwaway_netns("netvm-test-") as netns:
        # ::1 exists once lo is up.
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)

        def probe() -> tuple[list[str], list[str]]:
            socks = []
            for family, kind, address, port in (
                (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 2222),
                (socket.AF_INET6, socket.SOCK_STREAM, "::", 2223),
                (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 2224),  # loopback only
                (socket.AF_INET6, socket.SOCK_STREAM, "::1", 2225),  # loopback only
                (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", 5353),
                (socket.AF_INET6, socket.SOCK_DGRAM, "::", 5354),
                (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 2226),  # not wanted
            ):
                sock = socket.socket(family, kind)
                sock.bind((address, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen()
                socks.append(sock)
            diag = SockDiag()
            try:
                tcp_only = [w for w in WANTED if w[0] == "tcp"]
                assert diag.listening(tcp_only) == listening(tcp_only)
                assert diag._legacy, "the kernel refused the one-walk TCP dump"
                for legacy, filtered in ((False, True), (True, False), (False, False)):
                    other = SockDiag()
                    other._legacy = legacy  # False: the fallback, one dump per family
                    other._filter = filtered  # False: the fallback, every listener
                    try:
                        assert other.listening(WANTED) == listening(WANTED)
                    finally:
                        other.close()
                assert diag._filter, "the kernel refused the port filter"
                # The kernel itself leaves out the ports not asked for (the control: 2226
                # comes without the filter).
                assert {port for _, port, _ in diag._sockets("tcp", {2222})} == {2222}
                assert 2226 in {port for _, port, _ in diag._ask("tcp", b"")}
                many = WANTED + [("tcp", port) for port in range(3000, 4100)]
                assert diag.listening(many) == listening(many)  # too many to filter
                return diag.listening(WANTED), listening(WANTED)
            finally:
                diag.close()
                for sock in socks:
                    sock.close()

        from_diag, from_proc = run_in_netns(netns, probe)
    assert from_diag == ["0.0.0.0:2222/tcp", "0.0.0.0:5353/udp", "[::]:2223/tcp", "[::]:5354/udp"]
    assert from_proc == from_diag
