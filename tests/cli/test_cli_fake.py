"""The `netvm` command in-process (`main([...])`) on the in-memory FakeBackend.

One FakeState per test stands for the kernel across the several commands a test runs;
the lease store lives in tmp_path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netvm import FakeBackend, FakeState, TapOptions
from netvm.backends.base import Backend
from netvm.cli import main
from netvm.naming import tap_name


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Run = Callable[..., Result]


@pytest.fixture
def state() -> FakeState:
    return FakeState()


@pytest.fixture
def netns_seen() -> list[str | None]:
    return []


@pytest.fixture
def run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    state: FakeState,
    netns_seen: list[str | None],
) -> Run:
    def factory(netns: str | None) -> Backend:
        netns_seen.append(netns)
        return FakeBackend(state)

    def run(*argv: str, env: dict[str, str] | None = None, defaults: bool = True) -> Result:
        base = ["--state-dir", str(tmp_path / "state")]
        if defaults:
            base += ["--bridge", "nvbr0", "--subnet", "192.0.2.0/24", "--egress", "up0"]
        code = main([*base, *argv], backend_factory=factory, environ=env or {})
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def one_error_line(result: Result, command: str) -> str:
    assert result.code == 1, result
    lines = result.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"netvm {command}: error: ")
    assert "Traceback" not in result.err
    return lines[0]


# Commands ---------------------------------------------------------------------------


def test_status_of_a_bare_host_then_ensure_host(run: Run, state: FakeState) -> None:
    before = run("status", "--json")
    assert before.code == 0, before.err
    doc = before.json()
    assert doc["version"] == 1
    assert doc["ready"] is False
    assert doc["bridge"]["present"] is False
    assert "bridge nvbr0 is missing" in doc["problems"]

    after = run("ensure-host", "--json")
    assert after.code == 0, after.err
    doc = after.json()
    assert doc["ready"] is True
    assert doc["bridge"] == {
        "name": "nvbr0",
        "present": True,
        "kind": "bridge",
        "created_by_netvm": True,
        "mtu": 1500,
        "expected_mtu": 1500,
        "up": True,
    }
    assert doc["ip_forward"] is True
    assert doc["firewall"]["kind"] == "nftables"
    assert len(doc["firewall"]["rules"]) == 5
    assert doc["firewall"]["missing"] == []
    assert doc["vms"] == {"attached": 0, "leased": 0}
    assert state.links["nvbr0"].kind == "bridge"

    text = run("status")
    assert text.code == 0
    assert "nvbr0: netvm bridge, mtu 1500 (want 1500), up" in text.out
    assert text.out.rstrip().endswith("ready       yes")


def test_attach_list_detach(run: Run, state: FakeState) -> None:
    assert run("ensure-host").code == 0
    attached = run("attach", "vm-a", "--json")
    assert attached.code == 0, attached.err
    doc = attached.json()
    vm = doc["vm"]
    assert vm["vm_id"] == "vm-a"
    assert vm["tap_name"] == tap_name("vm-a")
    assert vm["gateway_ip"] == "192.0.2.1"
    assert vm["netmask"] == "255.255.255.0"
    assert vm["prefixlen"] == 24
    assert vm["kernel_ip_arg"] == f"ip={vm['guest_ip']}::192.0.2.1:255.255.255.0::eth0:off"
    assert doc["tap"] == {"owner": None, "group": None, "multi_queue": False, "vnet_hdr": False}
    assert doc["vmm"] is None
    link = state.links[vm["tap_name"]]
    assert link.master == state.links["nvbr0"].index
    assert link.up

    again = run("attach", "vm-a", "--json")
    assert again.code == 0
    assert again.json()["vm"] == vm, "attaching again returns the same network"

    listed = run("list", "--json").json()
    assert listed["vms"] == [
        {
            "vm_id": "vm-a",
            "tap_name": vm["tap_name"],
            "guest_ip": vm["guest_ip"],
            "guest_mac": vm["guest_mac"],
            "tap_present": True,
            "on_bridge": True,
            "policy": {
                "anti_spoof": True,
                "isolated": False,
                "egress_allow": [],
                "egress_deny": [],
                "port_forwards": [],
            },
        }
    ]
    table = run("list").out.splitlines()
    assert table[0].split() == ["VM_ID", "TAP", "GUEST_IP", "GUEST_MAC", "STATE", "POLICY"]
    row = ["vm-a", vm["tap_name"], vm["guest_ip"], vm["guest_mac"], "attached", "anti_spoof"]
    assert table[1].split() == row

    detached = run("detach", "vm-a", "--json")
    assert detached.code == 0
    assert detached.json() == {"version": 1, "vm_id": "vm-a", "detached": True}
    assert vm["tap_name"] not in state.links
    assert run("list", "--json").json()["vms"] == []
    assert run("list").out.strip() == "no VMs on nvbr0"
    assert run("detach", "vm-a").code == 0, "detaching a VM that is gone succeeds"


def test_attach_text_output(run: Run) -> None:
    run("ensure-host")
    result = run("attach", "vm-a", "--owner", "1000", "--vnet-hdr")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0] == "attached vm-a"
    assert lines[1] == f"  tap        {tap_name('vm-a')}"
    assert lines[-1] == "  tap_flags  owner=1000 group=- multi_queue=off vnet_hdr=on"


def test_attach_for_firecracker(run: Run, state: FakeState) -> None:
    run("ensure-host")
    result = run(
        "attach", "vm-fc", "--for", "firecracker", "--owner", "123", "--group", "456", "--json"
    )
    assert result.code == 0, result.err
    doc = result.json()
    vm = doc["vm"]
    assert doc["tap"] == {"owner": 123, "group": 456, "multi_queue": False, "vnet_hdr": True}
    assert doc["vmm"] == {
        "name": "firecracker",
        "api_path": "/network-interfaces/eth0",
        "network_interface": {
            "iface_id": "eth0",
            "host_dev_name": vm["tap_name"],
            "guest_mac": vm["guest_mac"],
        },
        "boot_args": vm["kernel_ip_arg"],
    }
    assert state.links[vm["tap_name"]].tap == TapOptions(123, 456, False, True)


def test_firecracker_without_owner_warns_on_stderr(run: Run) -> None:
    run("ensure-host")
    result = run("attach", "vm-fc", "--for", "firecracker")
    assert result.code == 0
    assert "pass the jailer's --uid/--gid" in result.err
    assert "firecracker: PUT /network-interfaces/eth0" in result.out


def test_attach_for_cloud_hypervisor_multi_queue(run: Run, state: FakeState) -> None:
    run("ensure-host")
    result = run(
        "attach", "vm-ch", "--for", "cloud-hypervisor", "--multi-queue", "--queues", "3", "--json"
    )
    assert result.code == 0, result.err
    doc = result.json()
    vm = doc["vm"]
    assert doc["vmm"] == {
        "name": "cloud-hypervisor",
        "net": f"tap={vm['tap_name']},mac={vm['guest_mac']},num_queues=6",
        "cmdline": vm["kernel_ip_arg"],
    }
    assert state.links[vm["tap_name"]].tap == TapOptions(None, None, True, True)


def test_attach_for_qemu_with_ip_fields(run: Run) -> None:
    run("ensure-host")
    result = run(
        "attach",
        "vm-q",
        "--for",
        "qemu",
        "--hostname",
        "guest1",
        "--dns",
        "192.0.2.53",
        "--guest-device",
        "ens3",
        "--json",
    )
    assert result.code == 0, result.err
    vm = result.json()["vm"]
    ip = vm["guest_ip"]
    assert vm["kernel_ip_arg"] == f"ip={ip}::192.0.2.1:255.255.255.0:guest1:ens3:off:192.0.2.53"
    assert result.json()["vmm"] == {
        "name": "qemu",
        "args": [
            "-netdev",
            f"tap,id=net0,ifname={vm['tap_name']},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={vm['guest_mac']}",
        ],
        "append": vm["kernel_ip_arg"],
    }


def test_gc_keeps_only_what_it_is_told(run: Run, state: FakeState) -> None:
    run("ensure-host")
    for vm in ("vm-a", "vm-b", "vm-c"):
        assert run("attach", vm).code == 0
    result = run("gc", "--keep", "vm-b", "--json")
    assert result.code == 0, result.err
    assert result.json() == {"version": 1, "removed": ["vm-a", "vm-c"], "kept": ["vm-b"]}
    assert [vm["vm_id"] for vm in run("list", "--json").json()["vms"]] == ["vm-b"]
    assert tap_name("vm-a") not in state.links
    assert tap_name("vm-b") in state.links
    everything = run("gc", "--keep")
    assert everything.code == 0
    assert everything.out.splitlines() == ["removed 1 VM(s) from nvbr0", "  vm-b"]


def test_teardown_leaves_a_bare_host(run: Run, state: FakeState) -> None:
    run("ensure-host")
    run("attach", "vm-a")
    result = run("teardown", "--json")
    assert result.code == 0, result.err
    assert result.json() == {"version": 1, "bridge": "nvbr0", "torn_down": True}
    assert list(state.links) == ["lo"]
    assert state.ip_forward is False
    assert run("status", "--json").json()["bridge"]["present"] is False
    assert run("teardown").out.strip() == "tore down nvbr0", "teardown again succeeds"


def test_options_after_the_command_and_netns_reach_the_backend(
    run: Run, netns_seen: list[str | None]
) -> None:
    assert run("status", "--netns", "ns-one", "--json").code == 0
    assert run("--netns", "ns-two", "status").code == 0
    assert run("status").code == 0
    assert netns_seen == ["ns-one", "ns-two", None]


def test_verbose_logs_on_stderr(run: Run) -> None:
    quiet = run("ensure-host")
    assert quiet.err == ""
    run("teardown")
    loud = run("-v", "ensure-host")
    assert "netvm: INFO: created bridge nvbr0" in loud.err


# Configuration precedence -----------------------------------------------------------


def test_options_override_variables_which_override_defaults(run: Run) -> None:
    env = {"MICROVM_NETWORK_MTU": "1400", "MICROVM_NETWORK_BRIDGE": "envbr0"}
    from_env = run("status", "--json", env=env, defaults=False).json()
    assert (from_env["bridge"]["name"], from_env["bridge"]["expected_mtu"]) == ("envbr0", 1400)
    assert from_env["subnet"] == "172.30.0.0/24", "unset variables keep the default"
    assert from_env["egress"] == "eth0"
    overridden = run("status", "--mtu", "9000", "--bridge", "clibr0", "--json", env=env).json()
    assert (overridden["bridge"]["name"], overridden["bridge"]["expected_mtu"]) == (
        "clibr0",
        9000,
    )


def test_a_bad_variable_is_named_unless_an_option_overrides_it(run: Run) -> None:
    env = {"MICROVM_NETWORK_MTU": "jumbo"}
    line = one_error_line(run("status", env=env), "status")
    assert "MICROVM_NETWORK_MTU" in line
    assert "'jumbo'" in line
    assert run("status", "--mtu", "1500", env=env).code == 0


# Errors: one line on stderr, exit 1, nothing created --------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--subnet", "192.0.2.1/24"], "invalid --subnet: '192.0.2.1/24': an IPv4 network"),
        (["--subnet", "192.0.2.0/31"], "has no room for a guest"),
        (["--subnet", "2001:db8::/64"], "IPv6 is not supported"),
        (["--mtu", "9"], "invalid --mtu: '9': an integer from 68 to 65521"),
        (["--mtu", "big"], "invalid --mtu: 'big'"),
        (["--bridge", "a-very-long-bridge-name"], "invalid --bridge: 'a-very-long-bridge-name'"),
        (["--bridge", "has space"], "invalid --bridge: 'has space': 1 to 15 characters"),
        (["--firewall", "nft"], "invalid --firewall: 'nft': one of auto, nftables, iptables"),
        (["--egress", "nvbr0"], "invalid --egress: 'nvbr0': must differ from the bridge's name"),
        (["--state-dir", ""], "invalid --state-dir: ''"),
    ],
)
def test_bad_configuration_is_one_line_and_changes_nothing(
    run: Run, state: FakeState, argv: list[str], expected: str
) -> None:
    line = one_error_line(run("ensure-host", *argv), "ensure-host")
    assert expected in line
    assert list(state.links) == ["lo"]


@pytest.mark.parametrize(
    "vm_id",
    ["has space", "x" * 65, "tab\tbed"],
)
def test_bad_vm_id(run: Run, state: FakeState, vm_id: str) -> None:
    run("ensure-host")
    line = one_error_line(run("attach", vm_id), "attach")
    assert "invalid vm_id" in line
    assert "1 to 64 bytes (UTF-8) of printable characters without white space" in line
    assert sorted(state.links) == ["lo", "nvbr0"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--for", "firecracker", "--multi-queue"], "Firecracker opens its TAP without"),
        (["--queues", "2"], "invalid --queues: 2"),
        (["--multi-queue", "--queues", "1"], "invalid --queues: 1"),
        (["--dns", "192.0.2.1", "--dns", "192.0.2.2", "--dns", "192.0.2.3"], "at most 2"),
        (["--dns", "1.2.3"], "invalid --dns: '1.2.3': a unicast IPv4 address"),
        (["--dns", "0.0.0.0"], "invalid --dns: '0.0.0.0': a unicast IPv4 address"),
        (["--dns", "255.255.255.255"], "invalid --dns: '255.255.255.255'"),
        (["--for", "firecracker", "--owner", "0", "--iface-id", "a" * 65], "1 to 64 ASCII"),
        (["--hostname", "a:b"], "invalid --hostname: 'a:b'"),
        (["--guest-device", "a/b"], "invalid --guest-device: 'a/b'"),
    ],
)
def test_bad_attach_options_create_nothing(
    run: Run, state: FakeState, argv: list[str], expected: str
) -> None:
    run("ensure-host")
    line = one_error_line(run("attach", "vm-a", *argv), "attach")
    assert expected in line
    assert tap_name("vm-a") not in state.links
    assert run("list", "--json").json()["vms"] == [], "no lease was left behind"


def test_device_conflict(run: Run, state: FakeState) -> None:
    FakeBackend(state).add_link("nvbr0", "veth")
    line = one_error_line(run("ensure-host"), "ensure-host")
    assert "nvbr0 already exists but is not a bridge (kind veth)" in line
    assert "remove it or choose another bridge_name" in line
    assert state.links["nvbr0"].kind == "veth", "the foreign device is left alone"


def test_reattach_with_other_flags_is_a_conflict(run: Run, state: FakeState) -> None:
    run("ensure-host")
    assert run("attach", "vm-a", "--multi-queue").code == 0
    line = one_error_line(run("attach", "vm-a"), "attach")
    assert "exists with other flags" in line
    assert "detach it first" in line
    assert state.links[tap_name("vm-a")].tap == TapOptions(multi_queue=True)


def test_exhausted_subnet(run: Run, state: FakeState) -> None:
    assert run("ensure-host", "--subnet", "192.0.2.0/30").code == 0
    assert run("attach", "vm-a", "--subnet", "192.0.2.0/30").code == 0
    line = one_error_line(run("attach", "vm-b", "--subnet", "192.0.2.0/30"), "attach")
    assert "subnet 192.0.2.0/30 is exhausted: all 1 guest addresses are leased" in line
    assert "detach or gc VMs, or use a larger subnet" in line
    assert tap_name("vm-b") not in state.links


def test_json_errors_also_print_an_error_document(run: Run) -> None:
    result = run("attach", "bad id", "--json")
    assert result.code == 1
    assert result.json() == {
        "version": 1,
        "error": {"type": "ConfigError", "message": result.err.split(": error: ", 1)[1].strip()},
    }


def test_attach_before_ensure_host_says_what_to_do(run: Run) -> None:
    line = one_error_line(run("attach", "vm-a"), "attach")
    assert "run ensure_host() first" in line


# Usage errors: exit 2 ----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["attach"],
        ["detach"],
        ["gc"],
        ["attach", "vm-a", "--for", "crosvm"],
        ["attach", "vm-a", "--owner", "no-such-user-here"],
        ["attach", "vm-a", "--queues", "0"],
        ["list", "--no-such-option"],
    ],
)
def test_usage_errors_exit_2(run: Run, state: FakeState, argv: list[str]) -> None:
    result = run(*argv)
    assert result.code == 2
    assert "usage: netvm" in result.err
    assert list(state.links) == ["lo"]


def test_help_and_version_exit_0(run: Run) -> None:
    assert run("--help").code == 0
    version = run("--version")
    assert version.code == 0
    assert version.out.startswith("netvm ")


@pytest.mark.parametrize(
    "vmm_args",
    [
        ["--for", "firecracker", "--iface-id", "\u00b2"],
        ["--for", "firecracker", "--iface-id", "a-b"],
    ],
)
def test_a_bad_vmm_field_is_refused_before_the_tap_is_made(
    run: Run, state: FakeState, vmm_args: list[str]
) -> None:
    assert run("ensure-host").code == 0
    refused = run("attach", "vm-a", *vmm_args)
    assert refused.code == 1
    assert "invalid --iface-id" in refused.err
    assert not [link for link in state.links.values() if link.kind == "tun"]
    assert run("attach", "vm-a", "--for", "firecracker").code == 0  # the control


def test_attach_many_vms_prints_a_list_and_fails_only_the_bad_one(
    run: Run, state: FakeState
) -> None:
    assert run("ensure-host").code == 0
    state.links[tap_name("vm-x")] = state.links["lo"].__class__(
        999, tap_name("vm-x"), "veth", None, 1500, False, None
    )
    result = run("attach", "vm-a", "vm-x", "vm-b", "--json")
    assert result.code == 1
    vms = result.json()["vms"]
    assert [v.get("vm", {}).get("vm_id") or v["vm_id"] for v in vms] == ["vm-a", "vm-x", "vm-b"]
    assert vms[1]["error"]["type"] == "ConflictError"
    assert "vm-x: " in result.err
    for doc in (vms[0], vms[2]):
        assert state.links[doc["vm"]["tap_name"]].master == state.links["nvbr0"].index
    text = run("attach", "vm-a", "vm-b")
    assert text.code == 0
    assert [line for line in text.out.splitlines() if line.startswith("attached")] == [
        "attached vm-a",
        "attached vm-b",
    ]


def test_detach_of_several_vms(run: Run, state: FakeState) -> None:
    run("ensure-host")
    for vm_id in ("vm-a", "vm-b", "vm-c"):
        run("attach", vm_id)
    done = run("detach", "vm-a", "vm-b", "vm-gone", "--json")
    assert done.code == 0
    assert done.json() == {"version": 1, "vm_ids": ["vm-a", "vm-b", "vm-gone"], "detached": True}
    # The command returns after the deletion (closing the manager waits for it).
    assert [link.name for link in state.links.values() if link.kind == "tun"] == [tap_name("vm-c")]
    assert [vm["vm_id"] for vm in run("list", "--json").json()["vms"]] == ["vm-c"]
    assert run("detach", "vm-c", "vm-a").out.strip() == "detached vm-c vm-a"
    assert run("list").out.strip() == "no VMs on nvbr0"


def test_detach_of_several_vms_refuses_a_foreign_device_and_changes_nothing(
    run: Run, state: FakeState
) -> None:
    run("ensure-host")
    run("attach", "vm-a")
    FakeBackend(state).create_tap(tap_name("squatted"), TapOptions())
    failed = run("detach", "vm-a", "squatted")
    assert failed.code == 1
    (line,) = failed.err.splitlines()
    assert line.startswith("netvm detach: error: ")
    assert "not netvm's TAP" in line
    assert [vm["vm_id"] for vm in run("list", "--json").json()["vms"]] == ["vm-a"]


class _ClosedPipe:
    """A stdout whose reader went away (`netvm list | head -0`): every write fails."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise ValueError("no descriptor")


def test_a_closed_pipe_under_an_error_document_is_no_traceback(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--json prints the error's document on stdout: a closed pipe there too."""
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    result = run("--json", "attach", "vm-1")  # no bridge: an error, as a document
    monkeypatch.undo()
    assert result.code == 1
    assert "Traceback" not in result.err


@pytest.mark.parametrize("command", [["list"], ["--json", "list"], ["attach", "vm-1"]])
def test_a_closed_pipe_is_no_error_message_and_the_change_stands(
    run: Run,
    state: FakeState,
    command: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("ensure-host").code == 0
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    result = run(*command)
    monkeypatch.undo()
    assert result.code == 1
    assert result.err == ""
    if command == ["attach", "vm-1"]:
        assert tap_name("vm-1") in state.links
