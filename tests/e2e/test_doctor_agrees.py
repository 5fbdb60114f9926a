"""doctor agrees with the kernel: with one foreign nftables ruleset loaded at a time, a
guest's real traffic to the internet is blocked exactly when doctor has a blocking
finding about that ruleset. The rulesets are those a second review found doctor wrong
about (NAT that rewrites the guest's address before or after a chain's priority, device
names a hook does not have, ARP), and the tables of managers found on real hosts
(Docker's nftables backend, kube-proxy, Incus, libvirt, firewalld, a hand-written input
policy). Each case is its own control: some are blocked, the others pass."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager, doctor
from netvm.testing import GuestEmulator, Topology, UdpEchoServer

pytestmark = pytest.mark.privileged

PASSES = {
    "raw-prerouting-guard-of-the-vm-subnet": """
table ip guard {
    chain pre {
        type filter hook prerouting priority raw; policy accept;
        ip daddr 192.0.2.0/24 iifname != "nvbr0" drop
    }
}""",
    "postrouting-anti-leak-after-nat": """
table ip guard {
    chain post {
        type filter hook postrouting priority 300; policy accept;
        oifname "eth0" ip saddr != 203.0.113.2 drop
    }
}""",
    "postrouting-allow-list-by-input-device": """
table inet egress {
    chain post {
        type filter hook postrouting priority filter; policy drop;
        oifname "lo" accept
        iifname "nvbr0" accept
        oifname "nvbr0" ct state established,related accept
    }
}""",
    "netdev-ingress-private-destinations": """
table netdev edge {
    chain in {
        type filter hook ingress device "eth0" priority -500; policy accept;
        ip daddr { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 192.0.2.0/24 } drop
    }
}""",
    "mangle-prerouting-before-un-nat": """
table ip mangle2 {
    chain pre {
        type filter hook prerouting priority mangle; policy accept;
        iifname "eth0" ip daddr != 203.0.113.2 drop
    }
}""",
    "hand-written-input-policy-drop": """
table inet filter {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state invalid drop
        ct state { established, related } accept
        iif "lo" accept
        tcp dport 22 accept
    }
    chain pre {
        type filter hook prerouting priority -150;
        fib saddr . iif oif missing drop
    }
}""",
    "docker-nftables-backend": """
table ip docker-bridges {
    map filter-forward-in-jumps {
        type ifname : verdict
        elements = { "docker0" : jump filter-forward-in__docker0 }
    }
    chain filter-FORWARD {
        type filter hook forward priority filter; policy accept;
        oifname vmap @filter-forward-in-jumps
    }
    chain nat-POSTROUTING {
        type nat hook postrouting priority srcnat; policy accept;
        oifname != "docker0" ip saddr 198.51.100.0/24 masquerade
    }
    chain raw-PREROUTING {
        type filter hook prerouting priority raw; policy accept;
        ip daddr 198.51.100.2 iifname != "docker0" drop
    }
    chain filter-forward-in__docker0 {
        ct state established,related accept
        drop
    }
}""",
    "kube-proxy-nftables": """
table ip kube-proxy {
    set cluster-ips {
        type ipv4_addr
        elements = { 10.96.0.1 }
    }
    map service-ips {
        type ipv4_addr . inet_proto . inet_service : verdict
    }
    chain filter-forward {
        type filter hook forward priority -110; policy accept;
        ct state new jump cluster-ips-check
    }
    chain cluster-ips-check {
        ip daddr @cluster-ips reject
        ip daddr { 10.96.0.0/16 } drop
    }
    chain nat-prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }
    chain services {
        ip daddr . meta l4proto . th dport vmap @service-ips
    }
    chain nat-postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        meta mark & 0x00004000 == 0x00000000 return
        masquerade fully-random
    }
}""",
    "incus-bridge-filtering-of-its-own-nic": """
table bridge incus {
    chain in.c1.eth0 {
        type filter hook input priority -200; policy accept;
        iifname "veth1a2b3c" ether saddr != 00:16:3e:00:00:01 drop
        iifname "veth1a2b3c" ether type ip ip saddr != 198.51.100.10 drop
    }
}""",
    "libvirt-nftables": """
table ip libvirt_network {
    chain forward {
        type filter hook forward priority filter; policy accept;
        jump guest_output
    }
    chain guest_output {
        ip saddr 198.51.100.0/24 iifname "virbr0" accept
        iifname "virbr0" reject
    }
    chain guest_nat {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 198.51.100.0/24 ip daddr != 198.51.100.0/24 masquerade
    }
}""",
    "firewalld-prerouting": """
table inet firewalld {
    chain filter_PREROUTING {
        type filter hook prerouting priority filter + 10; policy accept;
        icmpv6 type { nd-router-advert, nd-neighbor-solicit } accept
        meta nfproto ipv6 fib saddr . mark . iif oif missing drop
    }
}""",
}
BLOCKED = {
    "postrouting-drop-by-input-device": """
table inet egress {
    chain post {
        type filter hook postrouting priority filter; policy accept;
        iifname "nvbr0" drop
    }
}""",
    "prerouting-drop-on-an-output-device-it-has-not": """
table inet x {
    chain pre {
        type filter hook prerouting priority filter; policy accept;
        oifname != "eth0" iifname "nvbr0" drop
    }
}""",
    "bridge-input-lets-only-ip-through": """
table bridge hardening {
    chain input {
        type filter hook input priority filter; policy drop;
        ether type ip accept
    }
}""",
    "bridge-prerouting-drops-the-guests-arp": """
table bridge hardening {
    chain pre {
        type filter hook prerouting priority filter; policy accept;
        iifname "tap-*" ether type arp drop
    }
}""",
}


def _run(netns: str, *command: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *command], input=stdin, text=True, check=True)


def _gets_out(guest: GuestEmulator, server: UdpEchoServer) -> bool:
    return any(
        guest.udp_request(server.address, server.port, b"out?", timeout=1.0) == b"out?"
        for _ in range(3)
    )


@pytest.mark.parametrize(
    ("name", "blocked"),
    [pytest.param(name, False, id=name) for name in PASSES]
    + [pytest.param(name, True, id=name) for name in BLOCKED],
)
def test_doctor_blocks_exactly_when_the_kernel_does(
    name: str,
    blocked: bool,
    topology: Topology,
    config: NetworkConfig,
    internet_host: UdpEchoServer,
) -> None:
    host = topology.host_netns
    nftables = dataclasses.replace(config, host_egress_iface="eth0", firewall="nftables")
    backend = KernelBackend(host)
    try:
        with NetworkManager(nftables, backend) as net:
            net.ensure_host()
            vm = net.attach("vm-a")
            with GuestEmulator(vm, host, mtu=nftables.mtu) as guest:
                assert _gets_out(guest, internet_host)  # before the foreign ruleset
                before = {f.code for f in doctor(net) if f.blocking}
                _run(host, "nft", "-f", "-", stdin=(PASSES | BLOCKED)[name] + "\n")
                # The host's neighbour entry of the guest may be cached from before: an
                # ARP that is dropped now would go unseen until it expires.
                _run(host, "ip", "neigh", "flush", "dev", nftables.bridge_name)
                assert _gets_out(guest, internet_host) is not blocked
                blocking = [f for f in doctor(net) if f.blocking and f.code not in before]
                assert bool(blocking) is blocked, blocking
            net.teardown_host()
    finally:
        backend.close()
