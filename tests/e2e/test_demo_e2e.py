"""The demo on the real kernel: every guest reaches its gateway and the internet, masqueraded."""

from __future__ import annotations

import io

import pytest

from netvm import demo

pytestmark = pytest.mark.privileged


def test_demo_moves_real_packets_and_leaves_nothing() -> None:
    out = io.StringIO()
    assert demo.run_demo(out) == 0, out.getvalue()
    text = out.getvalue()
    assert "backend: the kernel" in text
    assert "NO PACKETS MOVED" not in text
    rows = [line.split() for line in text.splitlines() if line.startswith("vm-")]
    assert len(rows) == len(demo.VM_IDS)
    for row in rows:
        assert row[-3:] == ["yes", "yes", "203.0.113.2"]
    assert "Nothing left behind." in text
