"""Which firewall holds netvm's rules: the configured one, or for `auto` what the host uses.

`auto` follows Incus: nftables, unless the legacy xtables tables hold rules and nftables
holds none (an empty table filters nothing); a host with neither gets nftables. The same
host state gives the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from netvm.config import FirewallChoice
from netvm.errors import ConfigError
from netvm.firewall.model import Firewall, FirewallKind

NO_NFTABLES = "auto: nftables cannot be used"
"""The start of the reason when `auto` picks iptables only because nftables is unusable."""


class HasFirewalls(Protocol):
    def firewall(self, kind: FirewallKind) -> Firewall: ...


@dataclass(frozen=True)
class ChosenFirewall:
    kind: FirewallKind
    reason: str
    configured: FirewallChoice


def choose_firewall(choice: FirewallChoice, backend: HasFirewalls) -> ChosenFirewall:
    """Pick the firewall; ConfigError (field `firewall`) when the one needed is unusable."""
    if choice != "auto":
        missing = backend.firewall(choice).unavailable()
        if missing is not None:
            raise ConfigError("firewall", choice, f"cannot be used on this host: {missing}")
        return ChosenFirewall(choice, "configured", choice)
    nftables, iptables = backend.firewall("nftables"), backend.firewall("iptables")
    nft_missing = nftables.unavailable()
    # in_use() reads the kernel without python-iptables: load it only when it matters.
    legacy_used = iptables.in_use() and iptables.unavailable() is None
    if nft_missing is not None:
        ipt_missing = iptables.unavailable()
        if ipt_missing is not None:
            raise ConfigError(
                "firewall", choice, f"no firewall can be used: {nft_missing}; {ipt_missing}"
            )
        return ChosenFirewall("iptables", f"{NO_NFTABLES} ({nft_missing})", choice)
    # Only a host whose legacy tables hold rules can get iptables: ask nftables only then.
    nft_used = legacy_used and nftables.in_use()
    if legacy_used and not nft_used:
        reason = "auto: the legacy xtables tables hold rules and nftables holds none"
        return ChosenFirewall("iptables", reason, choice)
    if nft_used:
        reason = "auto: nftables and the legacy tables hold rules: nftables wins"
    else:
        reason = "auto: the legacy xtables tables hold no rules"
    return ChosenFirewall("nftables", reason, choice)
