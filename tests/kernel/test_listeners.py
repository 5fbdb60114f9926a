"""The host services a port forward must not take: sock_diag and /proc say the same."""

from __future__ import annotations

import socket

import pytest

from netvm.firewall.listeners import SockDiag, listening
from netvm.testing import run_in_netns, throwaway_netns

pytestmark = pytest.mark.privileged

WANTED = [("tcp", 2222), ("tcp", 2223), ("tcp", 2224), ("udp", 5353), ("udp", 2222), ("tcp", 80)]


def test_sock_diag_and_proc_find_the_same_services() -> None:
    with throwaway_netns("netvm-test-") as netns:

        def probe() -> tuple[list[str], list[str]]:
            socks = []
            for family, kind, address, port in (
                (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", 2222),
                (socket.AF_INET6, socket.SOCK_STREAM, "::", 2223),
                (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 2224),  # loopback only
                (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0", 5353),
            ):
                sock = socket.socket(family, kind)
                sock.bind((address, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen()
                socks.append(sock)
            diag = SockDiag()
            try:
                return diag.listening(WANTED), listening(WANTED)
            finally:
                diag.close()
                for sock in socks:
                    sock.close()

        from_diag, from_proc = run_in_netns(netns, probe)
    assert from_diag == ["0.0.0.0:2222/tcp", "0.0.0.0:5353/udp", "[::]:2223/tcp"]
    assert from_proc == from_diag
