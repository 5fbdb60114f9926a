"""A full, then read-only state_dir: attach fails with StateStoreError and never leaves a TAP
without a lease; gc and teardown go on from the kernel alone.

The state_dir is a 256 KiB tmpfs mounted in a private mount namespace of a child process
(`unshare --mount`), so nothing is mounted where the test process or anyone else can see it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.privileged

CHILD = Path(__file__).with_name("full_state_dir_child.py")


def test_a_full_then_read_only_state_dir(netns: str, tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux's unshare is needed"
    done = subprocess.run(
        [
            unshare,
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            str(CHILD),
            netns,
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    outcomes = report["outcomes"]
    assert "refused" in outcomes, "the tmpfs never filled up: the test proves nothing"
    assert report["mismatches"] == []  # after every attempt: TAPs == leases
    assert "full" in report["error"]
    assert "MICROVM_NETWORK_STATE_DIR" in report["error"]
    taps, leases = report["after"]
    assert taps == leases
    assert "Read-only file system" in report["read_only_attach"]
    assert report["read_only_tap"] is False
    assert report["gc"] == sorted(
        f"vm-{i}" for i, outcome in enumerate(outcomes) if outcome == "attached"
    )
    assert report["teardown"] == "done"
    assert report["left"] == ["lo"]


STORE_CHILD = Path(__file__).with_name("full_store_child.py")


@pytest.mark.parametrize("control", [False, True], ids=["full", "control-taken-for-damage"])
def test_a_full_state_dir_is_not_taken_for_a_damaged_store(tmp_path: Path, control: bool) -> None:
    """SQLite reports a -shm it cannot grow as an I/O error: on a full disk that is no reason
    to set a healthy store aside (the leases of stopped VMs, which no TAP records, would be
    lost). The control takes it for damage, as netvm did: the store is set aside."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux's unshare is needed"
    command = [unshare, "--mount", "--propagation", "private", sys.executable, str(STORE_CHILD)]
    command.append(str(tmp_path / "state"))
    if control:
        command.append("--control")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    kept = report["leases"] == ["vm-0", "vm-1", "vm-2", "vm-3", "vm-new"]
    damaged = any(name.endswith(".damaged") for name in report["files"])
    assert kept is not control, report
    assert damaged is control, report
    if not control:
        assert report["attach"].startswith("StateStoreError"), report
        assert "free space" in report["attach"], report
        assert report["unchanged"], report
