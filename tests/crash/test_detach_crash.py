"""The deferred detach (netvm/reaper.py) under kills, exits without close() and fork().

A detach leaves its TAP down, off the bridge, renamed and marked, for the reaper's thread
to delete moments later. Whatever ends the process in between, the next ensure_host alone
(no gc) must finish the job, and a process that exits without close() must not leave its
detached TAPs behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netvm import FakeBackend, NetworkManager
from netvm.naming import detaching_alias, detaching_vm_id, tap_alias, tap_name

from .test_crash import OWNED, crash_config, links, managed, run_killed

pytestmark = pytest.mark.privileged


def _detach_leftovers(netns: str, bridge: str) -> list[str]:
    """Devices a detach left: renamed ones, and any with a detaching mark."""
    return sorted(
        name
        for name, link in links(netns).items()
        if name.startswith("nvdel") or detaching_vm_id(link.get("ifalias"), bridge) is not None
    )


@pytest.mark.parametrize("many", [False, True], ids=["detach", "detach_many"])
def test_a_detach_killed_at_any_step_is_finished_by_the_next_ensure_host(
    netns: str, tmp_path: Path, many: bool
) -> None:
    config = crash_config(tmp_path / "state")
    bridge = config.bridge_name

    def operation(manager: NetworkManager) -> None:
        if many:
            manager.detach_many(["vm-a", "vm-c"])
        else:
            manager.detach("vm-a")

    outcomes: set[str] = set()
    for kill_at in range(1, 200):
        with managed(netns, config) as manager:
            manager.ensure_host()
            for vm_id in ("vm-a", "vm-b", "vm-c"):
                manager.attach(vm_id, OWNED)
        killed = run_killed(netns, config, operation, kill_at)
        where = f"killed at step {kill_at}" if killed else "completed"
        if killed and _detach_leftovers(netns, bridge):
            outcomes.add("left marked TAPs")
        with managed(netns, config) as manager:
            manager.ensure_host()  # no gc: the sweep on the reaper's thread finishes it
            assert manager.wait_detached(), where
            assert _detach_leftovers(netns, bridge) == [], where
            found = links(netns)
            for lease in manager.leases.all():  # a lease only with its TAP, on the bridge
                tap = found.get(lease.tap_name)
                assert tap is not None, f"{where}: lease of {lease.vm_id} without its TAP"
                assert tap.get("master") == bridge, where
                assert "UP" in tap["flags"], where
                assert tap["ifalias"] == tap_alias(bridge, lease.vm_id, lease.slot), where
            leased = {lease.tap_name for lease in manager.leases.all()}
            taps = {name for name in found if name.startswith("tap-")}
            assert taps == leased, f"{where}: TAPs {sorted(taps)} against leases {sorted(leased)}"
            assert tap_name("vm-b") in taps, where
            manager.teardown_host()
            assert set(links(netns)) == {"lo"}, where
        if not killed:
            break
    else:
        pytest.fail("the detach never completed")
    # Proof that some kills landed between the detach and the reaper's deletion.
    assert outcomes == {"left marked TAPs"}


CHILD = """
import sys
from pathlib import Path
from netvm import KernelBackend, NetworkConfig, NetworkManager
config = NetworkConfig(
    bridge_name="nvcrash0", vm_subnet="192.0.2.0/24", host_egress_iface="up0",
    state_dir=Path(sys.argv[2]),
)
manager = NetworkManager(config, KernelBackend(sys.argv[1]))
manager.ensure_host()
manager.detach_many([f"vm-{i}" for i in range(5)])
print(manager._reaper.pending(), flush=True)
# No close(): the interpreter exits, running its atexit hooks.
"""


def test_a_process_that_exits_without_close_deletes_its_detached_taps(
    netns: str, tmp_path: Path
) -> None:
    config = crash_config(tmp_path / "state")
    with managed(netns, config) as manager:
        manager.ensure_host()
        for i in range(5):
            manager.attach(f"vm-{i}", OWNED)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), netns, str(config.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert int(done.stdout) == 5, "the detached TAPs were deleted before exit: no proof"
    assert _detach_leftovers(netns, config.bridge_name) == []
    assert {name for name in links(netns) if name.startswith("tap-")} == set()
    with managed(netns, config) as manager:
        manager.teardown_host()


FORKER = """
import os, sys, time
from pathlib import Path
from netvm import KernelBackend, NetworkConfig, NetworkManager
config = NetworkConfig(
    bridge_name="nvcrash0", vm_subnet="192.0.2.0/24", host_egress_iface="up0",
    state_dir=Path(sys.argv[2]),
)
manager = NetworkManager(config, KernelBackend(sys.argv[1]))
manager.ensure_host()
manager.detach_many([f"vm-{i}" for i in range(30)])
pending = manager._reaper.pending()
start = time.monotonic()
pid = os.fork()
if pid == 0:
    sys.exit(0)  # an ordinary exit: the child runs the exit hooks it inherited
os.waitpid(pid, 0)
print(pending, time.monotonic() - start, manager.wait_detached(), flush=True)
"""


def test_a_forked_child_neither_hangs_nor_deletes_the_parents_taps(
    netns: str, tmp_path: Path
) -> None:
    """A program forks while its reaper has work, and the child exits as programs do: its
    exit hooks return at once (the parent's pending deletions are not the child's to wait
    for), and the parent's thread still deletes them. In a program of its own: a child
    forked from pytest runs pytest's and every loaded library's exit hooks too, which
    took over a second once under the full suite's load."""
    config = crash_config(tmp_path / "state")
    with managed(netns, config) as manager:
        manager.ensure_host()
        for i in range(30):
            manager.attach(f"vm-{i}", OWNED)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FORKER), netns, str(config.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pending, child_seconds, deleted = done.stdout.split()
    assert int(pending) > 0, "the reaper had no work when the program forked: no proof"
    assert float(child_seconds) < 2.5, done.stderr
    assert deleted == "True"
    assert _detach_leftovers(netns, config.bridge_name) == []
    with managed(netns, config) as manager:
        assert manager.leases.all() == []


def test_a_forked_child_runs_its_own_reaper(tmp_path: Path) -> None:
    """The child makes its own manager (a SQLite connection must not cross a fork), while
    the parent's reaper may be mid-way (its locks are reset in the child)."""
    config = crash_config(tmp_path / "state")
    fake = FakeBackend()
    with NetworkManager(config, fake) as manager:
        manager.ensure_host()
        for vm_id in ("vm-p", "vm-c"):
            manager.attach(vm_id)
        manager.detach("vm-p")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with NetworkManager(config, FakeBackend(fake.state)) as child:
                    child.detach("vm-c")
                    ok = child.wait_detached(10)
                    marks = {link.alias for link in child.backend.list_links()}
                code = 0 if ok and detaching_alias(config.bridge_name, "vm-c") not in marks else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert manager.wait_detached()
        assert not any(link.name.startswith("nvdel") for link in manager.backend.list_links())


def test_a_killed_reaper_leaves_nothing_a_sweep_cannot_mend(netns: str, tmp_path: Path) -> None:
    """SIGKILL while the reaper's group deletion is in flight or about to be."""
    config = crash_config(tmp_path / "state")
    with managed(netns, config) as manager:
        manager.ensure_host()
        for i in range(20):
            manager.attach(f"vm-{i}", OWNED)
    script = textwrap.dedent(CHILD.replace("range(5)", "range(20)"))
    with subprocess.Popen(
        [sys.executable, "-c", script, netns, str(config.state_dir)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        child.stdout.readline()  # the detach returned; the reaper has the TAPs
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    with managed(netns, config) as manager:
        manager.ensure_host()
        assert manager.wait_detached()
        assert _detach_leftovers(netns, config.bridge_name) == []
        assert manager.leases.all() == []
        manager.teardown_host()
