"""The firewall seam: what netvm needs per bridge, and its nftables and iptables homes."""

from netvm.firewall.choice import ChosenFirewall, choose_firewall
from netvm.firewall.model import (
    KINDS,
    BridgeFirewall,
    Firewall,
    FirewallKind,
    FirewallRule,
    Placed,
)

__all__ = [
    "KINDS",
    "BridgeFirewall",
    "ChosenFirewall",
    "Firewall",
    "FirewallKind",
    "FirewallRule",
    "Placed",
    "choose_firewall",
]
