"""Which firewall holds netvm's rules: the configured one, or for `auto` what the host uses.

`auto` follows Incus: nftables, unless the legacy xtables tables hold rules and nftables
holds none; a host with neither gets nftables. The same host state gives the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from netvm.config import FirewallChoice
from netvm.errors import ConfigError
from netvm.firewall.model import Firewall, FirewallKind


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
    nft_missing, ipt_missing = nftables.unavailable(), iptables.unavailable()
    legacy_used = ipt_missing is None and iptables.in_use()
    if nft_missing is not None:
        if ipt_missing is not None:
            raise ConfigError(
                "firewall", choice, f"no firewall can be used: {nft_missing}; {ipt_missing}"
            )
        return ChosenFirewall("iptables", f"auto: nftables cannot be used ({nft_missing})", choice)
    nft_used = nftables.in_use()
    if legacy_used and not nft_used:
        reason = "auto: the legacy xtables tables hold rules and nftables holds none"
        return ChosenFirewall("iptables", reason, choice)
    if nft_used:
        reason = "auto: nftables holds rules" + (
            " (the legacy tables too: nftables wins)" if legacy_used else ""
        )
    else:
        reason = "auto: neither nftables nor the legacy tables hold rules"
    return ChosenFirewall("nftables", reason, choice)
