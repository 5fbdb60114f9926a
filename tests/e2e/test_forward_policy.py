"""On a host whose FORWARD policy is DROP (as Docker leaves it), netvm's rules carry the VMs.

With br_netfilter on, frames bridged between two guests pass the iptables FORWARD chain
too (in and out are both the bridge), so netvm accepts bridge -> bridge as well.
"""

from __future__ import annotations

import subprocess

import pytest

from netvm import NetworkConfig, NetworkManager, Rule
from netvm.backends.base import FILTER
from netvm.testing import GuestEmulator, Topology, UdpEchoServer, run_in_netns

pytestmark = pytest.mark.privileged


def iptables(netns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "iptables-legacy", *args], check=True)


def bridge_calls_iptables(netns: str) -> bool:
    def switch() -> bool:
        path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
        try:
            with open(path, "w") as knob:
                knob.write("1\n")
        except FileNotFoundError:
            return False
        return True

    return run_in_netns(netns, switch)


@pytest.fixture
def drop_policy(topology: Topology) -> None:
    """The host namespace is thrown away with the topology; nothing to restore."""
    iptables(topology.host_netns, "-P", "FORWARD", "DROP")


def test_guests_reach_the_internet_and_each_other_under_a_drop_policy(
    drop_policy: None,
    net: NetworkManager,
    topology: Topology,
    e2e_config: NetworkConfig,
    internet_host: UdpEchoServer,
) -> None:
    br_netfilter = bridge_calls_iptables(topology.host_netns)
    a, b = net.attach("vm-a"), net.attach("vm-b")
    with (
        GuestEmulator(a, topology.host_netns, mtu=e2e_config.mtu) as ga,
        GuestEmulator(b, topology.host_netns, mtu=e2e_config.mtu) as gb,
    ):
        assert ga.udp_request(internet_host.address, internet_host.port, b"out") == b"out"
        assert ga.ping(b.guest_ip)
        assert gb.ping(a.guest_ip)

        # Negative control: without netvm's jump in FORWARD, the DROP policy wins.
        (jump,) = net.expected_rules()[(FILTER, "FORWARD")]
        net.backend.delete_rule(FILTER, "FORWARD", jump)
        assert ga.udp_request(internet_host.address, internet_host.port, b"out") is None
        if br_netfilter:
            assert not ga.ping(b.guest_ip)
        net.ensure_host()
        assert ga.udp_request(internet_host.address, internet_host.port, b"out") == b"out"
        assert ga.ping(b.guest_ip)


def test_bridge_to_bridge_rule_is_netvms(net: NetworkManager) -> None:
    rules = net.backend.list_rules(FILTER, net.forward_chain)
    assert Rule("ACCEPT", in_iface="nvbr0", out_iface="nvbr0", comment="netvm:nvbr0") in rules
