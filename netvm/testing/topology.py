"""A "host" namespace with an uplink to a small "internet" namespace."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute

from netvm.backends.netns import netns_path
from netvm.testing.guest import wait_until_passing
from netvm.testing.namespaces import run_in_netns, throwaway_netns
from netvm.testing.probes import allow_ping, up_loopback

# A host with an uplink to a small "internet" ---------------------------------------------

INTERNET_IFACE = "isp0"


@dataclass(frozen=True)
class Topology:
    """Two namespaces linked by a veth pair: the VM host, and an "internet" with one host.

    The host's end of the veth is named like the egress interface netvm is configured with,
    carries `uplink` and a default route via `internet`; the internet side carries
    `internet` and a default route back via the uplink, so a packet that leaves the host
    un-masqueraded still reaches it (and can be seen with its private source).
    """

    host_netns: str
    internet_netns: str
    egress_iface: str
    uplink: ipaddress.IPv4Interface
    internet: ipaddress.IPv4Interface
    internet_iface: str = INTERNET_IFACE


@contextmanager
def internet_topology(
    egress_iface: str = "eth0",
    *,
    prefix: str = "netvm-",
    uplink: str = "203.0.113.2/24",
    internet: str = "203.0.113.1/24",
) -> Iterator[Topology]:
    """Build a `Topology` (two fresh namespaces), yield it, and delete both on exit.

    Addresses default to TEST-NET-3 (203.0.113.0/24, RFC 5737). Nothing is created in the
    caller's namespace; ICMP datagram sockets are allowed in both namespaces.
    """
    up = ipaddress.IPv4Interface(uplink)
    far = ipaddress.IPv4Interface(internet)
    if up.network != far.network or up.ip == far.ip:
        raise ValueError(f"uplink {up} and internet {far} must be two addresses of one network")
    with (
        throwaway_netns(f"{prefix}host-") as host,
        throwaway_netns(f"{prefix}inet-") as inet,
    ):

        def build_host() -> None:
            allow_ping()
            target = os.open(netns_path(inet), os.O_RDONLY | os.O_CLOEXEC)
            ipr = IPRoute()
            try:
                up_loopback(ipr)
                ipr.link(
                    "add",
                    ifname=egress_iface,
                    kind="veth",
                    peer={"ifname": INTERNET_IFACE, "net_ns_fd": target},
                )
                index = ipr.link_lookup(ifname=egress_iface)[0]
                ipr.addr("add", index=index, address=str(up.ip), prefixlen=up.network.prefixlen)
                ipr.link("set", index=index, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=str(far.ip))
            finally:
                ipr.close()
                os.close(target)

        def build_internet() -> None:
            allow_ping()
            ipr = IPRoute()
            try:
                up_loopback(ipr)
                index = ipr.link_lookup(ifname=INTERNET_IFACE)[0]
                ipr.addr("add", index=index, address=str(far.ip), prefixlen=far.network.prefixlen)
                ipr.link("set", index=index, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=str(up.ip))
            finally:
                ipr.close()

        run_in_netns(host, build_host)
        run_in_netns(inet, build_internet)
        # The kernel applies a veth's carrier (operstate, qdisc) from its link-watch work,
        # at most once a second: until then both ends drop what is sent.
        run_in_netns(host, lambda: wait_until_passing(egress_iface))
        run_in_netns(inet, lambda: wait_until_passing(INTERNET_IFACE))
        yield Topology(host, inet, egress_iface, up, far)
