"""A real Linux guest under QEMU on netvm's TAP, configured only from netvm's output.

The positive tests take everything from `netvm attach --for qemu --json`, as a user would:
`vmm.args` handed to QEMU verbatim, `vmm.append` (the `ip=` fragment) on the kernel command
line, `vm.guest_mac` to compare with what the guest's NIC reports. The negative controls use
the Python API (`glue.qemu_args`) and show that each check can fail: without netvm's
MASQUERADE the internet host sees the guest's private address, and a guest that applies an
address netvm did not lease reaches neither its gateway nor the internet host.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from netvm import KernelBackend, NetworkConfig, NetworkManager, VmNetwork, glue
from netvm.testing import Topology, UdpEchoServer, run_in_netns
from netvm.testing.qemu import GuestRun, GuestTools, guest_cmdline, run_guest

from .conftest import ACCEL

pytestmark = pytest.mark.privileged

NETVM = Path(sys.executable).with_name("netvm")


def netvm_json(topology: Topology, config: NetworkConfig, *argv: str) -> Any:
    """Run the installed `netvm` command on the topology's host and parse its --json."""
    done = subprocess.run(
        [
            str(NETVM),
            *("--netns", topology.host_netns, "--bridge", config.bridge_name),
            *("--subnet", str(config.vm_subnet), "--egress", topology.egress_iface),
            *("--state-dir", str(config.state_dir), *argv, "--json"),
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MICROVM_NETWORK_")},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def boot(
    tools: GuestTools,
    initramfs: Path,
    topology: Topology,
    nic_args: list[str],
    ip_arg: str,
    internet_host: UdpEchoServer,
    cpus: int = 1,
) -> GuestRun:
    """Boot the guest in the host namespace; it pings its gateway and the internet host and
    sends one UDP request to the internet host."""
    append = guest_cmdline(
        ip_arg, ping=[topology.internet.ip], udp=(internet_host.address, internet_host.port)
    )
    run = run_guest(
        tools,
        initramfs,
        nic_args,
        append,
        netns=topology.host_netns,
        cpus=cpus,
        accel=ACCEL,
        timeout=90,
    )
    assert not run.timed_out, run.describe()
    assert run.returncode == 0, run.describe()
    assert run.reports().get("end") == "ok", run.describe()
    return run


def neighbour_mac(netns: str, address: str) -> str | None:
    """The link-layer address the host learnt for `address` (from the guest's ARP)."""

    def read() -> str | None:
        with IPRoute() as ipr:
            for entry in ipr.get_neighbours(dst=address):
                lladdr: Any = entry.get_attr("NDA_LLADDR")
                if lladdr:
                    return str(lladdr)
        return None

    return run_in_netns(netns, read)


DOCKER_ON_IPTABLES_NFT = [
    ["iptables-nft", "-N", "DOCKER-USER"],
    ["iptables-nft", "-A", "FORWARD", "-j", "DOCKER-USER"],
    ["iptables-nft", "-P", "FORWARD", "DROP"],
]


@pytest.mark.parametrize(
    ("flags", "queues", "host_rules"),
    [
        pytest.param((), 1, [], id="single-queue"),
        pytest.param(("--multi-queue",), 2, [], id="multi-queue"),
        # Docker's FORWARD policy DROP and its DOCKER-USER chain, where netvm's accepts go.
        pytest.param((), 1, DOCKER_ON_IPTABLES_NFT, id="docker-host"),
        # The bridge's MTU reaches the guest's NIC (host_mtu): jumbo frames end to end.
        pytest.param(("--mtu", "9000"), 1, [], id="jumbo-mtu"),
    ],
)
def test_guest_configured_from_netvm_attach_reaches_gateway_and_natted_internet(
    guest_tools: GuestTools,
    initramfs: Path,
    topology: Topology,
    guest_config: NetworkConfig,
    internet_host: UdpEchoServer,
    flags: tuple[str, ...],
    queues: int,
    host_rules: list[list[str]],
) -> None:
    for command in host_rules:
        subprocess.run(["ip", "netns", "exec", topology.host_netns, *command], check=True)
    mtu = flags[flags.index("--mtu") + 1] if "--mtu" in flags else "1500"
    netvm_json(topology, guest_config, "ensure-host", "--mtu", mtu)
    doc = netvm_json(topology, guest_config, "attach", "vm-guest", "--for", "qemu", *flags)
    vm, vmm = doc["vm"], doc["vmm"]
    assert doc["tap"]["multi_queue"] is (queues > 1)
    if not glue.vhost_net_usable():
        assert not any("vhost=on" in arg for arg in vmm["args"]), vmm["args"]

    run = boot(
        guest_tools, initramfs, topology, vmm["args"], vmm["append"], internet_host, cpus=queues
    )

    seen = run.reports()
    gateway, internet = vm["gateway_ip"], str(topology.internet.ip)
    assert seen["ip_arg"] == vmm["append"].removeprefix("ip=")
    assert seen["mac"] == vm["guest_mac"]
    assert seen["address"] == f"{vm['guest_ip']}/{vm['prefixlen']}"
    assert seen["default_via"] == gateway
    assert seen["queues"] == str(queues), "the guest's NIC has one RX queue per queue pair"
    assert seen["mtu"] == mtu, "the guest's NIC has the bridge's MTU (1500: the control)"
    assert seen[f"ping:{gateway}"] == "ok"
    assert seen[f"ping:{internet}"] == "ok"
    assert seen[f"udp:{internet}:{internet_host.port}"] == "ok", "the reply came back"
    # NATed: the internet host saw the uplink's address, never the guest's.
    assert internet_host.seen() == [str(topology.uplink.ip)]
    # The host learnt the guest's address with netvm's MAC: the frames on the TAP carry it.
    assert neighbour_mac(topology.host_netns, vm["guest_ip"]) == vm["guest_mac"]


def test_negative_control_without_masquerade_the_internet_sees_the_private_address(
    guest_tools: GuestTools,
    initramfs: Path,
    topology: Topology,
    net: NetworkManager,
    host_backend: KernelBackend,
    internet_host: UdpEchoServer,
) -> None:
    tap = glue.tap_options_for("qemu")
    vm = net.attach("vm-nomasq", tap)
    assert net.choose_firewall().kind == "nftables"
    flush = ["nft", "flush", "chain", "inet", "netvm-nvbr0", "postrouting"]
    subprocess.run(["ip", "netns", "exec", topology.host_netns, *flush], check=True)

    run = boot(
        guest_tools, initramfs, topology, glue.qemu_args(vm, tap), vm.kernel_ip_arg(), internet_host
    )

    # The internet routes the private range back to the uplink, so the exchange completes,
    # but un-NATed: the check the positive test makes fails here.
    assert run.reports()[f"udp:{topology.internet.ip}:{internet_host.port}"] == "ok"
    assert internet_host.seen() == [str(vm.guest_ip)]
    assert internet_host.seen() != [str(topology.uplink.ip)]


def test_negative_control_a_guest_with_an_address_netvm_did_not_lease_reaches_nothing(
    guest_tools: GuestTools,
    initramfs: Path,
    topology: Topology,
    net: NetworkManager,
    internet_host: UdpEchoServer,
) -> None:
    tap = glue.tap_options_for("qemu")
    vm = net.attach("vm-wrong", tap)
    # A TEST-NET-2 address with its own gateway: nothing answers it on netvm's bridge.
    wrong = VmNetwork.for_slot("vm-wrong", ipaddress.IPv4Network("198.51.100.0/24"), 0)

    run = boot(
        guest_tools,
        initramfs,
        topology,
        glue.qemu_args(vm, tap),
        wrong.kernel_ip_arg(),
        internet_host,
    )

    seen = run.reports()
    assert seen["mac"] == vm.mac_string()
    assert seen["address"] == f"{wrong.guest_ip}/{wrong.prefixlen}"
    assert seen[f"ping:{wrong.gateway_ip}"] == "fail"
    assert seen[f"ping:{topology.internet.ip}"] == "fail"
    assert seen[f"udp:{topology.internet.ip}:{internet_host.port}"] == "fail"
    assert internet_host.seen() == []


def test_vhost_on_without_a_usable_vhost_net_makes_qemu_abort(
    guest_tools: GuestTools,
    initramfs: Path,
    topology: Topology,
    guest_config: NetworkConfig,
) -> None:
    """Why the glue probes /dev/vhost-net: `attach --vhost` forces `vhost=on`, and QEMU
    refuses it at start on a host without a usable /dev/vhost-net."""
    if glue.vhost_net_usable():
        pytest.skip("/dev/vhost-net is usable here: vhost=on is what the glue emits")
    netvm_json(topology, guest_config, "ensure-host")
    attach = ("attach", "vm-vhost", "--for", "qemu", "--multi-queue")
    by_default = netvm_json(topology, guest_config, *attach)["vmm"]
    forced = netvm_json(topology, guest_config, *attach, "--vhost")["vmm"]
    assert "vhost=on" not in by_default["args"][1]
    assert forced["args"][1] == by_default["args"][1].replace(",queues=", ",vhost=on,queues=")
    run = run_guest(
        guest_tools,
        initramfs,
        forced["args"],
        guest_cmdline(forced["append"]),
        netns=topology.host_netns,
        accel=ACCEL,
        timeout=60,
    )
    assert not run.timed_out, run.describe()
    assert run.returncode not in (0, None), run.describe()
    assert "vhost" in run.stderr, run.describe()
    assert "NETVM-GUEST" not in run.console
