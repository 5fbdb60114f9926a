"""What iproute2, nft and iptables-legacy print in the namespace matches what netvm reports."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import subprocess
from pathlib import Path

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager, TapOptions
from netvm.config import FirewallChoice
from netvm.naming import guest_slot, store_id

pytestmark = pytest.mark.privileged


def run_in(netns: str, *command: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *command], capture_output=True, text=True, check=True
    ).stdout


def root_namespace_view() -> tuple[str, list[tuple[int, str]]]:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text(), socket.if_nameindex()


@pytest.mark.parametrize("firewall", ["nftables", "iptables"])
def test_iproute2_and_iptables_see_what_netvm_made(
    netns: str, config: NetworkConfig, firewall: FirewallChoice
) -> None:
    root_before = root_namespace_view()
    backend = KernelBackend(netns)
    with NetworkManager(dataclasses.replace(config, firewall=firewall), backend) as manager:
        manager.ensure_host()
        vm = manager.attach("vm-truth")
        links = {
            link["ifname"]: link
            for link in json.loads(run_in(netns, "ip", "-d", "-j", "link", "show"))
        }
        bridge, tap = links["nvbr0"], links[vm.tap_name]
        assert bridge["linkinfo"]["info_kind"] == "bridge"
        assert bridge["ifalias"] == f"netvm-bridge:192.0.2.0/24:{store_id(config.state_dir)}"
        assert "UP" in bridge["flags"]
        assert bridge["mtu"] == 1500
        # Link-local frames through the hooks, and no MAC learnt from them (host.py).
        assert bridge["linkinfo"]["info_data"]["group_fwd_mask"] == "0x4000"
        assert bridge["linkinfo"]["info_data"]["no_linklocal_learn"] == 1
        assert bridge["linkinfo"]["info_data"]["stp_state"] == 0
        assert bridge["group"] == "default"
        assert tap["linkinfo"]["info_kind"] == "tun"
        assert tap["linkinfo"]["info_data"]["type"] == "tap"
        assert tap["linkinfo"]["info_data"]["pi"] is False
        assert tap["master"] == "nvbr0"
        slot = guest_slot(vm.guest_ip, ipaddress.IPv4Network("192.0.2.0/24"))
        assert tap["ifalias"] == f"netvm:nvbr0:{slot}:vm-truth"
        assert (tap["mtu"], "UP" in tap["flags"]) == (1500, True)

        ports = json.loads(run_in(netns, "bridge", "-j", "link", "show"))
        assert [(p["ifname"], p["master"]) for p in ports] == [(vm.tap_name, "nvbr0")]

        addresses = json.loads(run_in(netns, "ip", "-j", "-4", "addr", "show", "dev", "nvbr0"))
        assert [(a["local"], a["prefixlen"]) for i in addresses for a in i["addr_info"]] == [
            ("192.0.2.1", 24)
        ]
        assert run_in(netns, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"

        if firewall == "nftables":
            check_nft(netns, manager)
        else:
            check_legacy(netns, manager)
        assert run_in(netns, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "0"
        remaining = json.loads(run_in(netns, "ip", "-j", "link", "show"))
        assert [link["ifname"] for link in remaining] == ["lo"]
    backend.close()
    assert root_namespace_view() == root_before


def check_nft(netns: str, manager: NetworkManager) -> None:
    """nft prints netvm's table as netvm means it; teardown leaves an empty ruleset."""
    table = run_in(netns, "nft", "list", "table", "inet", "netvm-nvbr0")
    lines = [line.strip() for line in table.splitlines()]
    tag = 'comment "netvm:nvbr0"'
    for line in (
        "type filter hook forward priority filter; policy accept;",
        f'iifname "nvbr0" oifname "up0" accept {tag}',
        f'iifname "nvbr0" oifname "nvbr0" accept {tag}',
        f'oifname "nvbr0" ct state established,related accept {tag}',
        f'oifname "nvbr0" drop {tag}',
        "type nat hook postrouting priority srcnat; policy accept;",
        f'ip saddr 192.0.2.0/24 oifname "up0" masquerade {tag}',
    ):
        assert line in lines
    assert "iptables-legacy tables present" not in run_in(netns, "iptables-nft", "-S")
    assert run_in(netns, "cat", "/proc/net/ip_tables_names") == "", "legacy tables untouched"
    manager.teardown_host()
    assert run_in(netns, "nft", "list", "ruleset") == ""


def check_legacy(netns: str, manager: NetworkManager) -> None:
    """iptables-legacy prints netvm's chains; teardown leaves the default policies only."""
    tag = '-m comment --comment "netvm:nvbr0"'
    filter_rules = run_in(netns, "iptables-legacy", "-S").splitlines()
    assert filter_rules[:2] == ["-P INPUT ACCEPT", "-P FORWARD ACCEPT"]
    for line in (
        "-N NETVM-FWD-nvbr0",
        f"-A FORWARD {tag} -j NETVM-FWD-nvbr0",
        f"-A NETVM-FWD-nvbr0 -i nvbr0 -o up0 {tag} -j ACCEPT",
        f"-A NETVM-FWD-nvbr0 -i nvbr0 -o nvbr0 {tag} -j ACCEPT",
        f"-A NETVM-FWD-nvbr0 -o nvbr0 -m conntrack --ctstate RELATED,ESTABLISHED {tag} -j ACCEPT",
        f"-A NETVM-FWD-nvbr0 -o nvbr0 {tag} -j DROP",
    ):
        assert line in filter_rules
    nat_rules = run_in(netns, "iptables-legacy", "-t", "nat", "-S").splitlines()
    for line in (
        "-N NETVM-NAT-nvbr0",
        f"-A POSTROUTING {tag} -j NETVM-NAT-nvbr0",
        f"-A NETVM-NAT-nvbr0 -s 192.0.2.0/24 -o up0 {tag} -j MASQUERADE",
    ):
        assert line in nat_rules
    manager.teardown_host()
    assert run_in(netns, "iptables-legacy", "-S").splitlines() == [
        "-P INPUT ACCEPT",
        "-P FORWARD ACCEPT",
        "-P OUTPUT ACCEPT",
    ]
    assert "NETVM" not in run_in(netns, "iptables-legacy", "-t", "nat", "-S")
    assert run_in(netns, "nft", "list", "ruleset") == ""


def test_tap_flags_reach_the_kernel(netns: str, config: NetworkConfig) -> None:
    backend = KernelBackend(netns)
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        vm = manager.attach(
            "vm-flags", TapOptions(owner=4242, group=4343, multi_queue=True, vnet_hdr=True)
        )
        (link,) = json.loads(run_in(netns, "ip", "-d", "-j", "link", "show", vm.tap_name))
        data = link["linkinfo"]["info_data"]
        assert (data["user"], data["group"]) == (4242, 4343)
        assert data["multi_queue"] is True
        assert data["vnet_hdr"] is True
    backend.close()
