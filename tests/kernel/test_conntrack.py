"""netvm/backends/conntrack.py against the kernel: the entries of one address go, the others
stay, read back from /proc/net/nf_conntrack (the kernel's own listing)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import subprocess
from pathlib import Path

import pytest

from netvm import KernelBackend
from netvm.backends.conntrack import Conntrack
from netvm.testing import run_in_netns
from tests.required import cannot_run

pytestmark = pytest.mark.privileged

A, B = "127.0.0.7", "127.0.0.8"


def _entries(netns: str) -> list[str]:
    listing = Path("/proc/net/nf_conntrack")
    if not listing.exists():
        cannot_run("conntrack test", "this kernel has no /proc/net/nf_conntrack to check against")
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "cat", str(listing)], capture_output=True, text=True
    )
    return [line for line in out.stdout.splitlines() if "udp" in line]


def _traffic(netns: str) -> None:
    """UDP from A and from B over loopback, tracked (a ct rule makes conntrack see it)."""
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    rule = (
        "add table ip t; add chain ip t out { type filter hook output priority 0; }; "
        "add rule ip t out ct state new counter"
    )
    subprocess.run(["ip", "netns", "exec", netns, "nft", rule], check=True)

    def send() -> None:
        for source in (A, B):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((source, 0))
                for port in range(40000, 40005):
                    sock.sendto(b"x", ("127.0.0.1", port))

    run_in_netns(netns, send)


@pytest.mark.parametrize("way", ["filtered-delete", "dump-then-delete", "before-6.12"])
def test_the_connections_of_one_address_go_and_the_others_stay(
    netns: str, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`before-6.12`: the kernel refuses the filtered delete as a tuple it cannot look up
    (EINVAL, as Linux 5.8 to 6.11 do): forget() deletes by the filtered dump instead."""
    if way == "before-6.12":
        monkeypatch.setattr(Conntrack, "_filtered_delete", lambda self, address: {errno.EINVAL})
    _traffic(netns)
    before = _entries(netns)
    assert sum(f"src={A} " in e for e in before) == 5, before
    assert sum(f"src={B} " in e for e in before) == 5
    if way in ("filtered-delete", "before-6.12"):
        backend = KernelBackend(netns)
        try:
            backend.forget_connections(ipaddress.IPv4Address(A))
        finally:
            backend.close()
    else:  # the way for kernels before filtered deletes (6.10)
        conntrack = run_in_netns(netns, Conntrack)
        try:
            assert conntrack._forget_one_by_one(ipaddress.IPv4Address(A)) == 5
        finally:
            conntrack.close()
    after = _entries(netns)
    assert not any(f"src={A} " in e for e in after), after
    assert sum(f"src={B} " in e for e in after) == 5


def test_a_kernel_without_ctnetlink_is_said_once_and_refuses_nothing(
    netns: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both ways refused (no ctnetlink): nothing to delete, one warning, no error."""
    monkeypatch.setattr(Conntrack, "_filtered_delete", lambda self, address: {errno.EINVAL})
    monkeypatch.setattr(Conntrack, "_forget_one_by_one", lambda self, address: None)
    backend = KernelBackend(netns)
    try:
        with caplog.at_level("WARNING", "netvm"):
            backend.forget_connections(ipaddress.IPv4Address(A))
            backend.forget_connections(ipaddress.IPv4Address(B))
    finally:
        backend.close()
    said = [r for r in caplog.records if "connection tracking cannot be asked" in r.getMessage()]
    assert len(said) == 1
