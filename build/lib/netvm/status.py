"""What of a NetworkManager's host set-up is present: read-only, for `netvm status` and Python.

with NetworkManager(config) as manager:
    status = host_status(manager)
    if not status.ready:
        print(status.problems())
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from netvm import naming
from netvm.errors import NetvmError, StateStoreError
from netvm.firewall import Placed
from netvm.manager import NetworkManager


@dataclass(frozen=True)
class FirewallStatus:
    """Which firewall holds the bridge's rules, why, what it holds and what is missing."""

    kind: str | None
    """"nftables" or "iptables"; None when no firewall can be used (see `missing`)."""
    configured: str
    reason: str
    rules: tuple[Placed, ...]
    missing: tuple[str, ...]


@dataclass(frozen=True)
class HostStatus:
    """The host set-up of one bridge as the kernel (and the lease store) has it now."""

    bridge: str
    subnet: ipaddress.IPv4Network
    egress: str
    bridge_present: bool
    bridge_kind: str | None
    """rtnetlink's kind of the device named `bridge` ("bridge" when it is one)."""
    bridge_owned: bool
    """The device is a bridge that netvm created for this subnet (its ifalias says so)."""
    mtu: int | None
    expected_mtu: int
    up: bool
    gateway: ipaddress.IPv4Interface
    gateway_present: bool
    ip_forward: bool
    firewall: FirewallStatus
    vms_attached: int
    """netvm TAPs enslaved to the bridge."""
    vms_leased: int
    """Leases in the lease store (0 when it does not exist yet)."""

    def problems(self) -> list[str]:
        """What is missing or wrong, one phrase each; empty when the host is ready."""
        found: list[str] = []
        if not self.bridge_present:
            found.append(f"bridge {self.bridge} is missing")
        elif self.bridge_kind != "bridge":
            found.append(f"{self.bridge} is not a bridge (kind {self.bridge_kind or 'none'})")
        elif not self.bridge_owned:
            found.append(f"bridge {self.bridge} was not created by netvm")
        if self.bridge_present and self.mtu != self.expected_mtu:
            found.append(f"{self.bridge} has MTU {self.mtu}, not {self.expected_mtu}")
        if self.bridge_present and not self.up:
            found.append(f"{self.bridge} is down")
        if not self.gateway_present:
            found.append(f"gateway address {self.gateway} is not on {self.bridge}")
        if not self.ip_forward:
            found.append("ip_forward is off")
        found.extend(self.firewall.missing)
        return found

    @property
    def ready(self) -> bool:
        """Everything ensure_host() sets up is present and as configured."""
        return not self.problems()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form `netvm status --json` prints (see docs/cli.md)."""
        return {
            "bridge": {
                "name": self.bridge,
                "present": self.bridge_present,
                "kind": self.bridge_kind,
                "created_by_netvm": self.bridge_owned,
                "mtu": self.mtu,
                "expected_mtu": self.expected_mtu,
                "up": self.up,
            },
            "subnet": str(self.subnet),
            "egress": self.egress,
            "gateway": {"address": str(self.gateway), "present": self.gateway_present},
            "ip_forward": self.ip_forward,
            "firewall": {
                "kind": self.firewall.kind,
                "configured": self.firewall.configured,
                "reason": self.firewall.reason,
                "rules": [{"chain": r.chain, "rule": r.text} for r in self.firewall.rules],
                "missing": list(self.firewall.missing),
            },
            "vms": {"attached": self.vms_attached, "leased": self.vms_leased},
            "ready": self.ready,
            "problems": self.problems(),
        }


def host_status(manager: NetworkManager) -> HostStatus:
    """Read the host set-up of `manager`'s bridge; changes nothing in the kernel.

    The lease store is read only if it exists already.
    """
    config, backend = manager.config, manager.backend
    link = backend.get_link(config.bridge_name)
    is_bridge = link is not None and link.kind == "bridge"
    gateway_present = False
    attached = 0
    if link is not None:
        gateway_present = any(
            a.interface == config.gateway for a in backend.list_addresses(link.index)
        )
    if link is not None and is_bridge:
        attached = sum(
            1
            for port in backend.list_links(master=link.index)
            if port.kind == "tun"
            and naming.parse_tap_alias(port.alias, manager.config.bridge_name, port.name)
            is not None
        )
    firewall = firewall_status(manager)
    leased = 0
    if manager.leases.path.exists():
        try:
            leased = len(manager.leases.all())
        except StateStoreError:
            leased = 0
    return HostStatus(
        bridge=config.bridge_name,
        subnet=config.vm_subnet,
        egress=config.host_egress_iface,
        bridge_present=link is not None,
        bridge_kind=link.kind if link is not None else None,
        bridge_owned=is_bridge and link is not None and _owned(link.alias, config.vm_subnet),
        mtu=link.mtu if link is not None else None,
        expected_mtu=config.mtu,
        up=link.up if link is not None else False,
        gateway=config.gateway,
        gateway_present=gateway_present,
        ip_forward=backend.get_ip_forward(),
        firewall=firewall,
        vms_attached=attached,
        vms_leased=leased,
    )


def _owned(alias: str | None, subnet: ipaddress.IPv4Network) -> bool:
    mark = naming.parse_bridge_alias(alias)
    return mark is not None and mark.subnet in (None, subnet)


def firewall_status(manager: NetworkManager) -> FirewallStatus:
    """The firewall part of host_status: reads the chosen firewall, changes nothing."""
    configured = manager.config.firewall
    try:
        chosen = manager.choose_firewall()
    except NetvmError as exc:
        return FirewallStatus(None, configured, str(exc), (), (f"no firewall: {exc}",))
    firewall = manager.backend.firewall(chosen.kind)
    return FirewallStatus(
        kind=chosen.kind,
        configured=configured,
        reason=chosen.reason,
        rules=tuple(firewall.listing(manager.config.bridge_name)),
        missing=tuple(firewall.check(manager.firewall_policy)),
    )
