"""An attacking guest on a multi-tenant host: each guarantee stops its attack.

Every attack is made twice: with the guarantee on it must fail, with it off it must succeed
(the negative control: the test can see the attack). Forged frames are written with an
AF_PACKET socket in the attacker's guest namespace, as a VM's kernel would put them on its
NIC. 198.51.100.0/24 is the "denied" network, an address of the internet namespace only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from netvm import ConfigError, KernelBackend, NetworkConfig, NetworkManager, naming
from netvm.naming import VmNetwork
from netvm.policy import OPEN, GuestPolicy
from netvm.testing import (
    FrameCapture,
    GuestEmulator,
    Topology,
    UdpEchoServer,
    ping,
    run_in_netns,
    snapshot,
    udp_request,
)
from tests.required import cannot_run

pytestmark = pytest.mark.privileged

DENIED = ipaddress.IPv4Interface("198.51.100.1/24")
FORGED_MAC = bytes.fromhex("026666666666")
BROADCAST = b"\xff" * 6
ETH_IP, ETH_ARP = 0x0800, 0x0806


@pytest.fixture
def nft_config(config: NetworkConfig) -> NetworkConfig:
    return dataclasses.replace(config, host_egress_iface="eth0", firewall="nftables")


@pytest.fixture
def host(nft_config: NetworkConfig, host_backend: KernelBackend) -> Iterator[NetworkManager]:
    with NetworkManager(nft_config, host_backend) as manager:
        manager.ensure_host()
        yield manager


def guest(net: NetworkManager, vm_id: str, policy: GuestPolicy | None = None) -> GuestEmulator:
    vm = net.attach(vm_id, policy=policy)
    assert isinstance(net.backend, KernelBackend)
    return GuestEmulator(vm, net.backend.netns, mtu=net.config.mtu)


# Frames -------------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def udp_frame(
    src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int, payload: bytes
) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_IP) + header + udp


def arp_reply(sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 2)
    body += sender_mac + ipaddress.IPv4Address(sender_ip).packed
    body += target_mac + ipaddress.IPv4Address(target_ip).packed
    return target_mac + sender_mac + struct.pack("!H", ETH_ARP) + body


def send(g: GuestEmulator, frame: bytes, times: int = 3) -> None:
    def run() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind(("eth0", 0))
            for _ in range(times):
                sock.send(frame)

    run_in_netns(g.netns, run)


def bridge_mac(net: NetworkManager) -> bytes:
    assert isinstance(net.backend, KernelBackend)

    def read() -> bytes:
        with IPRoute() as ipr:
            (link,) = ipr.link("get", ifname=net.config.bridge_name)
            return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))

    return run_in_netns(net.backend.netns, read)


def neighbour(netns: str, ip: ipaddress.IPv4Address) -> bytes | None:
    def read() -> bytes | None:
        with IPRoute() as ipr:
            for entry in ipr.get_neighbours(family=socket.AF_INET, dst=str(ip)):
                lladdr = entry.get_attr("NDA_LLADDR")
                if lladdr:
                    return bytes.fromhex(lladdr.replace(":", ""))
        return None

    return run_in_netns(netns, read)


def arrives(server: UdpEchoServer, before: int, port: int | None = None) -> bool:
    """Whether a datagram (from source `port`, if given) reaches `server` within 1 s after
    its first `before` ones. `send` sends each frame three times: a check that follows
    another must name its port, or a late copy of the one before counts for it."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if any(port in (None, p) for _, p in server.peers[before:]):
            return True
        time.sleep(0.02)
    return False


ON_OFF = pytest.mark.parametrize("on", [True, False], ids=["guarantee-on", "control-off"])


# Anti-spoofing ------------------------------------------------------------------------------


@ON_OFF
def test_a_forged_source_mac_reaches_no_one(host: NetworkManager, on: bool) -> None:
    with (
        guest(host, "attacker", GuestPolicy() if on else OPEN) as a,
        guest(host, "victim") as b,
        FrameCapture(b.netns, "eth0") as seen,
    ):
        vm = a.network
        forged = udp_frame(
            FORGED_MAC, BROADCAST, str(vm.guest_ip), "192.0.2.255", 9999, 9999, b"forged-mac"
        )
        honest = udp_frame(
            vm.guest_mac, BROADCAST, str(vm.guest_ip), "192.0.2.255", 9999, 9999, b"honest"
        )
        send(a, forged)
        send(a, honest)
        time.sleep(0.3)
    sources = {frame.source for frame in seen.received()}
    assert vm.guest_mac in sources, "the honest frame arrives: the path works"
    assert (FORGED_MAC in sources) is not on


@ON_OFF
def test_a_forged_source_address_does_not_get_out(
    host: NetworkManager, topology: Topology, internet_host: UdpEchoServer, on: bool
) -> None:
    with guest(host, "attacker", GuestPolicy() if on else OPEN) as a:
        gateway = bridge_mac(host)  # after the attach: a bridge takes its ports' lowest MAC
        vm = a.network
        server = str(internet_host.address)
        before = len(internet_host.peers)
        send(
            a,
            udp_frame(
                vm.guest_mac, gateway, str(vm.guest_ip), server, 4000, internet_host.port, b"x"
            ),
        )
        assert arrives(internet_host, before, 4000), "the honest datagram gets out: the path works"
        send(
            a,
            udp_frame(vm.guest_mac, gateway, "192.0.2.200", server, 4001, internet_host.port, b"y"),
        )
        # Masquerade keeps the source port (no other flow has it): 4001 is the forged one's.
        assert arrives(internet_host, before, 4001) is not on, internet_host.peers


@ON_OFF
def test_an_arp_reply_claiming_the_gateway_poisons_no_neighbour(
    host: NetworkManager, on: bool
) -> None:
    with (
        guest(host, "attacker", GuestPolicy() if on else OPEN) as a,
        guest(host, "victim") as b,
    ):
        gateway_ip = b.network.gateway_ip
        assert b.ping(gateway_ip)
        real = neighbour(b.netns, gateway_ip)
        assert real == bridge_mac(host)
        time.sleep(1.2)  # past the neighbour entry's locktime, so a reply may override it
        send(
            a,
            arp_reply(
                a.network.guest_mac, str(gateway_ip), b.network.guest_mac, str(b.network.guest_ip)
            ),
        )
        time.sleep(0.2)
        poisoned = neighbour(b.netns, gateway_ip) == a.network.guest_mac
    assert poisoned is not on


@ON_OFF
def test_a_dhcp_offer_reaches_no_neighbour(host: NetworkManager, on: bool) -> None:
    with (
        guest(host, "attacker", GuestPolicy() if on else OPEN) as a,
        guest(host, "victim") as b,
        UdpEchoServer(b.netns, "0.0.0.0", 68) as client,
    ):
        vm = a.network
        offer = udp_frame(
            vm.guest_mac, BROADCAST, str(vm.guest_ip), "255.255.255.255", 67, 68, b"offer"
        )
        send(a, offer)
        assert arrives(client, 0) is not on


# Isolation ----------------------------------------------------------------------------------


def _route_via_gateway(g: GuestEmulator, other: VmNetwork, gateway_mac: bytes) -> None:
    """Make `g` send to `other` through the gateway (its MAC), as a guest that wants the
    host to route for it would."""

    def run() -> None:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname="eth0")[0]
            mac = ":".join(f"{octet:02x}" for octet in gateway_mac)
            ipr.neigh("replace", dst=str(other.guest_ip), lladdr=mac, ifindex=index, state=0x80)

    run_in_netns(g.netns, run)


@ON_OFF
def test_an_isolated_vm_reaches_no_neighbour(
    host: NetworkManager, topology: Topology, internet_host: UdpEchoServer, on: bool
) -> None:
    with (
        guest(host, "attacker", GuestPolicy.of(isolated=on)) as a,
        guest(host, "neighbour") as b,
    ):
        assert a.ping(a.network.gateway_ip), "the gateway stays reachable"
        assert a.udp_request(internet_host.address, internet_host.port, b"out") == b"out"
        assert a.ping(b.network.guest_ip) is not on, "layer 2"
        assert b.ping(a.network.guest_ip) is not on, "layer 2, towards it"
        _route_via_gateway(a, b.network, bridge_mac(host))
        assert a.ping(b.network.guest_ip) is not on, "layer 3, through the gateway"
        _route_via_gateway(b, a.network, bridge_mac(host))
        assert b.ping(a.network.guest_ip) is not on, "layer 3, towards it"
        link = host.backend.get_link(a.network.tap_name)
        assert link is not None
        assert link.isolated is on


def test_two_isolated_vms_are_apart_also_by_the_kernels_port_flag(host: NetworkManager) -> None:
    """With netvm's nftables tables gone, the kernel's port isolation still holds between
    two isolated ports (and not between two plain ones: the control). Both tables: with
    br_netfilter, the inet table's drop to isolated addresses sees bridged frames too."""
    isolated = GuestPolicy.of(isolated=True)
    with guest(host, "a", isolated) as a, guest(host, "b", isolated) as b:
        firewall = host.backend.firewall("nftables")
        assert hasattr(firewall, "_run")
        for family in ("bridge", "inet"):
            table = {"family": family, "name": "netvm-nvbr0"}
            firewall._run([{"delete": {"table": table}}], "test", None)
        assert not a.ping(b.network.guest_ip)
        host.backend.set_port_isolated(a.network.tap_name, False)
        # A few tries: the failed ping above left b's neighbour entry unresolved in a, and
        # the kernel may drop the next packet while it resolves it again.
        assert any(a.ping(b.network.guest_ip) for _ in range(3))


# Egress -------------------------------------------------------------------------------------


@pytest.fixture
def denied_host(topology: Topology) -> Iterator[UdpEchoServer]:
    """A second internet host, 198.51.100.1, on the internet namespace's loopback."""

    def add() -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.addr("add", index=lo, address=str(DENIED.ip), prefixlen=32)

    run_in_netns(topology.internet_netns, add)
    with UdpEchoServer(topology.internet_netns, DENIED.ip) as server:
        yield server


@ON_OFF
def test_a_denied_network_is_out_of_reach(
    host: NetworkManager, internet_host: UdpEchoServer, denied_host: UdpEchoServer, on: bool
) -> None:
    policy = GuestPolicy.of(egress_deny=["198.51.100.0/24"] if on else [])
    with guest(host, "vm", policy) as g:
        assert g.udp_request(internet_host.address, internet_host.port, b"ok") == b"ok"
        reached = g.udp_request(denied_host.address, denied_host.port, b"no") == b"no"
    assert reached is not on


@pytest.mark.parametrize("restored", [True, False], ids=["given-back", "control-not-given-back"])
def test_a_flushed_ruleset_gives_a_vm_its_guarantees_back_at_ensure_host(
    host: NetworkManager,
    internet_host: UdpEchoServer,
    denied_host: UdpEchoServer,
    restored: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`nft flush ruleset` (the nftables service restarted) takes netvm's tables with the
    VM's elements; the next ensure_host makes the tables and gives the VM its policy back.
    The control skips the giving back, as netvm did before: the denied network is reached."""
    policy = GuestPolicy.of(egress_deny=["198.51.100.0/24"])
    with guest(host, "vm", policy) as g:
        assert g.udp_request(denied_host.address, denied_host.port, b"no") != b"no"
        assert isinstance(host.backend, KernelBackend)
        flush = ["ip", "netns", "exec", str(host.backend.netns), "nft", "flush", "ruleset"]
        subprocess.run(flush, check=True)
        if not restored:
            monkeypatch.setattr(host, "_restore_guarantees", lambda: None)
        host.ensure_host()
        assert g.udp_request(internet_host.address, internet_host.port, b"ok") == b"ok"
        reached = g.udp_request(denied_host.address, denied_host.port, b"no") == b"no"
        kept = {a.vm_id: a.policy for a in host.list()}
    assert reached is not restored
    assert (kept["vm"] == policy) is restored


@ON_OFF
def test_an_allow_list_is_all_a_vm_reaches(
    host: NetworkManager, internet_host: UdpEchoServer, denied_host: UdpEchoServer, on: bool
) -> None:
    policy = GuestPolicy.of(egress_allow=["203.0.113.0/24:udp"] if on else [])
    with guest(host, "vm", policy) as g:
        assert g.udp_request(internet_host.address, internet_host.port, b"ok") == b"ok"
        assert g.ping(g.network.gateway_ip), "the gateway is not beyond the gateway"
        assert g.ping(internet_host.address) is not on, "icmp is not on the list"
        reached = g.udp_request(denied_host.address, denied_host.port, b"no") == b"no"
    assert reached is not on


VIP = "203.0.113.80"
"""A service address the host's own prerouting DNATs (kube-proxy's, Docker's published
ports): in the host namespace only."""


@pytest.mark.parametrize("on", [True, False], ids=["deny-holds", "control-no-deny"])
def test_a_host_dnat_carries_no_vm_past_its_deny_list(
    host: NetworkManager, topology: Topology, denied_host: UdpEchoServer, on: bool
) -> None:
    """A connection the host DNATs has `ct status dnat` in both directions: netvm's accept
    of port forwards' replies must not let its original direction pass the VM's lists."""
    rule = (
        "add table ip vip; add chain ip vip pre { type nat hook prerouting priority -100; }; "
        f"add rule ip vip pre ip daddr {VIP} udp dport 7 dnat to {denied_host.address}:"
        f"{denied_host.port}"
    )
    subprocess.run(["ip", "netns", "exec", topology.host_netns, "nft", rule], check=True)
    policy = GuestPolicy.of(egress_deny=["198.51.100.0/24"] if on else [])
    with guest(host, "vm", policy) as g:
        reached = g.udp_request(VIP, 7, b"via") == b"via"
    assert reached is not on


# Port forwards ------------------------------------------------------------------------------


@ON_OFF
def test_a_port_forward_reaches_the_vm_from_the_internet(
    host: NetworkManager, topology: Topology, on: bool
) -> None:
    policy = GuestPolicy.of(port_forwards=["8080:7/udp"] if on else [])
    with guest(host, "vm", policy) as g, UdpEchoServer(g.netns, "0.0.0.0", 7) as service:
        reply = udp_request(topology.internet_netns, topology.uplink.ip, 8080, b"in", timeout=1.0)
        assert (reply == b"in") is on
        if on:
            assert service.seen() == [str(topology.internet.ip)], "the client's own address"
            assert not ping(topology.internet_netns, g.network.guest_ip), "no route in otherwise"


def test_detach_removes_the_forward(host: NetworkManager, topology: Topology) -> None:
    policy = GuestPolicy.of(port_forwards=["8080:7/udp"], isolated=True)
    before = snapshot(host.backend)
    with guest(host, "vm", policy) as g, UdpEchoServer(g.netns, "0.0.0.0", 7):
        assert udp_request(topology.internet_netns, topology.uplink.ip, 8080, b"in") == b"in"
        host.detach("vm")
        assert udp_request(topology.internet_netns, topology.uplink.ip, 8080, b"in") is None
    host.gc()
    assert snapshot(host.backend) == before


# The legacy firewall ------------------------------------------------------------------------


def test_the_iptables_firewall_refuses_guarantees_and_leaves_nothing(
    nft_config: NetworkConfig, host_backend: KernelBackend
) -> None:
    config = dataclasses.replace(nft_config, firewall="iptables")
    with NetworkManager(config, host_backend) as net:
        net.ensure_host()
        before = snapshot(host_backend)
        with pytest.raises(ConfigError, match="isolated needs the nftables firewall"):
            net.attach("vm", policy=GuestPolicy.of(anti_spoof=False, isolated=True))
        assert snapshot(host_backend) == before
        net.attach("vm")  # the default asks for nothing the legacy tables cannot give
        assert [a.policy for a in net.list()] == [None]


# What an attacker tries next: tags, malformed ARP, IPv6, fragments, floods ------------------

MARK = bytes.fromhex("030000000001")
"""A multicast destination no one else uses: the bridge floods it to every port, and a frame
captured with it is one the test sent."""
ETH_IPV6, ETH_8021Q, ETH_8021AD = 0x86DD, 0x8100, 0x88A8


def tagged(frame: bytes, *tags: tuple[int, int]) -> bytes:
    """`frame` with VLAN tags (TPID, VID) after its addresses, outermost first."""
    inserted = b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in tags)
    return frame[:12] + inserted + frame[12:]


def arp_frame(
    eth_source: bytes, op: int, sender_mac: bytes, sender_ip: str, target_ip: str
) -> bytes:
    body = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, op)
    body += sender_mac + ipaddress.IPv4Address(sender_ip).packed
    body += b"\0" * 6 + ipaddress.IPv4Address(target_ip).packed
    return BROADCAST + eth_source + struct.pack("!H", ETH_ARP) + body


def ipv6_frame(source_mac: bytes, destination_mac: bytes) -> bytes:
    """A UDP datagram from fe80::1 to ff02::1 (checksum left 0: the test only counts it)."""
    udp = struct.pack("!HHHH", 4000, 4000, 12, 0) + b"ipv6"
    header = struct.pack("!IHBB", 6 << 28, len(udp), socket.IPPROTO_UDP, 64)
    header += socket.inet_pton(socket.AF_INET6, "fe80::1")
    header += socket.inet_pton(socket.AF_INET6, "ff02::1")
    return destination_mac + source_mac + struct.pack("!H", ETH_IPV6) + header + udp


def fragments(frame: bytes, size: int = 16) -> list[bytes]:
    """An untagged IPv4 frame (20-byte header) cut into fragments of `size` payload bytes."""
    ethernet, header, payload = frame[:14], frame[14:34], frame[34:]
    found = []
    for offset in range(0, len(payload), size):
        more = offset + size < len(payload)
        part = payload[offset : offset + size]
        fixed = bytearray(header)
        struct.pack_into("!H", fixed, 2, 20 + len(part))
        struct.pack_into("!H", fixed, 4, 0x1234)
        struct.pack_into("!H", fixed, 6, (0x2000 if more else 0) | offset // 8)
        struct.pack_into("!H", fixed, 10, 0)
        struct.pack_into("!H", fixed, 10, _checksum(bytes(fixed)))
        found.append(ethernet + bytes(fixed) + part)
    return found


def marked(seen: FrameCapture, source: bytes, ethertype: int | None = None) -> int:
    return sum(
        1
        for frame in seen.received()
        if frame.destination == MARK
        and frame.source == source
        and (ethertype is None or frame.ethertype == ethertype)
    )


@ON_OFF
def test_vlan_tagged_frames_reach_no_neighbour(host: NetworkManager, on: bool) -> None:
    """802.1Q and QinQ frames with the guest's own MAC and address: anti-spoofing lets
    through untagged IPv4 and ARP only (the kernel takes a tag off before the bridge, so
    a rule that tests only the skb's protocol would see the inner IPv4)."""
    with (
        guest(host, "attacker", GuestPolicy() if on else OPEN) as a,
        guest(host, "victim") as b,
        FrameCapture(b.netns, "eth0") as seen,
        UdpEchoServer(b.netns, "0.0.0.0", 9999) as listener,
    ):
        vm = a.network
        inner = udp_frame(vm.guest_mac, MARK, str(vm.guest_ip), "192.0.2.255", 9, 9, b"tag")
        # VID 0 (a priority tag): the victim's kernel strips it and takes the datagram.
        priority = udp_frame(
            vm.guest_mac, BROADCAST, str(vm.guest_ip), "192.0.2.255", 9, 9999, b"prio"
        )
        send(a, tagged(priority, (ETH_8021Q, 0)))
        send(a, tagged(inner, (ETH_8021AD, 5), (ETH_8021Q, 7)))
        send(a, udp_frame(vm.guest_mac, MARK, str(vm.guest_ip), "192.0.2.255", 9, 9, b"ok"))
        time.sleep(0.3)
        delivered = arrives(listener, 0)
    assert marked(seen, vm.guest_mac, ETH_IP) >= 1, "the untagged frame arrives: the path works"
    assert (marked(seen, vm.guest_mac, ETH_8021Q) > 0) is not on, "QinQ: the inner tag shows"
    assert delivered is not on, "802.1Q priority tag"


@pytest.mark.parametrize("forgery", ["sender-mac", "gratuitous"])
@ON_OFF
def test_a_forged_arp_poisons_no_neighbour(host: NetworkManager, on: bool, forgery: str) -> None:
    """The frame's source MAC is the guest's own in both: an ARP reply whose sender MAC is
    another's, and a gratuitous ARP request for the gateway's address."""
    with (
        guest(host, "attacker", GuestPolicy() if on else OPEN) as a,
        guest(host, "victim") as b,
    ):
        vm = a.network
        gateway_ip = b.network.gateway_ip
        assert b.ping(vm.guest_ip)
        assert b.ping(gateway_ip)
        time.sleep(1.2)  # past the neighbour entries' locktime
        if forgery == "sender-mac":
            claimed, expected = vm.guest_ip, FORGED_MAC
            frame = arp_frame(vm.guest_mac, 2, FORGED_MAC, str(vm.guest_ip), str(gateway_ip))
        else:
            claimed, expected = gateway_ip, vm.guest_mac
            frame = arp_frame(vm.guest_mac, 1, vm.guest_mac, str(gateway_ip), str(gateway_ip))
        send(a, frame)
        time.sleep(0.2)
        poisoned = neighbour(b.netns, claimed) == expected
    assert poisoned is not on


@ON_OFF
def test_an_arp_of_another_layout_leaves_no_tap(host: NetworkManager, on: bool) -> None:
    """An ARP with a hardware length of 8 whose bytes, read at the offsets of length 6 (as
    nft reads them), are the guest's own MAC and address: a receiver that honours the
    length reads other fields. Anti-spoofing passes only Ethernet/IPv4 ARP."""
    with (
        guest(host, "attacker", GuestPolicy() if on else OPEN) as a,
        guest(host, "victim") as b,
        FrameCapture(b.netns, "eth0") as seen,
    ):
        vm = a.network
        body = struct.pack("!HHBBH", 1, ETH_IP, 8, 4, 2) + vm.guest_mac + vm.guest_ip.packed
        body += b"\0" * 8 + b.network.guest_ip.packed
        send(a, MARK + vm.guest_mac + struct.pack("!H", ETH_ARP) + body)
        send(a, arp_frame(vm.guest_mac, 1, vm.guest_mac, str(vm.guest_ip), str(vm.guest_ip)))
        time.sleep(0.3)
    honest = [f for f in seen.received() if f.source == vm.guest_mac and f.destination == BROADCAST]
    assert honest, "the guest's own gratuitous ARP arrives: the path works"
    assert (marked(seen, vm.guest_mac, ETH_ARP) > 0) is not on


@ON_OFF
def test_guest_ipv6_is_dropped_under_anti_spoofing(host: NetworkManager, on: bool) -> None:
    """netvm is IPv4-only: with anti-spoofing, which cannot check IPv6 sources, a guest's
    IPv6 is dropped; without it, it passes (docs/firewall.md)."""
    with (
        guest(host, "attacker", GuestPolicy() if on else OPEN) as a,
        guest(host, "victim") as b,
        FrameCapture(b.netns, "eth0") as seen,
    ):
        vm = a.network
        send(a, ipv6_frame(vm.guest_mac, MARK))
        send(a, udp_frame(vm.guest_mac, MARK, str(vm.guest_ip), "192.0.2.255", 9, 9, b"ok"))
        time.sleep(0.3)
    assert marked(seen, vm.guest_mac, ETH_IP) >= 1, "IPv4 arrives: the path works"
    assert (marked(seen, vm.guest_mac, ETH_IPV6) > 0) is not on


@ON_OFF
def test_a_fragmented_dhcp_offer_reaches_no_neighbour(host: NetworkManager, on: bool) -> None:
    """The first fragment carries the UDP header (source port 67) and is dropped; the
    others alone do not make a datagram."""
    with (
        guest(host, "attacker", GuestPolicy() if on else OPEN) as a,
        guest(host, "victim") as b,
        UdpEchoServer(b.netns, "0.0.0.0", 68) as client,
    ):
        vm = a.network
        offer = udp_frame(
            vm.guest_mac, BROADCAST, str(vm.guest_ip), "255.255.255.255", 67, 68, b"o" * 40
        )
        for fragment in fragments(offer):
            send(a, fragment, times=1)
        assert arrives(client, 0) is not on


@ON_OFF
def test_an_isolated_vm_floods_no_neighbour(host: NetworkManager, on: bool) -> None:
    """Broadcast and multicast from an isolated VM reach no other VM."""
    with (
        guest(host, "attacker", GuestPolicy.of(isolated=on)) as a,
        guest(host, "neighbour") as b,
        FrameCapture(b.netns, "eth0") as seen,
        UdpEchoServer(b.netns, "0.0.0.0", 9999) as listener,
    ):
        vm = a.network
        send(a, udp_frame(vm.guest_mac, BROADCAST, str(vm.guest_ip), "192.0.2.255", 9, 9999, b"b"))
        send(a, udp_frame(vm.guest_mac, MARK, str(vm.guest_ip), "224.0.0.251", 9, 9, b"m"))
        time.sleep(0.3)
        assert arrives(listener, 0) is not on, "subnet broadcast"
    assert (marked(seen, vm.guest_mac) > 0) is not on, "L2 multicast"


def test_a_changed_policy_takes_effect_on_attach_again(host: NetworkManager) -> None:
    """Attaching a running VM again with another policy replaces its guarantees: the old
    ones no longer hold, the new ones do."""
    with guest(host, "vm", GuestPolicy.of(isolated=True)) as a, guest(host, "neighbour") as b:
        assert not a.ping(b.network.guest_ip)
        host.attach("vm", policy=GuestPolicy())
        # The failed ping left an ARP resolution under way (a probe a second): wait for it.
        assert a.ping(b.network.guest_ip, timeout=3.0), "no longer isolated"
        link = host.backend.get_link(a.network.tap_name)
        assert link is not None
        assert not link.isolated
        host.attach("vm", policy=GuestPolicy.of(isolated=True))
        assert not a.ping(b.network.guest_ip), "isolated again"
        (listed,) = [x for x in host.list() if x.vm_id == "vm"]
        assert listed.policy == GuestPolicy.of(isolated=True)


# Frames to the 802.1D link-local addresses ---------------------------------------------------

LLDP_ADDRESS = bytes.fromhex("0180c200000e")
"""The kernel would hand a frame to it to the TAP's own stack without any bridge hook."""
EAPOL_ADDRESS = bytes.fromhex("0180c2000003")
"""The kernel would hand a frame to it to the TAP's own stack after the bridge input hook."""
LINK_LOCAL = pytest.mark.parametrize(
    "address", [LLDP_ADDRESS, EAPOL_ADDRESS], ids=["lldp-address", "eapol-address"]
)


@LINK_LOCAL
@ON_OFF
def test_a_link_local_frame_with_a_forged_source_reaches_no_host_service(
    host: NetworkManager, topology: Topology, address: bytes, on: bool
) -> None:
    """A frame to a link-local address takes another way into the host than prerouting's
    anti_spoof: it must not carry a forged source to a service of the host (the gateway's
    address or the egress's). The input hook drops such frames from every netvm TAP (its
    port group) and from guarded ones: the control is a VM without anti-spoofing whose TAP
    was taken out of the group."""
    with (
        guest(host, "attacker", GuestPolicy() if on else OPEN) as a,
        # open: a guarded neighbour's address no port but its own may use at all
        guest(host, "neighbour", OPEN) as b,
        UdpEchoServer(topology.host_netns, "0.0.0.0", 9003) as service,
    ):
        if not on:
            tap = a.network.tap_name
            subprocess.run(
                ["ip", "-n", topology.host_netns, "link", "set", tap, "group", "0"], check=True
            )
        vm, forged = a.network, str(b.network.guest_ip)
        gateway = str(host.config.gateway.ip)
        send(a, udp_frame(vm.guest_mac, address, forged, gateway, 5002, 9003, b"x"))
        assert arrives(service, 0) is not on, "a neighbour's address, to the gateway"
        send(a, udp_frame(FORGED_MAC, address, "198.51.100.9", "203.0.113.2", 5003, 9003, b"y"))
        assert arrives(service, 0, 5003) is not on, "another MAC and address, to the egress"


def _port_of(netns: str, mac: bytes) -> str | None:
    """The bridge port the kernel's forwarding database has learnt `mac` on."""
    shown = ":".join(f"{octet:02x}" for octet in mac)
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "bridge", "fdb", "show", "br", "nvbr0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        words = line.split()
        if words and words[0] == shown and "dev" in words:
            return words[words.index("dev") + 1]
    return None


@pytest.mark.parametrize("on", [True, False], ids=["netvm-bridge", "control-kernel-defaults"])
def test_a_link_local_frame_takes_no_neighbours_mac(
    host: NetworkManager, topology: Topology, on: bool
) -> None:
    """One frame to LLDP's address with a neighbour's MAC as source would move that MAC to
    the attacker's port (the host's traffic to the neighbour then goes to the attacker).
    The control gives the bridge the kernel's defaults back (no group_fwd_mask, learning
    from link-local frames)."""
    netns = topology.host_netns
    with guest(host, "attacker") as a, guest(host, "victim") as b:
        assert b.ping(b.network.gateway_ip)
        assert _port_of(netns, b.network.guest_mac) == b.network.tap_name
        if not on:
            subprocess.run(
                [
                    *("ip", "netns", "exec", netns, "ip", "link", "set", "nvbr0"),
                    *("type", "bridge", "group_fwd_mask", "0", "no_linklocal_learn", "0"),
                ],
                check=True,
            )
        victim = b.network
        frame = udp_frame(
            victim.guest_mac, LLDP_ADDRESS, str(victim.guest_ip), "192.0.2.1", 9, 9, b"t"
        )
        send(a, frame)
        time.sleep(0.2)
        taken = _port_of(netns, victim.guest_mac) == a.network.tap_name
        assert taken is not on


def _hairpin_rules(host: NetworkManager) -> list[int]:
    """Handles of netvm's drop of routed bridge-to-bridge packets to an isolated VM."""
    firewall = host.backend.firewall("nftables")
    assert hasattr(firewall, "_run")
    listed = firewall._run(
        [{"list": {"chain": {"family": "inet", "table": "netvm-nvbr0", "name": "forward"}}}],
        "test",
        None,
    )
    found = []
    for item in listed:
        rule = item.get("rule")
        if rule is None:
            continue
        text = str(rule["expr"])
        if "'oifname'" in text and "isolated_addrs" in text and "'drop'" in text:
            found.append(int(rule["handle"]))
    return found


@pytest.mark.parametrize("source", ["203.0.113.77", "198.51.100.5"])
@pytest.mark.parametrize("on", [True, False], ids=["rules-on", "control-rules-removed"])
def test_a_neighbour_without_anti_spoofing_reaches_no_isolated_vm_through_the_gateway(
    host: NetworkManager, source: str, on: bool
) -> None:
    """An open VM sends to an isolated one through the gateway with a source outside the
    subnet: the host must not route it there. The control deletes netvm's rule that stops
    it. (With the gateway's address as source the kernel drops it as a martian.)"""
    with (
        guest(host, "attacker", OPEN) as a,
        guest(host, "isolated", GuestPolicy.of(isolated=True)) as b,
        UdpEchoServer(b.netns, "0.0.0.0", 9004) as listener,
    ):
        if not on:
            rules = _hairpin_rules(host)
            assert len(rules) == 1
            for handle in rules:
                firewall = host.backend.firewall("nftables")
                assert hasattr(firewall, "_run")
                ref = {"family": "inet", "table": "netvm-nvbr0", "chain": "forward"}
                firewall._run([{"delete": {"rule": {**ref, "handle": handle}}}], "test", None)
        forged = str(host.config.gateway.ip) if source == "gateway" else source
        target = str(b.network.guest_ip)
        send(a, udp_frame(a.network.guest_mac, bridge_mac(host), forged, target, 7, 9004, b"i"))
        assert arrives(listener, 0) is not on


@pytest.mark.parametrize("on", [True, False], ids=["victim-guarded", "control-victim-open"])
def test_a_neighbour_without_anti_spoofing_cannot_take_a_guarded_vms_traffic(
    host: NetworkManager, topology: Topology, on: bool
) -> None:
    """A VM with no guarantees forges a guarded VM's MAC (the bridge would learn it on
    the attacker's port) and claims its address by ARP (the host would send it the
    victim's traffic). The guarded VM's MAC and address are its own TAP's only; the
    control leaves the victim open, and both forgeries take."""
    netns = topology.host_netns
    with (
        guest(host, "attacker", OPEN) as a,
        guest(host, "victim", GuestPolicy() if on else OPEN) as b,
    ):
        victim = b.network
        assert b.ping(victim.gateway_ip)
        assert _port_of(netns, victim.guest_mac) == victim.tap_name
        ip = str(victim.guest_ip)
        forged = udp_frame(victim.guest_mac, BROADCAST, ip, "192.0.2.255", 9, 9, b"m")
        moved = False
        for _ in range(5):  # the victim's own frames (its IPv6 chatter) may move it back
            send(a, forged, times=1)
            moved = moved or _port_of(netns, victim.guest_mac) == a.network.tap_name
        assert moved is not on, "the MAC"
        time.sleep(1.2)  # past the host's neighbour entry locktime
        claim = arp_frame(
            a.network.guest_mac,
            2,
            a.network.guest_mac,
            str(victim.guest_ip),
            str(victim.gateway_ip),
        )
        send(a, claim)
        time.sleep(0.2)
        taken = neighbour(netns, victim.guest_ip) == a.network.guest_mac
        assert taken is not on, "the address"


# The host's IPv6: router advertisements ------------------------------------------------------

ALL_NODES = bytes.fromhex("333300000001")
"""ff02::1's MAC: to the bridge device, whose accept_ra netvm keeps 0."""
LACP_ADDRESS = bytes.fromhex("0180c2000002")
"""A link-local address the kernel passes up on the TAP itself (group_fwd_mask cannot
forward it): to the TAP's own IPv6, stopped by the bridge input hook's port-group drop."""


def router_advertisement(source_mac: bytes, destination_mac: bytes) -> bytes:
    """An RA from fe80::6e:1 to ff02::1: router lifetime 1800 s, prefix 2001:db8:bad::/64."""
    source = socket.inet_pton(socket.AF_INET6, "fe80::6e:1")
    destination = socket.inet_pton(socket.AF_INET6, "ff02::1")
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    body += struct.pack("!BB6s", 1, 1, source_mac)  # source link-layer address
    body += struct.pack(
        "!BBBBIII16s",
        3,
        4,
        64,
        0xC0,
        86400,
        14400,
        0,
        socket.inet_pton(socket.AF_INET6, "2001:db8:bad::"),
    )
    pseudo = source + destination + struct.pack("!IxxxB", len(body), socket.IPPROTO_ICMPV6)
    padded = pseudo + body + b"\0" * (len(body) % 2)
    body = body[:2] + struct.pack("!H", _checksum(padded)) + body[4:]
    header = struct.pack("!IHBB", 6 << 28, len(body), socket.IPPROTO_ICMPV6, 255)
    frame = destination_mac + source_mac + struct.pack("!H", ETH_IPV6)
    return frame + header + source + destination + body


def default_route6(netns: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, "-6", "route", "show", "default"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.parametrize("way", [ALL_NODES, LACP_ADDRESS], ids=["to-the-bridge", "to-the-tap"])
@pytest.mark.parametrize("on", [True, False], ids=["netvm", "control-undone"])
def test_a_router_advertisement_from_a_vm_gives_the_host_no_route(
    host: NetworkManager, topology: Topology, way: bytes, on: bool
) -> None:
    """Any VM, one without anti-spoofing too (a router VM's radvd, say): the host must not
    route its IPv6 through the guest. The control undoes what stops each way: accept_ra
    back on the bridge, the TAP out of its port group."""
    netns = topology.host_netns
    assert default_route6(netns) == ""
    with guest(host, "router", OPEN) as a:
        if not on and way == ALL_NODES:
            path = f"/proc/sys/net/ipv6/conf/{host.config.bridge_name}/accept_ra"
            subprocess.run(
                ["ip", "netns", "exec", netns, "sh", "-c", f"echo 1 > {path}"], check=True
            )
        if not on and way == LACP_ADDRESS:
            tap = a.network.tap_name
            subprocess.run(["ip", "-n", netns, "link", "set", tap, "group", "0"], check=True)
        send(a, router_advertisement(a.network.guest_mac, way))
        deadline = time.monotonic() + 1.5
        while not default_route6(netns) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bool(default_route6(netns)) is not on


# A forward's peers, taken by a neighbour's first datagram -----------------------------------


def _bound(netns: str, address: str, port: int) -> socket.socket:
    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.settimeout(0.3)
        return sock

    return run_in_netns(netns, bind)


def _received(sock: socket.socket) -> int:
    count = 0
    try:
        while True:
            sock.recvfrom(100)
            count += 1
    except TimeoutError:
        return count


@pytest.mark.parametrize("on", [True, False], ids=["netvm", "control-guard-flushed"])
def test_a_neighbour_sending_first_from_a_forwarded_port_takes_none_of_its_peers(
    host: NetworkManager, topology: Topology, on: bool
) -> None:
    """Masquerade keeps a guest's source port: B's datagram from host port 8080 (A's forward)
    to a peer would make the peer's later datagrams to 8080 replies of B's connection. netvm
    drops such a datagram after srcnat (the masquerade_guard chain); the control flushes it."""
    peer_port = 5353
    policy = GuestPolicy.of(port_forwards=["8080:9000/udp"])
    with (
        guest(host, "a", policy) as a,
        guest(host, "b", GuestPolicy.of(isolated=True)) as b,
        UdpEchoServer(a.netns, "0.0.0.0", 9000) as service,
    ):
        if not on:
            flush = "flush chain inet netvm-nvbr0 masquerade_guard"
            subprocess.run(["ip", "netns", "exec", topology.host_netns, "nft", flush], check=True)
        taker = _bound(b.netns, "0.0.0.0", 8080)
        peer = _bound(topology.internet_netns, str(topology.internet.ip), peer_port)
        try:
            taker.sendto(b"first", (str(topology.internet.ip), peer_port))
            time.sleep(0.2)
            for _ in range(3):
                peer.sendto(b"to-a", (str(topology.uplink.ip), 8080))
            time.sleep(0.3)
            taken = _received(taker)
        finally:
            taker.close()
            peer.close()
        assert (taken > 0) is not on
        assert (len(service.peers) > 0) is on


# The next VM at an address inherits nothing of the last one's connections -----------------


@pytest.mark.parametrize("on", [True, False], ids=["netvm", "control-connections-kept"])
def test_a_vm_given_a_detached_vms_address_gets_none_of_its_flows(
    host: NetworkManager, topology: Topology, on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old tenant's forwarded flow lives on in conntrack after its detach (each datagram
    refreshes it): the next VM at its address, asking for no forward, would receive it.
    netvm deletes the address's connections before it is another VM's; the control keeps
    them."""
    if not on:
        monkeypatch.setattr(host.backend, "forget_connections", lambda address: None)
    peer = _bound(topology.internet_netns, str(topology.internet.ip), 5555)
    try:
        forward = GuestPolicy.of(port_forwards=["8080:9000/udp"])
        with guest(host, "tenant", forward) as old, UdpEchoServer(old.netns, "0.0.0.0", 9000):
            peer.sendto(b"to-old", (str(topology.uplink.ip), 8080))
            assert peer.recvfrom(100)[0] == b"to-old", "the forward works"
            address = old.network.guest_ip
        host.detach("tenant")
        with guest(host, "tenant") as new:
            assert new.network.guest_ip == address, "the same address again"
            with UdpEchoServer(new.netns, "0.0.0.0", 9000) as service:
                for _ in range(3):
                    peer.sendto(b"to-new", (str(topology.uplink.ip), 8080))
                time.sleep(0.3)
                inherited = len(service.peers) > 0
    finally:
        peer.close()
    assert inherited is not on


def _neighbour_mac(netns: str, address: ipaddress.IPv4Address) -> str | None:
    shown = subprocess.run(
        ["ip", "-n", netns, "neigh", "show", str(address), "dev", "nvbr0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return shown[shown.index("lladdr") + 1] if "lladdr" in shown else None


@pytest.mark.parametrize("on", [True, False], ids=["netvm", "control-entry-kept"])
def test_an_address_claimed_before_its_vm_came_is_not_the_claimants(
    host: NetworkManager, topology: Topology, on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A neighbour without anti-spoofing asks the gateway from a free address: the host
    learns that address at the neighbour's MAC, and would send the traffic of the guarded
    VM given the address next there, until the entry went stale. The attach deletes the
    entry once the VM's guarantees stop new claims; the control keeps it."""
    if not on:
        monkeypatch.setattr(host.backend, "forget_neighbour", lambda index, address: None)
    netns = topology.host_netns
    with guest(host, "claimant", OPEN) as o:
        address = host.attach("victim").guest_ip
        host.detach("victim")  # its address is free again; the next attach gets it back
        gateway = str(host.config.gateway.ip)
        claim = arp_frame(o.network.guest_mac, 1, o.network.guest_mac, str(address), gateway)
        claimant = ":".join(f"{b:02x}" for b in o.network.guest_mac)
        for _ in range(20):  # the first frames after the detach are not always learnt
            send(o, claim)
            time.sleep(0.1)
            if _neighbour_mac(netns, address) == claimant:
                break
        assert _neighbour_mac(netns, address) == claimant, "the claim was learnt"
        assert host.attach("victim").guest_ip == address
        assert (_neighbour_mac(netns, address) == claimant) is not on


# The gateway's MAC -------------------------------------------------------------------------


def _bridge_address(netns: str) -> str:
    shown = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show", "nvbr0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return shown[shown.index("link/ether") + 1]


@pytest.mark.parametrize("on", [True, False], ids=["netvm", "control-mac-changed"])
def test_the_gateways_mac_outlives_other_vms_coming_and_going(
    host: NetworkManager, topology: Topology, on: bool
) -> None:
    """A bridge left to the kernel takes its lowest port's MAC: a TAP coming or going
    changed the gateway's MAC, and guests that had the old one in their ARP cache reached
    the host no more. The guest here keeps the MAC it learnt (a permanent entry, so that it
    cannot quietly learn a new one); the control changes the bridge's MAC as the kernel did."""
    netns = topology.host_netns
    gateway = str(host.config.gateway.ip)
    expected = ":".join(f"{b:02x}" for b in naming.guest_mac(host.config.gateway.ip))
    with guest(host, "stays") as a:
        assert a.ping(gateway)
        learnt = _bridge_address(netns)
        assert learnt == expected
        pin = ["ip", "-n", a.netns, "neigh", "replace", gateway, "lladdr", learnt]
        subprocess.run([*pin, "nud", "permanent", "dev", "eth0"], check=True)
        for i in range(4):
            host.attach(f"comes-{i}", policy=OPEN)
        host.detach_many([f"comes-{i}" for i in range(4)])
        host.wait_detached(5)
        assert _bridge_address(netns) == expected
        if not on:
            other = ["ip", "-n", netns, "link", "set", "nvbr0", "address", "02:6e:00:00:00:99"]
            subprocess.run(other, check=True)
        assert a.ping(gateway) is on


# The bridge's forwarding database -----------------------------------------------------------


def _learnt_on(netns: str, tap: str) -> int:
    out = subprocess.run(
        ["bridge", "-n", netns, "fdb", "show", "br", "nvbr0", "dev", tap],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(1 for line in out.splitlines() if "permanent" not in line)


@pytest.mark.parametrize("on", [True, False], ids=["netvm", "control-no-cap"])
def test_a_guest_without_anti_spoofing_cannot_fill_the_fdb(
    host: NetworkManager, topology: Topology, on: bool
) -> None:
    """Frames from 4500 source MACs: the bridge learns at most its cap (Linux 6.8+)."""
    from netvm.host import FDB_MAX_LEARNED

    link = host.backend.get_link("nvbr0")
    assert link is not None
    assert link.bridge is not None
    if link.bridge.fdb_max_learned is None:
        cannot_run("FDB cap test", "this kernel has no cap on learnt FDB entries (Linux 6.8+)")
    if not on:
        uncapped = dataclasses.replace(link.bridge, fdb_max_learned=0)
        host.backend.set_bridge_options("nvbr0", uncapped)
    with guest(host, "flooder", OPEN) as a:
        frames = [
            udp_frame(b"\x02" + i.to_bytes(5, "big"), MARK, "192.0.2.9", "192.0.2.255", 9, 9, b"")
            for i in range(1, FDB_MAX_LEARNED + 405)
        ]

        def flood() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                sock.bind(("eth0", 0))
                for i, frame in enumerate(frames):
                    sock.send(frame)
                    if i % 100 == 99:
                        time.sleep(0.01)  # at the pace the frame pump carries them

        run_in_netns(a.netns, flood)
        time.sleep(0.3)
        learnt = _learnt_on(topology.host_netns, a.network.tap_name)
    assert (learnt <= FDB_MAX_LEARNED) is on, learnt


# Two bridges on one host --------------------------------------------------------------------


@pytest.mark.parametrize("on", [True, False], ids=["netvm", "control-drop-deleted"])
def test_the_guests_of_another_netvm_bridge_open_no_connection_to_this_ones(
    host: NetworkManager, nft_config: NetworkConfig, topology: Topology, on: bool
) -> None:
    """Each bridge's chain let in, from anywhere but the egress, new connections: a guest of
    a second bridge reached this one's guests (isolated ones too). The control deletes the
    drop of the second bridge's chain."""
    second = dataclasses.replace(
        nft_config,
        bridge_name="nvbr1",
        vm_subnet=ipaddress.IPv4Network("198.51.100.0/24"),
        state_dir=nft_config.state_dir.with_name("second"),
    )
    assert isinstance(host.backend, KernelBackend)
    backend = KernelBackend(host.backend.netns)
    try:
        with NetworkManager(second, backend) as other:
            other.ensure_host()
            if not on:
                firewall = backend.firewall("nftables")
                assert hasattr(firewall, "_run")
                chain = {"family": "inet", "table": "netvm-nvbr1", "name": "forward"}
                listed = firewall._run([{"list": {"chain": chain}}], "test", None)
                (drop,) = [
                    item["rule"]["handle"]
                    for item in listed
                    if "rule" in item
                    and item["rule"]["expr"][-1] == {"drop": None}
                    and len(item["rule"]["expr"]) == 2
                ]
                rule = {"family": "inet", "table": "netvm-nvbr1", "chain": "forward"}
                firewall._run([{"delete": {"rule": {**rule, "handle": drop}}}], "test", None)
            with (
                guest(other, "target", GuestPolicy.of(isolated=True)) as b,
                guest(host, "prober") as a,
                UdpEchoServer(b.netns, "0.0.0.0", 7) as service,
            ):
                reached = a.udp_request(b.network.guest_ip, 7, b"hello") == b"hello"
                assert (len(service.peers) > 0) is reached
            other.teardown_host()
    finally:
        backend.close()
    assert reached is not on


@pytest.mark.parametrize("on", [True, False], ids=["netvm", "control-owner-deleted"])
def test_a_forwards_own_vm_may_send_first_from_its_port(
    host: NetworkManager, topology: Topology, on: bool
) -> None:
    """A WireGuard or SIP VM forwarded 51820:51820/udp starts its own flows from that port:
    the guard against neighbours taking the port must let its own VM through (the
    forward_owners set); the control deletes the VM's element there."""
    peer_port = 5353
    with guest(host, "wg", GuestPolicy.of(port_forwards=["51820:51820/udp"])) as a:
        if not on:
            owner = f"udp . 51820 . {a.network.guest_ip}"
            command = f"delete element inet netvm-nvbr0 forward_owners {{ {owner} }}"
            subprocess.run(["ip", "netns", "exec", topology.host_netns, "nft", command], check=True)
        sender = _bound(a.netns, "0.0.0.0", 51820)
        peer = _bound(topology.internet_netns, str(topology.internet.ip), peer_port)
        try:
            sender.sendto(b"handshake", (str(topology.internet.ip), peer_port))
            time.sleep(0.3)
            arrived = _received(peer)
        finally:
            sender.close()
            peer.close()
    assert (arrived > 0) is on


def test_emulate_guest_names_its_namespace_by_the_prefix_given(host: NetworkManager) -> None:
    """A test that cleans up its namespaces by prefix finds the guests' too."""
    from netvm.testing import emulate_guest

    vm = host.attach("named")
    assert isinstance(host.backend, KernelBackend)
    with emulate_guest(vm, host.backend.netns, prefix="netvm-test-guest-") as g:
        assert g.netns.startswith("netvm-test-guest-")
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert g.netns in listed
        assert g.ping(vm.gateway_ip)
