"""SIGKILL at every step of every operation, then the ordinary calls mend the host.

A forked child runs one operation against the kernel in a throwaway namespace and kills
itself (SIGKILL) at its k-th step: before and after every netlink request, TUN ioctl,
ip_forward write, firewall change, intent write and lease commit. k = 1, 2, ... until the
operation completes, so every step is cut once. After each kill the parent runs what an
agent that restarts would run (ensure_host, attach of the VMs that should live,
gc(keep=live)) and checks the namespace with iproute2 and nft: the live VMs are attached,
keep their addresses, hold one lease each, nothing else of netvm's is left, and the foreign
devices are untouched. teardown_host must then leave nothing at all. Random-time kills
of a child that attaches and detaches in a loop follow.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager, TapOptions
from netvm.backends import kernel, rtnl, tun
from netvm.config import FirewallChoice
from netvm.errors import HostError
from netvm.leases import LeaseTransaction
from netvm.naming import guest_ip, store_id
from netvm.policy import GuestPolicy
from netvm.statefile import InFlight, StateFile

pytestmark = pytest.mark.privileged

Operation = Callable[[NetworkManager], object]


# The child: kill at the k-th step -------------------------------------------------------


class _Steps:
    """Counts steps; the k-th one SIGKILLs the process."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _instrument(steps: _Steps) -> None:
    """Wrap every call that changes the kernel or netvm's records with a step before and
    after it (the child is a fork: this changes nothing in the test process)."""

    def around(owner: Any, name: str) -> None:
        inner = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            steps.tick()
            result = inner(*args, **kwargs)
            steps.tick()
            return result

        setattr(owner, name, wrapped)

    for owner, name in (
        (rtnl.Rtnl, "request"),
        (rtnl.Rtnl, "set_groups"),
        (rtnl.Rtnl, "set_links"),
        (rtnl.Rtnl, "change_links"),
        (kernel.KernelBackend, "set_ip_forward"),
        (kernel.KernelBackend, "create_chain"),
        (kernel.KernelBackend, "delete_chain"),
        (kernel.KernelBackend, "insert_rule"),
        (kernel.KernelBackend, "delete_rule"),
        (StateFile, "write_intent"),
        (StateFile, "clear_intent"),
        # An attach in flight (its kernel work after the lock): its slot, intent and end.
        (StateFile, "begin_inflight"),
        (StateFile, "forget_orphan"),
        (InFlight, "update"),
        (InFlight, "finish"),
        (InFlight, "abandon"),
        (LeaseTransaction, "commit"),
    ):
        around(owner, name)

    class Ioctls:
        """tun.py's view of fcntl: each ioctl (TUNSETIFF, TUNSETPERSIST...) is a step."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real_fcntl, name)

        def ioctl(self, *args: Any) -> Any:
            steps.tick()
            result = real_fcntl.ioctl(*args)
            steps.tick()
            return result

    namespace = vars(tun)
    real_fcntl = namespace["fcntl"]
    namespace["fcntl"] = Ioctls()
    from netvm.firewall import elements, nftables

    for name in ("ensure", "remove"):
        around(nftables.NftablesFirewall, name)
    around(elements.NetlinkElements, "commit")  # each VM's guarantees: one transaction


def _child(netns: str, config: NetworkConfig, operation: Operation, kill_at: int) -> None:
    _instrument(_Steps(kill_at))
    with managed(netns, config) as manager:
        operation(manager)
    os._exit(0)


def run_killed(netns: str, config: NetworkConfig, operation: Operation, kill_at: int) -> bool:
    """Run `operation` in a child killed at step `kill_at`; False if it completed first."""
    child = multiprocessing.get_context("fork").Process(
        target=_child, args=(netns, config, operation, kill_at)
    )
    child.start()
    child.join(30)
    assert child.exitcode in (0, -signal.SIGKILL), f"step {kill_at}: exit {child.exitcode}"
    return child.exitcode == -signal.SIGKILL


@contextmanager
def managed(netns: str, config: NetworkConfig) -> Iterator[NetworkManager]:
    """A manager on its own KernelBackend, both closed afterwards."""
    backend = KernelBackend(netns)
    try:
        with NetworkManager(config, backend) as manager:
            yield manager
    finally:
        backend.close()


# The namespace as iproute2 and nft show it ----------------------------------------------


def _run(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True
    ).stdout


def links(netns: str) -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in json.loads(_run(netns, "ip", "-d", "-j", "link"))}


def netvm_in_nft(netns: str) -> list[str]:
    ruleset = json.loads(_run(netns, "nft", "-j", "list", "ruleset"))["nftables"]
    return [item["table"]["name"] for item in ruleset if "table" in item and "netvm" in str(item)]


def netvm_in_legacy(netns: str) -> list[str]:
    saved = _run(netns, "iptables-legacy-save")
    return [line for line in saved.splitlines() if "NETVM" in line or "netvm" in line]


FOREIGN = {"foreign0": "veth", "foreign1": "veth", "tap-foreign": "tun"}


def add_foreign(netns: str) -> None:
    """A veth pair, an unmarked TAP and an nftables table that are not netvm's."""
    _run(netns, "ip", "link", "add", "foreign0", "type", "veth", "peer", "name", "foreign1")
    _run(netns, "ip", "tuntap", "add", "dev", "tap-foreign", "mode", "tap")
    _run(netns, "nft", "add table inet foreign; add chain inet foreign input")


def foreign_nft(netns: str) -> str:
    return _run(netns, "nft", "list", "table", "inet", "foreign")


def check_recovered(
    netns: str, manager: NetworkManager, live: dict[str, str | None], where: str
) -> None:
    """The live VMs attached with one lease each (their old address if they had one),
    and nothing else of netvm's in the namespace."""
    found = links(netns)
    for name, kind in FOREIGN.items():
        assert found[name]["linkinfo"]["info_kind"] == kind, f"{where}: {name} was touched"
        assert "ifalias" not in found[name] or not found[name]["ifalias"], where
    taps = {
        name: link
        for name, link in found.items()
        if name.startswith("tap-") and name != "tap-foreign"
    }
    leases = {lease.vm_id: lease for lease in manager.leases.all()}
    assert set(leases) == set(live), f"{where}: leases {sorted(leases)} != live {sorted(live)}"
    assert {lease.tap_name for lease in leases.values()} == set(taps), f"{where}: TAPs {taps}"
    assert len({lease.slot for lease in leases.values()}) == len(leases), f"{where}: duplicate"
    for vm_id, lease in leases.items():
        tap = taps[lease.tap_name]
        assert tap.get("master") == manager.config.bridge_name, f"{where}: {vm_id} off bridge"
        assert "UP" in tap["flags"], f"{where}: {vm_id} down"
        assert tap["ifalias"] == f"netvm:{manager.config.bridge_name}:{lease.slot}:{vm_id}"
        ip = str(guest_ip(manager.config.vm_subnet, lease.slot))
        if live[vm_id] is not None:
            assert ip == live[vm_id], f"{where}: {vm_id} moved from {live[vm_id]} to {ip}"
    guards = manager.backend.firewall("nftables").guards(manager.config.bridge_name)
    assert set(guards) == set(taps), f"{where}: guarantees of {sorted(guards)}, TAPs {taps}"
    for lease in leases.values():
        address = guest_ip(manager.config.vm_subnet, lease.slot)
        held = guards[lease.tap_name].ip
        assert held == address, f"{where}: {lease.vm_id}'s elements name {held}"
        assert guards[lease.tap_name].policy == GuestPolicy(), f"{where}: stale policy"
        port = taps[lease.tap_name]["linkinfo"].get("info_slave_data", {})
        assert port.get("isolated") is False, f"{where}: {lease.vm_id}'s port still isolated"
    expected = {"lo", *FOREIGN, manager.config.bridge_name, *taps}
    assert set(found) == expected, f"{where}: left {sorted(set(found) - expected)}"
    bridge = found[manager.config.bridge_name]
    store = store_id(manager.config.state_dir)
    assert bridge["ifalias"] == f"netvm-bridge:{manager.config.vm_subnet}:{store}", where
    bridges = [
        n for n, link in found.items() if link.get("linkinfo", {}).get("info_kind") == "bridge"
    ]
    assert bridges == [manager.config.bridge_name], f"{where}: bridges {bridges}"


def check_clean(netns: str, manager: NetworkManager, where: str) -> None:
    """Nothing of netvm's left after teardown_host; the foreign devices still there."""
    found = links(netns)
    assert set(found) == {"lo", *FOREIGN}, f"{where}: left {sorted(found)}"
    assert netvm_in_nft(netns) == [], where
    assert "chain input" in foreign_nft(netns), f"{where}: the foreign nftables table changed"
    assert netvm_in_legacy(netns) == [], where
    assert _run(netns, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "0", where
    assert manager.leases.all() == [], where
    for lock in manager.config.state_dir.glob("*.lock"):
        probe = StateFile(lock)
        probe.acquire()
        try:
            assert probe.read_intent() is None, f"{where}: intent left in {lock.name}"
        finally:
            probe.close()


# The scenarios ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    """Set-up (in the test process), the operation to kill, and the VMs that should live
    afterwards (the operation's VM included when the agent attaches it again)."""

    before: tuple[str, ...]
    operation: Operation
    live: tuple[str, ...]
    host: bool = True


OWNED = TapOptions(owner=0)
"""Every TAP of these scenarios: TUNSETOWNER is one more step to cut."""
EVERY = GuestPolicy.of(
    isolated=True, egress_deny=["198.51.100.0/24"], port_forwards=["8080:80", "5353:53/udp"]
)
"""Every guarantee: the elements, an egress chain, the kernel's port isolation. The agent
attaches its VMs again with the default policy, given (without one, a VM attached already
keeps its own): the elements must then be replaced."""


def _attach_failing(manager: NetworkManager) -> None:
    """attach("vm-b") whose enslave the kernel refuses (EXFULL, as a full bridge would)."""
    real = rtnl.Rtnl.set_link

    def refuse(self: rtnl.Rtnl, name: str, **changes: Any) -> None:
        if changes.get("master") is not None:
            raise rtnl.RtnlError(errno.EXFULL, "injected")
        real(self, name, **changes)

    rtnl.Rtnl.set_link = refuse  # type: ignore[method-assign]
    try:
        with pytest.raises(HostError):
            manager.attach("vm-b", OWNED)
    finally:
        rtnl.Rtnl.set_link = real  # type: ignore[method-assign]


def _detach_attach(manager: NetworkManager) -> None:
    """A VM restarted: its attach right after its detach, while the old TAP awaits deletion."""
    manager.detach("vm-a")
    manager.attach("vm-a", OWNED)


SCENARIOS = {
    "ensure_host": Scenario((), lambda m: m.ensure_host(), (), host=False),
    "attach": Scenario(("vm-a",), lambda m: m.attach("vm-b", OWNED), ("vm-a", "vm-b")),
    "attach-abandoned": Scenario(("vm-a",), lambda m: m.attach("vm-b", OWNED), ("vm-a",)),
    "attach-guarded": Scenario(
        ("vm-a",), lambda m: m.attach("vm-b", OWNED, EVERY), ("vm-a", "vm-b")
    ),
    "attach-guarded-abandoned": Scenario(
        ("vm-a",), lambda m: m.attach("vm-b", OWNED, EVERY), ("vm-a",)
    ),
    # Attached already: checked and mended inside the transaction, not in flight.
    "attach-again": Scenario(("vm-a",), lambda m: m.attach("vm-a", OWNED), ("vm-a",)),
    # In flight, the enslave fails (a full bridge, say): the failed attach is mended by
    # the transaction that follows, as a killed one is.
    "attach-failing": Scenario(("vm-a",), _attach_failing, ("vm-a",)),
    "attach-many": Scenario(
        ("vm-a",),
        lambda m: m.attach_many(["vm-b", "vm-a", "vm-c"], OWNED),
        ("vm-a", "vm-b", "vm-c"),
    ),
    "attach-many-abandoned": Scenario(
        ("vm-a",), lambda m: m.attach_many(["vm-b", "vm-a", "vm-c"], OWNED), ("vm-a",)
    ),
    "detach": Scenario(("vm-a", "vm-b"), lambda m: m.detach("vm-a"), ("vm-b",)),
    "detach_many": Scenario(
        ("vm-a", "vm-b", "vm-c"), lambda m: m.detach_many(["vm-a", "vm-c"]), ("vm-b",)
    ),
    "detach-attach": Scenario(("vm-a", "vm-b"), lambda m: _detach_attach(m), ("vm-a", "vm-b")),
    "gc": Scenario(("vm-a", "vm-b", "vm-c"), lambda m: m.gc(keep=["vm-b"]), ("vm-b",)),
    "teardown": Scenario(("vm-a",), lambda m: m.teardown_host(), ()),
}


def crash_config(state_dir: Path, firewall: FirewallChoice = "nftables") -> NetworkConfig:
    return NetworkConfig(
        bridge_name="nvcrash0",
        vm_subnet="192.0.2.0/24",
        host_egress_iface="up0",
        mtu=1500,
        state_dir=state_dir,
        firewall=firewall,
    )


def recover_and_check(
    netns: str, config: NetworkConfig, live: dict[str, str | None], where: str
) -> None:
    """What a restarted agent runs, the checks, then teardown_host and its checks."""
    with managed(netns, config) as manager:
        manager.ensure_host()
        for vm_id in live:
            manager.attach(vm_id, OWNED, GuestPolicy())
        manager.gc(keep=list(live))
        check_recovered(netns, manager, live, where)
        manager.teardown_host()
        check_clean(netns, manager, where)


def walk(netns: str, config: NetworkConfig, name: str, scenario: Scenario) -> int:
    """Kill the operation at step 1, 2, ... until it completes; return its step count."""
    for kill_at in range(1, 500):
        with managed(netns, config) as manager:
            if scenario.host:
                manager.ensure_host()
            before = {
                vm_id: str(manager.attach(vm_id, OWNED).guest_ip) for vm_id in scenario.before
            }
        killed = run_killed(netns, config, scenario.operation, kill_at)
        where = f"{name} killed at step {kill_at}" if killed else f"{name} completed"
        recover_and_check(netns, config, {v: before.get(v) for v in scenario.live}, where)
        if not killed:
            return kill_at - 1
    pytest.fail(f"{name} never completed")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_kill_at_any_step_is_mended_by_the_next_calls(
    netns: str, tmp_path: Path, name: str
) -> None:
    add_foreign(netns)
    steps = walk(netns, crash_config(tmp_path / "state"), name, SCENARIOS[name])
    # Proof that the kills landed inside the operation, not only around it.
    least = {
        "ensure_host": 12,
        "teardown": 8,
        "gc": 4,
        "detach": 6,
        "detach_many": 6,
        "attach-again": 4,
    }
    assert steps >= least.get(name, 10)


@pytest.mark.parametrize("name", ["ensure_host", "teardown"])
def test_a_kill_at_any_step_of_the_iptables_firewall_is_mended(
    netns: str, tmp_path: Path, name: str
) -> None:
    add_foreign(netns)
    config = crash_config(tmp_path / "state", firewall="iptables")
    assert walk(netns, config, name, SCENARIOS[name]) >= 20


def _churn(netns: str, config: NetworkConfig, seed: int) -> None:
    chance = random.Random(seed)
    with managed(netns, config) as manager:
        while True:
            vm_id = f"vm-{chance.randrange(4)}"
            if chance.random() < 0.6:
                manager.attach(vm_id, OWNED, GuestPolicy())
            else:
                manager.detach(vm_id)
            if chance.random() < 0.1:
                manager.gc(keep=[f"vm-{i}" for i in range(4)] + ["vm-keep"])


def test_kills_at_random_moments_are_mended(netns: str, tmp_path: Path) -> None:
    add_foreign(netns)
    config = crash_config(tmp_path / "state")
    chance = random.Random(9)
    for run in range(10):
        with managed(netns, config) as manager:
            manager.ensure_host()
            kept = str(manager.attach("vm-keep", OWNED).guest_ip)
        child = multiprocessing.get_context("fork").Process(
            target=_churn, args=(netns, config, run)
        )
        child.start()
        time.sleep(chance.uniform(0.005, 0.08))
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL, f"run {run}: the churn stopped by itself"
        live: dict[str, str | None] = {f"vm-{i}": None for i in range(4)}
        live["vm-keep"] = kept
        recover_and_check(netns, config, live, f"random kill, run {run}")
