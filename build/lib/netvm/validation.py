"""Checks of a configuration against what the namespace already holds, before it is changed.

NetworkConfig checks each value on its own; what it cannot know is whether the VM subnet is
free where netvm is about to use it. A subnet that overlaps an address or a route of another
interface would make the kernel send guest traffic (or the gateway's replies) elsewhere, so
ensure_host refuses it before creating anything.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from netvm.backends.base import Backend
from netvm.config import NetworkConfig
from netvm.errors import ConflictError

ROUTES = "/proc/thread-self/net/route"
"""The IPv4 routes of the main table, of the namespace of the thread that reads it."""


def parse_routes(text: str) -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, destination) of each route of /proc/net/route text; bad lines are skipped.

    The destination and mask columns are hexadecimal in the host's (little-endian) order.
    """
    routes: list[tuple[str, ipaddress.IPv4Network]] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination = socket.inet_ntoa(struct.pack("<I", int(fields[1], 16)))
            mask = socket.inet_ntoa(struct.pack("<I", int(fields[7], 16)))
            network = ipaddress.IPv4Network(f"{destination}/{mask}")
        except (ValueError, struct.error):
            continue
        routes.append((fields[0], network))
    return routes


def read_routes(backend: Backend) -> list[tuple[str, ipaddress.IPv4Network]]:
    return parse_routes(backend.read_proc(ROUTES) or "")


def subnet_conflicts(backend: Backend, config: NetworkConfig) -> list[str]:
    """What in the namespace overlaps the VM subnet, other than netvm's own bridge set-up.

    Allowed: the gateway address on the bridge and routes through the bridge (the kernel
    adds the subnet's route with the gateway). Whether that bridge is netvm's is for
    ensure_host to say. The default route (a /0) overlaps every subnet and is no conflict.
    Only the main routing table is read.
    """
    subnet = config.vm_subnet
    bridge = backend.get_link(config.bridge_name)
    ours = bridge if bridge is not None and bridge.kind == "bridge" else None
    names = {link.index: link.name for link in backend.list_links()}
    found: list[str] = []
    for address in backend.list_addresses():
        if not address.interface.network.overlaps(subnet):
            continue
        if ours is not None and address.index == ours.index and address.interface == config.gateway:
            continue
        where = names.get(address.index, f"interface index {address.index}")
        taken = address.interface.ip == config.gateway.ip
        note = f" (the gateway address {config.gateway.ip} is already assigned)" if taken else ""
        found.append(f"address {address.interface} on {where}{note}")
    for iface, network in read_routes(backend):
        if network.prefixlen == 0 or not network.overlaps(subnet):
            continue
        if ours is not None and iface == ours.name:
            continue
        found.append(f"route {network} dev {iface}")
    return found


def check_subnet_free(backend: Backend, config: NetworkConfig) -> None:
    """ConflictError when the VM subnet overlaps an address or route already in the namespace."""
    conflicts = subnet_conflicts(backend, config)
    if conflicts:
        raise ConflictError(
            f"the VM subnet {config.vm_subnet} overlaps what the namespace already has: "
            + "; ".join(conflicts)
            + "; netvm changed nothing: choose another vm_subnet "
            "(MICROVM_NETWORK_SUBNET, --subnet) or remove the overlapping address or route"
        )
