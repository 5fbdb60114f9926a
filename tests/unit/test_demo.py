"""The demo's in-memory path: the same flow, no root needed, and it says no packets moved."""

from __future__ import annotations

import io

import pytest

from netvm import demo


def test_demo_on_the_fake_backend_says_no_packets_moved() -> None:
    out = io.StringIO()
    assert demo.run_demo(out, force_fake=True) == 0
    text = out.getvalue()
    assert "FakeBackend" in text
    assert "NO PACKETS MOVED" in text
    assert "Nothing left behind." in text
    rows = [line for line in text.splitlines() if line.startswith("vm-")]
    assert [row.split()[0] for row in rows] == list(demo.VM_IDS)
    for row in rows:
        assert "ip=172.30.0." in row
        assert row.split()[-3:] == ["-", "-", "-"]


def test_demo_falls_back_to_the_fake_without_net_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "kernel_unavailable", lambda: "no CAP_NET_ADMIN (not root)")
    out = io.StringIO()
    assert demo.run_demo(out) == 0
    assert "FakeBackend, the in-memory model (no CAP_NET_ADMIN (not root))" in out.getvalue()
    assert "NO PACKETS MOVED" in out.getvalue()
