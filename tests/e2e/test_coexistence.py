"""Guests reach the internet on hosts whose firewall another manager runs.

Each scenario rebuilds, in the throwaway host namespace, the ruleset the real manager writes,
with the tool it uses (iptables-nft or iptables-legacy commands for Docker, ufw and a plain
`-P FORWARD DROP`; nft for firewalld's native table). netvm's firewall is chosen by `auto`,
as a new user gets it. Every scenario checks real packets (the internet host sees the uplink
address), a negative control (without netvm's rules the guest does not get out that way),
and that teardown leaves both rulesets as they were before ensure_host.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager
from netvm.diagnosis import doctor
from netvm.testing import GuestEmulator, Topology, UdpEchoServer

pytestmark = pytest.mark.privileged

DOCKER_SUBNET = "198.51.100.0/24"  # Docker's own bridge network, in documentation space


def run(netns: str, *command: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *command], check=True, capture_output=True, text=True
    ).stdout


def rulesets(netns: str) -> tuple[str, str]:
    """nftables (iptables-nft's tables included) and the legacy tables, without counters.

    The legacy tables are printed only where they exist: printing them creates them.
    """
    nft = run(netns, "nft", "-s", "list", "ruleset")
    tables = sorted(run(netns, "cat", "/proc/net/ip_tables_names").split())
    # Which legacy tables the kernel has instantiated, too: one more (raw, mangle...) is
    # a change, and cannot be taken back.
    legacy = " ".join(tables) + "\n"
    for table in tables:
        legacy += run(netns, "iptables-legacy", "-t", table, "-S")
    return nft, legacy


def docker(tool: str) -> list[list[str]]:
    """Docker's filter and nat layout (as of Docker 28), its FORWARD policy DROP."""
    chains = ["DOCKER", "DOCKER-FORWARD", "DOCKER-ISOLATION-STAGE-1", "DOCKER-ISOLATION-STAGE-2"]
    commands = [[tool, "-N", chain] for chain in [*chains, "DOCKER-USER"]]
    commands += [
        [tool, "-A", "FORWARD", "-j", "DOCKER-USER"],
        [tool, "-A", "FORWARD", "-j", "DOCKER-FORWARD"],
        [tool, "-A", "DOCKER-FORWARD", "-j", "DOCKER-ISOLATION-STAGE-1"],
        [tool, "-A", "DOCKER-FORWARD", "-o", "docker0", "-m", "conntrack", "--ctstate",
         "RELATED,ESTABLISHED", "-j", "ACCEPT"],
        [tool, "-A", "DOCKER-FORWARD", "-o", "docker0", "-j", "DOCKER"],
        [tool, "-A", "DOCKER-FORWARD", "-i", "docker0", "!", "-o", "docker0", "-j", "ACCEPT"],
        [tool, "-A", "DOCKER-FORWARD", "-i", "docker0", "-o", "docker0", "-j", "ACCEPT"],
        [tool, "-A", "DOCKER-ISOLATION-STAGE-1", "-i", "docker0", "!", "-o", "docker0", "-j",
         "DOCKER-ISOLATION-STAGE-2"],
        [tool, "-A", "DOCKER-ISOLATION-STAGE-2", "-o", "docker0", "-j", "DROP"],
        [tool, "-A", "DOCKER-USER", "-j", "RETURN"],
        [tool, "-P", "FORWARD", "DROP"],
        [tool, "-t", "nat", "-N", "DOCKER"],
        [tool, "-t", "nat", "-A", "POSTROUTING", "-s", DOCKER_SUBNET, "!", "-o", "docker0",
         "-j", "MASQUERADE"],
    ]  # fmt: skip
    return commands


def ufw() -> list[list[str]]:
    """ufw's forward chains (iptables-nft), DEFAULT_FORWARD_POLICY="DROP"."""
    tool = "iptables-nft"
    order = ["before-logging", "before", "after", "after-logging", "reject", "track"]
    chains = [f"ufw-{name}-forward" for name in [*order, "user"]]
    commands = [[tool, "-N", chain] for chain in chains]
    commands += [[tool, "-A", "FORWARD", "-j", f"ufw-{name}-forward"] for name in order]
    commands += [
        [tool, "-A", "ufw-before-forward", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
         "-j", "ACCEPT"],
        [tool, "-A", "ufw-before-forward", "-j", "ufw-user-forward"],
        [tool, "-P", "FORWARD", "DROP"],
    ]  # fmt: skip
    return commands


FIREWALLD = """
table inet firewalld {
    chain filter_FORWARD {
        type filter hook forward priority filter + 10; policy accept;
        ct state { established, related } accept
        ct status dnat accept
        iifname "lo" accept
        ct state invalid drop
        jump filter_FORWARD_ZONES
        reject with icmpx admin-prohibited
    }
    chain filter_FORWARD_ZONES {
    }
    chain filter_FWD_trusted {
        accept
    }
}
"""


EMPTY_TABLE = """
table inet filter {
    chain forward {
        type filter hook forward priority filter; policy accept;
    }
}
"""


BRIDGE_IN_ONLY = """
table inet filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        iifname "nvbr0" accept
    }
}
"""
"""A hand-written forward chain that lets the bridge out but not the replies back in."""
BRIDGE_INPUT_DROP = """
table bridge hardening {
    chain input {
        type filter hook input priority filter; policy drop;
    }
}
"""
"""A bridge-family input chain that drops: the guests' frames to the gateway (ARP too)."""
PREROUTING_DROP = """
table ip raw1 {
    chain pre {
        type filter hook prerouting priority raw; policy accept;
        iifname "nvbr0" drop
    }
}
"""
NFT_INSERT = ["nft", "insert", "rule"]
REPLIES_IN = ["ct", "state", "established,related", "accept"]


def firewalld() -> list[list[str]]:
    return [["nft", FIREWALLD]]


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[], list[list[str]]]
    chosen: str
    """The firewall `auto` picks on such a host."""
    admin_fix: Callable[[str, str], list[list[str]]] | None = None
    """What the administrator runs on `netvm doctor`'s advice (the manager's own rule)."""
    fix_hint: str = ""


SCENARIOS = [
    Scenario("docker-iptables-nft", lambda: docker("iptables-nft"), "nftables"),
    Scenario("docker-iptables-legacy", lambda: docker("iptables-legacy"), "iptables"),
    Scenario(
        # An nftables table that filters nothing (Debian's default /etc/nftables.conf):
        # Docker's legacy rules are what decides, so auto still picks iptables.
        "empty-nft-table-beside-docker-iptables-legacy",
        lambda: [*docker("iptables-legacy"), ["nft", EMPTY_TABLE]],
        "iptables",
    ),
    Scenario("drop-iptables-nft", lambda: [["iptables-nft", "-P", "FORWARD", "DROP"]], "nftables"),
    Scenario(
        "drop-iptables-legacy", lambda: [["iptables-legacy", "-P", "FORWARD", "DROP"]], "iptables"
    ),
    Scenario(
        "ufw",
        ufw,
        "nftables",
        lambda bridge, egress: [
            ["iptables-nft", "-A", "ufw-user-forward", "-i", bridge, "-o", egress, "-j", "ACCEPT"]
        ],
        "ufw route allow in on nvbr0 out on eth0",
    ),
    Scenario(
        "nft-drop-policy-bridge-out-only",
        lambda: [["nft", BRIDGE_IN_ONLY]],
        "nftables",
        lambda bridge, egress: [
            [*NFT_INSERT, "inet", "filter", "forward", "oifname", bridge, *REPLIES_IN]
        ],
        'oifname "nvbr0" ct state established,related accept',
    ),
    Scenario(
        "nft-bridge-input-drop",
        lambda: [["nft", BRIDGE_INPUT_DROP]],
        "nftables",
        lambda bridge, egress: [
            [*NFT_INSERT, "bridge", "hardening", "input", "iifname", "tap-*", "accept"]
        ],
        'iifname "tap-*" accept',
    ),
    Scenario(
        "nft-prerouting-drop-from-the-bridge",
        lambda: [["nft", PREROUTING_DROP]],
        "nftables",
        lambda bridge, egress: [[*NFT_INSERT, "ip", "raw1", "pre", "iifname", bridge, "accept"]],
        'iifname "nvbr0" accept',
    ),
    Scenario(
        "firewalld",
        firewalld,
        "nftables",
        lambda bridge, egress: [
            [
                "nft",
                "add",
                "rule",
                "inet",
                "firewalld",
                "filter_FORWARD_ZONES",
                "iifname",
                bridge,
                "oifname",
                egress,
                "goto",
                "filter_FWD_trusted",  # as the chain of a policy with target ACCEPT
            ]
        ],
        "firewall-cmd --permanent --policy=nvbr0-out --set-target=ACCEPT",
    ),
]


def as_before(after: tuple[str, str], before: tuple[str, str]) -> bool:
    """The rulesets are as before, but for the legacy nat table when it was not there: its
    masquerade instantiates it, and the kernel cannot take a table back (it is left empty,
    every chain ACCEPT)."""
    if after == before:
        return True
    empty_nat = "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n"
    tables, _, _ = after[1].partition("\n")
    without_nat = " ".join(t for t in tables.split() if t != "nat") + "\n"
    stripped = after[1].replace(tables + "\n", without_nat, 1).replace(empty_nat, "", 1)
    return "nat" not in before[1].partition("\n")[0].split() and (after[0], stripped) == before


def reaches_internet(g: GuestEmulator, server: UdpEchoServer, topology: Topology) -> bool:
    """One UDP exchange: a reply came back and the internet host saw the uplink address."""
    before = len(server.peers)
    reply = g.udp_request(server.address, server.port, b"out?", timeout=1.0)
    return reply == b"out?" and server.seen()[before:] == [str(topology.uplink.ip)]


def reaches_internet_soon(g: GuestEmulator, server: UdpEchoServer, topology: Topology) -> bool:
    """After a fix: a few exchanges, as the host's neighbour entry of the guest may have
    failed while the guest's ARP replies were dropped (it is tried again within seconds)."""
    return any(reaches_internet(g, server, topology) for _ in range(5))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_guests_reach_the_internet_beside_another_firewall_manager(
    scenario: Scenario,
    topology: Topology,
    config: NetworkConfig,
    internet_host: UdpEchoServer,
) -> None:
    host = topology.host_netns
    for command in scenario.build():
        run(host, *command)
    before = rulesets(host)
    auto = dataclasses.replace(config, host_egress_iface="eth0", firewall="auto")
    backend = KernelBackend(host)
    try:
        with NetworkManager(auto, backend) as net:
            assert net.choose_firewall().kind == scenario.chosen
            net.ensure_host()
            vm = net.attach("vm-a")
            with GuestEmulator(vm, host, mtu=auto.mtu) as g:
                if scenario.admin_fix is not None:
                    # netvm wrote nothing into this manager's rules; doctor says what to run.
                    assert not reaches_internet(g, internet_host, topology)
                    blocking = [f for f in doctor(net) if f.blocking]
                    assert any(scenario.fix_hint in f.fix for f in blocking), blocking
                    for command in scenario.admin_fix("nvbr0", "eth0"):
                        run(host, *command)
                    assert not [f for f in doctor(net) if f.blocking]
                    assert reaches_internet_soon(g, internet_host, topology)
                assert reaches_internet(g, internet_host, topology)
                if scenario.name.startswith("docker"):
                    docker_still_works(host, scenario.name.removeprefix("docker-"))

                # Negative control: without netvm's rules the guest does not get out.
                net.backend.firewall(scenario.chosen).remove("nvbr0")
                assert not reaches_internet(g, internet_host, topology)
                net.ensure_host()
                assert reaches_internet(g, internet_host, topology)
            net.teardown_host()
        if scenario.admin_fix is not None:
            for command in scenario.admin_fix("nvbr0", "eth0"):
                undo_admin_fix(host, command)
        assert as_before(rulesets(host), before)
    finally:
        backend.close()


def docker_still_works(host: str, tool: str) -> None:
    """Docker's own commands still read and change its chains after netvm wrote there."""
    listed = run(host, tool, "-S")
    for chain in ("DOCKER", "DOCKER-FORWARD", "DOCKER-USER", "DOCKER-ISOLATION-STAGE-1"):
        assert f"-N {chain}" in listed
    assert any(
        line.startswith("-A DOCKER-USER") and "netvm:nvbr0" in line for line in listed.splitlines()
    )
    rule = ["DOCKER-USER", "-s", "198.51.100.7/32", "-j", "DROP"]
    run(host, tool, "-I", *rule)
    assert "-A DOCKER-USER -s 198.51.100.7/32 -j DROP" in run(host, tool, "-S", "DOCKER-USER")
    run(host, tool, "-D", *rule)


def undo_admin_fix(host: str, command: list[str]) -> None:
    if command[0] == "iptables-nft":
        run(host, "iptables-nft", "-D", *command[2:])
        return
    family, table, chain = command[3:6]  # nft add|insert rule FAMILY TABLE CHAIN ...
    wanted = " ".join(command[6:])
    listing = run(host, "nft", "-a", "list", "chain", family, table, chain)
    handle = next(
        line.split("# handle ")[1]
        for line in listing.splitlines()
        if wanted in line.replace('"', "") and "# handle " in line
    )
    run(host, "nft", "delete", "rule", family, table, chain, "handle", handle.strip())


def test_a_save_and_restore_of_iptables_nft_keeps_netvms_rules_its_own(
    topology: Topology, config: NetworkConfig, internet_host: UdpEchoServer
) -> None:
    """iptables-nft-save | iptables-nft-restore (netfilter-persistent at boot) writes
    netvm's comment back as an xtables match, which libnftables lists without its text.
    netvm reads it from the kernel: no copy piles up at each ensure_host, doctor sees its
    rules in place, the guest gets out, and teardown leaves the ruleset as it was, a
    foreign rule with a comment of its own included."""
    host = topology.host_netns
    for command in docker("iptables-nft"):
        run(host, *command)
    foreign = ["DOCKER-USER", "-i", "eth9", "-m", "comment", "--comment", "mine", "-j", "ACCEPT"]
    run(host, "iptables-nft", "-A", *foreign)
    auto = dataclasses.replace(config, host_egress_iface="eth0", firewall="auto")
    backend = KernelBackend(host)

    def round_trip() -> None:
        saved = run(host, "iptables-nft-save")
        restore = ["ip", "netns", "exec", host, "iptables-nft-restore"]
        subprocess.run(restore, input=saved, text=True, check=True)

    round_trip()  # the foreign rules as a restore writes them (counters, xtables comment)
    before = rulesets(host)

    def tagged() -> list[str]:
        return [line for line in run(host, "iptables-nft", "-S").splitlines() if "netvm:" in line]

    try:
        with NetworkManager(auto, backend) as net:
            for _ in range(3):
                net.ensure_host()
                round_trip()
                assert not [f for f in doctor(net) if f.blocking]
            assert len(tagged()) == 3, tagged()
            assert net.backend.firewall("nftables").listing("nvbr0") != []
            vm = net.attach("vm-a")
            with GuestEmulator(vm, host, mtu=auto.mtu) as g:
                assert reaches_internet(g, internet_host, topology)
            net.teardown_host()
        assert tagged() == []
        assert "--comment mine" in run(host, "iptables-nft", "-S", "DOCKER-USER")
        assert as_before(rulesets(host), before)
    finally:
        backend.close()


IPTABLES_NFT_DROPS = {
    "mangle-forward-from-the-bridge": ("mangle", ["FORWARD", "-i", "nvbr0", "-j", "DROP"]),
    "mangle-prerouting-from-the-egress": ("mangle", ["PREROUTING", "-i", "eth0", "-j", "DROP"]),
    "mangle-postrouting-to-the-egress": ("mangle", ["POSTROUTING", "-o", "eth0", "-j", "DROP"]),
    "raw-prerouting-from-the-bridge": ("raw", ["PREROUTING", "-i", "nvbr0", "-j", "DROP"]),
}
"""Drops in iptables-nft's other tables than filter, each with the tool iptables-nft is."""


def doctors_commands(fix: str) -> list[list[str]]:
    """The commands of a fix as doctor prints them ("let them through ...: A; B")."""
    commands = fix.removeprefix("let them through before the drop: ")
    return [shlex.split(command) for command in commands.split("; ")]


@pytest.mark.parametrize("case", IPTABLES_NFT_DROPS, ids=str)
def test_doctors_fix_in_an_iptables_nft_table_keeps_it_listable(
    case: str, topology: Topology, config: NetworkConfig, internet_host: UdpEchoServer
) -> None:
    """A drop that iptables-nft wrote into its mangle or raw table: doctor's fix, run as
    printed, lets the guest out, and iptables-nft still lists and saves every table (a
    native nft rule there would make it refuse: "table `mangle' is incompatible, use 'nft'
    tool")."""
    host = topology.host_netns
    table, rule = IPTABLES_NFT_DROPS[case]
    run(host, "iptables-nft", "-t", table, "-A", *rule)
    auto = dataclasses.replace(config, host_egress_iface="eth0", firewall="auto")
    backend = KernelBackend(host)
    try:
        with NetworkManager(auto, backend) as net:
            net.ensure_host()
            vm = net.attach("vm-a")
            with GuestEmulator(vm, host, mtu=auto.mtu) as g:
                assert not reaches_internet(g, internet_host, topology)
                (finding,) = [f for f in doctor(net) if f.blocking]
                commands = doctors_commands(finding.fix)
                assert all(command[0] == "iptables-nft" for command in commands), finding.fix
                for command in commands:
                    run(host, *command)
                for listed in ("filter", "mangle", "raw", "nat"):
                    run(host, "iptables-nft", "-t", listed, "-S")
                assert "incompatible" not in run(host, "iptables-nft-save")
                assert not [f for f in doctor(net) if f.blocking]
                assert reaches_internet_soon(g, internet_host, topology)
            net.teardown_host()
    finally:
        backend.close()


def test_a_raw_drop_of_the_replies_gets_no_fix_that_cannot_work(
    topology: Topology, config: NetworkConfig, internet_host: UdpEchoServer
) -> None:
    """raw PREROUTING (priority -300) runs before conntrack: a `ct state established` (or
    `--ctstate`) accept there never takes a reply, so doctor suggests none, and a drop of
    everything from the egress stays blocking with such a rule above it (as the kernel
    does); doctor says what the administrator must change instead."""
    host = topology.host_netns
    run(host, "iptables-nft", "-t", "raw", "-A", "PREROUTING", "-i", "eth0", "-j", "DROP")
    auto = dataclasses.replace(config, host_egress_iface="eth0", firewall="auto")
    backend = KernelBackend(host)
    try:
        with NetworkManager(auto, backend) as net:
            net.ensure_host()
            vm = net.attach("vm-a")
            (finding,) = [f for f in doctor(net) if f.blocking]
            assert "conntrack has not seen them yet" in finding.fix
            assert not finding.fix.startswith("let them through")
            assert "Narrow that drop" in finding.fix
            useless = ["PREROUTING", "-i", "eth0", "-m", "conntrack", "--ctstate"]
            run(host, "iptables-nft", "-t", "raw", "-I", *useless, "ESTABLISHED", "-j", "ACCEPT")
            with GuestEmulator(vm, host, mtu=auto.mtu) as g:
                assert not reaches_internet(g, internet_host, topology)
                assert [f for f in doctor(net) if f.blocking], "the kernel still drops them"
            net.teardown_host()
    finally:
        backend.close()
