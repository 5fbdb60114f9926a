"""`netvm attach`'s guest policy options, and the policies `list` and `status` show (fake)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netvm import FakeBackend, FakeState
from netvm.backends.base import Backend
from netvm.cli import main

Run = Callable[..., tuple[int, str, str]]
NONE = {"anti_spoof": False, "isolated": False, "egress_allow": [], "egress_deny": []}


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    state = FakeState()

    def factory(netns: str | None) -> Backend:
        return FakeBackend(state)

    def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        base = ["--state-dir", str(tmp_path / "state"), "--bridge", "nvbr0"]
        base += ["--subnet", "192.0.2.0/24", "--egress", "up0"]
        code = main([*base, *argv], backend_factory=factory, environ=env or {})
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    assert run("ensure-host")[0] == 0
    return run


def attach_policy(run: Run, *argv: str, env: dict[str, str] | None = None) -> Any:
    code, out, err = run("attach", "vm-a", "--json", *argv, env=env)
    assert code == 0, err
    return json.loads(out)["policy"]


def test_every_flag_reaches_the_firewall(run: Run) -> None:
    policy = attach_policy(
        run,
        "--isolated",
        "--egress-allow",
        "203.0.113.0/24",
        "--egress-allow",
        "0.0.0.0/0:udp:53",
        "--egress-deny",
        "198.51.100.0/24:tcp:22-25",
        "--forward",
        "8080:80",
        "--forward",
        "5353:53/udp",
    )
    assert policy == {
        "anti_spoof": True,
        "isolated": True,
        "egress_allow": ["203.0.113.0/24", "0.0.0.0/0:udp:53"],
        "egress_deny": ["198.51.100.0/24:tcp:22-25"],
        "port_forwards": ["8080:80/tcp", "5353:53/udp"],
    }
    listed = json.loads(run("list", "--json")[1])["vms"]
    assert [vm["policy"] for vm in listed] == [policy]
    status = json.loads(run("status", "--json")[1])["guarantees"]
    assert status["vms"] == [{"vm_id": "vm-a", "tap_name": listed[0]["tap_name"], "policy": policy}]
    assert "dropped under anti_spoof" in status["ipv6"]


def test_no_flag_is_the_default_and_open_is_nothing(run: Run) -> None:
    assert attach_policy(run) == {**NONE, "anti_spoof": True, "port_forwards": []}
    code, out, err = run("attach", "vm-b", "--open", "--json")
    assert code == 0, err
    assert json.loads(out)["policy"] is None, "the firewall holds nothing for the VM"
    code, out, _ = run("list")
    assert out.splitlines()[0].split()[-1] == "POLICY"
    assert sorted(line.split()[-1] for line in out.splitlines()[1:]) == ["anti_spoof", "none"]
    code, out, _ = run("status")
    assert "policy      default anti_spoof; 1 VM anti_spoof; 1 VM none" in out
    assert out.rstrip().endswith("ready       yes")


def test_no_anti_spoof_alone_is_open(run: Run) -> None:
    assert attach_policy(run, "--no-anti-spoof") is None


def test_the_default_comes_from_the_environment_and_flags_change_it(run: Run) -> None:
    env = {"MICROVM_NETWORK_GUEST_POLICY": "anti_spoof isolated deny=169.254.0.0/16"}
    assert attach_policy(run, env=env) == {
        "anti_spoof": True,
        "isolated": True,
        "egress_allow": [],
        "egress_deny": ["169.254.0.0/16"],
        "port_forwards": [],
    }
    code, out, err = run("attach", "vm-b", "--json", "--no-isolated", env=env)
    assert code == 0, err
    assert json.loads(out)["policy"]["isolated"] is False
    assert json.loads(out)["policy"]["egress_deny"] == ["169.254.0.0/16"]
    status = json.loads(run("status", "--json", env=env)[1])["guarantees"]
    assert status["default"]["egress_deny"] == ["169.254.0.0/16"]


@pytest.mark.parametrize(
    ("argv", "flag", "value"),
    [
        (["--egress-allow", "10.0.0.1/8"], "--egress-allow", "'10.0.0.1/8'"),
        (["--egress-deny", "0.0.0.0/0:sctp"], "--egress-deny", "'0.0.0.0/0:sctp'"),
        (["--egress-deny", "0.0.0.0/0:icmp:7"], "--egress-deny", "'0.0.0.0/0:icmp:7'"),
        (["--egress-allow", "0.0.0.0/0:tcp:9-1"], "--egress-allow", "'0.0.0.0/0:tcp:9-1'"),
        (["--forward", "80"], "--forward", "'80'"),
        (["--forward", "0:80"], "--forward", "'0:80'"),
        (["--forward", "8080:70000"], "--forward", "'8080:70000'"),
        (["--forward", "8080:80/sctp"], "--forward", "'8080:80/sctp'"),
        (["--isolated=yes"], "--isolated", ""),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_the_flag(
    run: Run, argv: list[str], flag: str, value: str
) -> None:
    code, _, err = run("attach", "vm-a", *argv)
    assert code == 2
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"netvm attach: error: argument {flag}")
    assert value in last
    assert json.loads(run("list", "--json")[1])["vms"] == [], "nothing was attached"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--no-anti-spoof", "--egress-deny", "198.51.100.0/24"], "--egress-deny/--no-anti-spoof"),
        (["--forward", "8080:80", "--forward", "8080:81"], "--forward"),
        (["--open", "--isolated"], "--open"),
    ],
)
def test_a_refused_combination_is_one_line_naming_the_flags(
    run: Run, argv: list[str], named: str
) -> None:
    code, _, err = run("attach", "vm-a", *argv)
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith(f"netvm attach: error: invalid {named}: ")
    assert json.loads(run("list", "--json")[1])["vms"] == []


def test_a_bad_default_in_the_environment_names_the_variable(run: Run) -> None:
    env = {"MICROVM_NETWORK_GUEST_POLICY": "anti_spoof forward=80:80"}
    code, _, err = run("attach", "vm-a", env=env)
    assert code == 1
    (line,) = err.splitlines()
    assert "invalid MICROVM_NETWORK_GUEST_POLICY: 'anti_spoof forward=80:80'" in line


def test_a_guarantee_on_the_iptables_firewall_is_one_line(run: Run) -> None:
    code, _, err = run("--firewall", "iptables", "ensure-host")
    assert code == 0, err
    code, _, err = run("--firewall", "iptables", "attach", "vm-a", "--no-anti-spoof", "--isolated")
    assert code == 1
    (line,) = err.splitlines()
    assert "isolated needs the nftables firewall" in line
    code, out, err = run("--firewall", "iptables", "attach", "vm-a", "--json")
    assert code == 0, err
    assert json.loads(out)["policy"] is None, "the iptables default asks for nothing"


def test_status_says_what_becomes_of_guest_ipv6_for_the_vms_there_are(run: Run) -> None:
    """IPv6 is dropped only under anti_spoof: with no VM that has it, status must not say
    it is dropped (review25b F16)."""
    assert run("attach", "vm-a", "--open")[0] == 0
    out = run("status")[1]
    (line,) = [line for line in out.splitlines() if line.startswith("guest IPv6")]
    assert line.startswith("guest IPv6  passes unchecked: no VM has anti_spoof")
    assert run("attach", "vm-b")[0] == 0
    ipv6 = json.loads(run("status", "--json")[1])["guarantees"]["ipv6"]
    assert ipv6.startswith("dropped under anti_spoof, for the 1 VM(s) that have it")
    assert ipv6.endswith("passes unchecked for the 1 without")
