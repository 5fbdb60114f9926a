"""No netvm call creates a process: not the import of python-iptables, not a TAP, nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.privileged

CYCLE = textwrap.dedent(
    """
    import sys

    FORBIDDEN = ("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system",
                 "subprocess.Popen", "os.spawn", "pty.spawn")
    spawned = []

    def refuse(event, args):
        if event.startswith(FORBIDDEN):
            spawned.append(event)
            raise RuntimeError(f"netvm started a process: {event}")

    sys.addaudithook(refuse)

    from netvm import KernelBackend, NetworkConfig, NetworkManager

    backend = KernelBackend(sys.argv[1])
    config = NetworkConfig(bridge_name="nvbr0", vm_subnet="192.0.2.0/24",
                           host_egress_iface="up0", state_dir=sys.argv[2])
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-a")
        manager.attach("vm-b")
        manager.list()
        manager.detach("vm-a")
        manager.gc(keep=[])
        manager.teardown_host()
    backend.close()
    print("spawned:", spawned)
    """
)


def test_a_full_cycle_starts_no_process(netns: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CYCLE, netns, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "spawned: []"


def test_the_guard_catches_a_spawn(tmp_path: Path) -> None:
    """The audit hook really refuses a process (so the test above can fail)."""
    probe = CYCLE.split("from netvm")[0] + "import subprocess\nsubprocess.run(['true'])\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode != 0
    assert "netvm started a process: subprocess.Popen" in result.stderr
