"""The installed `netvm` command (a subprocess) against the kernel, inside a throwaway
network namespace (`--netns`); and the privilege check as an unprivileged uid.

Every command here names the namespace the fixture created: the root namespace is
never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netvm import KernelBackend, TapOptions
from netvm.naming import tap_name

pytestmark = pytest.mark.privileged

NETVM = Path(sys.executable).with_name("netvm")
NOBODY = 65534


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Run = Callable[..., Result]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MICROVM_NETWORK_")}


@pytest.fixture
def kernel(netns: str) -> Iterator[KernelBackend]:
    backend = KernelBackend(netns)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def run(netns: str, tmp_path: Path) -> Run:
    def run(*argv: str, subnet: str = "192.0.2.0/24", command: list[str] | None = None) -> Result:
        args = [
            *(command or [str(NETVM)]),
            "--netns",
            netns,
            "--bridge",
            "nvbr0",
            "--subnet",
            subnet,
            "--egress",
            "up0",
            "--state-dir",
            str(tmp_path / "state"),
            *argv,
        ]
        done = subprocess.run(args, capture_output=True, text=True, env=clean_env(), timeout=60)
        return Result(done.returncode, done.stdout, done.stderr)

    return run


def error_line(result: Result, command: str) -> str:
    assert result.code == 1, result
    (line,) = result.err.splitlines()
    assert line.startswith(f"netvm {command}: error: ")
    return line


def test_every_command_in_a_namespace(run: Run, kernel: KernelBackend) -> None:
    bare = run("status", "--json")
    assert bare.code == 0, bare.err
    assert bare.json()["ready"] is False

    ensured = run("ensure-host", "--json")
    assert ensured.code == 0, ensured.err
    doc = ensured.json()
    assert doc["ready"] is True, doc["problems"]
    assert doc["firewall"]["missing"] == []
    assert len(doc["firewall"]["rules"]) == 5
    bridge = kernel.get_link("nvbr0")
    assert bridge is not None
    assert (bridge.kind, bridge.up, bridge.mtu) == ("bridge", True, 1500)
    assert kernel.get_ip_forward() is True
    assert run("ensure-host").code == 0, "ensure-host again changes nothing and succeeds"
    assert kernel.get_link("nvbr0") == bridge

    fc = run("attach", "vm-fc", "--for", "firecracker", "--owner", str(NOBODY), "--json")
    assert fc.code == 0, fc.err
    fc_doc = fc.json()
    assert fc_doc["vmm"]["network_interface"]["host_dev_name"] == tap_name("vm-fc")
    ch = run("attach", "vm-ch", "--for", "cloud-hypervisor", "--multi-queue", "--json")
    assert ch.code == 0, ch.err
    assert ch.json()["vmm"]["net"].endswith(",num_queues=4")
    qemu = run("attach", "vm-q", "--for", "qemu", "--group", "100", "--json")
    assert qemu.code == 0, qemu.err

    fc_tap = kernel.get_link(tap_name("vm-fc"))
    ch_tap = kernel.get_link(tap_name("vm-ch"))
    q_tap = kernel.get_link(tap_name("vm-q"))
    assert fc_tap is not None
    assert ch_tap is not None
    assert q_tap is not None
    assert fc_tap.tap == TapOptions(owner=NOBODY, multi_queue=False, vnet_hdr=True)
    assert ch_tap.tap == TapOptions(multi_queue=True, vnet_hdr=True)
    assert q_tap.tap == TapOptions(group=100, vnet_hdr=True)
    assert {fc_tap.master, ch_tap.master, q_tap.master} == {bridge.index}

    listed = run("list", "--json").json()["vms"]
    assert sorted(vm["vm_id"] for vm in listed) == ["vm-ch", "vm-fc", "vm-q"]
    assert all(vm["tap_present"] and vm["on_bridge"] for vm in listed)
    status = run("status", "--json").json()
    assert status["vms"] == {"attached": 3, "leased": 3}

    assert run("detach", "vm-q").code == 0
    assert kernel.get_link(tap_name("vm-q")) is None
    gc = run("gc", "--keep", "vm-fc", "--json")
    assert gc.code == 0, gc.err
    assert gc.json()["removed"] == ["vm-ch"]
    assert kernel.get_link(tap_name("vm-ch")) is None
    assert kernel.get_link(tap_name("vm-fc")) is not None

    down = run("teardown", "--json")
    assert down.code == 0, down.err
    assert [link.name for link in kernel.list_links()] == ["lo"]
    assert kernel.get_ip_forward() is False
    after = run("status", "--json").json()
    assert after["bridge"]["present"] is False
    assert after["firewall"]["rules"] == []


def test_python_dash_m_netvm(run: Run) -> None:
    result = run("status", "--json", command=[sys.executable, "-m", "netvm"])
    assert result.code == 0, result.err
    assert result.json()["bridge"]["name"] == "nvbr0"


def test_reattach_with_other_flags_is_refused(run: Run, kernel: KernelBackend) -> None:
    assert run("ensure-host").code == 0
    assert run("attach", "vm-a", "--multi-queue").code == 0
    line = error_line(run("attach", "vm-a", "--owner", "1000"), "attach")
    assert "exists with other flags" in line
    link = kernel.get_link(tap_name("vm-a"))
    assert link is not None
    assert link.tap == TapOptions(multi_queue=True)


def test_device_conflict(run: Run, kernel: KernelBackend) -> None:
    kernel.create_tap("nvbr0", TapOptions())
    line = error_line(run("ensure-host"), "ensure-host")
    assert "nvbr0 already exists but is not a bridge (kind tun)" in line
    assert kernel.get_link("nvbr0") is not None, "the foreign device is left alone"


def test_exhausted_slash_30(run: Run, kernel: KernelBackend) -> None:
    assert run("ensure-host", subnet="192.0.2.0/30").code == 0
    assert run("attach", "vm-a", subnet="192.0.2.0/30").code == 0
    line = error_line(run("attach", "vm-b", subnet="192.0.2.0/30"), "attach")
    assert "subnet 192.0.2.0/30 is exhausted" in line
    assert kernel.get_link(tap_name("vm-b")) is None


def test_a_missing_namespace_says_what_to_do(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(NETVM), "--netns", "netvm-test-absent", "--state-dir", str(tmp_path), "status"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert "open network namespace on /run/netns/netvm-test-absent failed" in line
    assert "create it first" in line


# Drops capabilities from the bounding set, then execs: root keeps its uid (the
# interpreter under /root stays readable) but the exec'd command has none of them.
# (Switching to uid 65534 instead cannot work here: the venv's interpreter lives under
# /root, mode 0700.)
DROP_CAPS = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for cap in map(int, sys.argv[1].split(',')):\n"
    "    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP\n"
    "        sys.exit(f'PR_CAPBSET_DROP {cap}: errno {ctypes.get_errno()}')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def without_caps(caps: list[int], argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", DROP_CAPS, ",".join(map(str, caps)), *argv],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )


def test_the_capability_drop_works() -> None:
    probe = "print(next(l for l in open('/proc/self/status') if l.startswith('CapEff')))"
    done = without_caps([CAP_NET_ADMIN, CAP_SYS_ADMIN], [sys.executable, "-c", probe])
    assert done.returncode == 0, done.stderr
    effective = int(done.stdout.split()[1], 16)
    assert effective, "other capabilities remain"
    assert not effective >> CAP_NET_ADMIN & 1
    assert not effective >> CAP_SYS_ADMIN & 1


@pytest.mark.parametrize(
    ("caps", "where", "hint"),
    [
        # Without CAP_NET_ADMIN: the namespace is entered, the kernel refuses the change.
        (
            [CAP_NET_ADMIN],
            "nvbr0 failed: Operation not permitted (EPERM)",
            "needs CAP_NET_ADMIN: run as root or grant the capability",
        ),
        # Without CAP_SYS_ADMIN too: entering the namespace is refused (setns checks it).
        (
            [CAP_NET_ADMIN, CAP_SYS_ADMIN],
            "enter network namespace on /run/netns/",
            "entering a network namespace needs CAP_SYS_ADMIN",
        ),
    ],
)
def test_missing_privilege_is_one_line(
    netns: str, tmp_path: Path, kernel: KernelBackend, caps: list[int], where: str, hint: str
) -> None:
    for command in (["ensure-host"], ["attach", "vm-a"]):
        done = without_caps(
            caps,
            [
                str(NETVM),
                "--netns",
                netns,
                "--bridge",
                "nvbr0",
                "--state-dir",
                str(tmp_path / "state"),
                *command,
            ],
        )
        assert done.returncode == 1, done
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"netvm {command[0]}: error: ")
        assert "(EPERM)" in line
        assert hint in line
        if command == ["ensure-host"]:
            assert where in line
    assert [link.name for link in kernel.list_links()] == ["lo"]
