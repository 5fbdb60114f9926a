"""What netvm needs from a firewall for one bridge, as values: the seam's vocabulary.

The manager describes the set-up of a bridge as a `BridgeFirewall`; each implementation
(nftables, iptables) turns it into its own rules, converges the kernel to it, lists it and
removes it by netvm's tag. Nothing here knows how a rule is written.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from netvm.firewall.guard import VmGuard

FirewallKind = Literal["nftables", "iptables"]
KINDS: tuple[FirewallKind, ...] = ("nftables", "iptables")
Action = Literal["accept", "drop", "masquerade"]

DOCKER_USER = "DOCKER-USER"
"""Docker's chain for other tools' rules: jumped to first from FORWARD, kept across restarts."""


@dataclass(frozen=True)
class FirewallRule:
    """One rule, with only the matches netvm writes. Interface names match exactly."""

    action: Action
    in_iface: str | None = None
    out_iface: str | None = None
    source: ipaddress.IPv4Network | None = None
    established: bool = False
    """Only packets of connections conntrack has seen both ways (ESTABLISHED, RELATED)."""

    def describe(self) -> str:
        parts: list[str] = []
        if self.source is not None:
            parts.append(f"from {self.source}")
        if self.in_iface is not None:
            parts.append(f"in {self.in_iface}")
        if self.out_iface is not None:
            parts.append(f"out {self.out_iface}")
        if self.established:
            parts.append("established/related")
        return " ".join([*parts, self.action])


@dataclass(frozen=True)
class BridgeFirewall:
    """Everything netvm keeps in the firewall for one bridge.

    - `forward`: netvm's own chain at the forward hook. Guests may go out and talk to each
      other; from any other interface only replies come in (new connections towards the
      guests, which sit behind NAT, are dropped here, where a drop is final: from the
      egress, and from another netvm bridge's guests, docker0 or a LAN).
    - `postrouting`: netvm's own NAT chain: the subnet is masqueraded out of the egress.
    - `passes`: accepts that must also stand in a *foreign* forward chain whose DROP would
      otherwise win (the iptables-nft `filter` table of Docker, or of a plain `-P FORWARD
      DROP`): the kernel runs every table at a hook, and an accept ends only its own table.
      Replies need no state match there: netvm's own chain drops the rest.
    """

    bridge: str
    subnet: ipaddress.IPv4Network
    egress: str

    def __post_init__(self) -> None:
        # The names go into rules as they are: a '+' would be an iptables wildcard, a
        # leading '!' a negation. NetworkConfig checks them; this holds for direct use too.
        from netvm.config import validate_ifname
        from netvm.errors import ConfigError

        validate_ifname("bridge", self.bridge)
        validate_ifname("egress", self.egress)
        if not isinstance(self.subnet, ipaddress.IPv4Network):
            raise ConfigError("subnet", self.subnet, "an ipaddress.IPv4Network")

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's address: the subnet's first host (NetworkConfig.gateway)."""
        return self.subnet.network_address + 1

    @property
    def tag(self) -> str:
        """The comment on every rule netvm writes for this bridge."""
        return tag_of(self.bridge)

    @property
    def forward(self) -> tuple[FirewallRule, ...]:
        bridge, egress = self.bridge, self.egress
        return (
            FirewallRule("accept", in_iface=bridge, out_iface=egress),
            # Guest to guest: with br_netfilter, bridged frames pass the forward hook too.
            FirewallRule("accept", in_iface=bridge, out_iface=bridge),
            # From anywhere else (the egress, another netvm bridge, docker0, a LAN) only
            # replies: guests sit behind NAT, and an isolated VM is no one's to reach.
            FirewallRule("accept", out_iface=bridge, established=True),
            FirewallRule("drop", out_iface=bridge),
        )

    @property
    def postrouting(self) -> tuple[FirewallRule, ...]:
        return (FirewallRule("masquerade", source=self.subnet, out_iface=self.egress),)

    @property
    def passes(self) -> tuple[FirewallRule, ...]:
        bridge, egress = self.bridge, self.egress
        return (
            FirewallRule("accept", in_iface=bridge, out_iface=egress),
            FirewallRule("accept", in_iface=bridge, out_iface=bridge),
            FirewallRule("accept", in_iface=egress, out_iface=bridge),
        )


def tag_of(bridge: str) -> str:
    return f"netvm:{bridge}"


@dataclass(frozen=True)
class Placed:
    """One rule of netvm's as a firewall holds it: where, and in the tool's own words."""

    chain: str
    """e.g. "inet netvm-fcbr0 forward", "ip filter DOCKER-USER", "filter NETVM-FWD-fcbr0"."""
    text: str


def pass_chain(chains: Collection[str]) -> str | None:
    """Where netvm's accepts go in a foreign iptables `filter` table that has these chains.

    Docker's DOCKER-USER when it exists (Docker keeps it, and jumps to it first), else the
    top of FORWARD. None on a ufw host: ufw rewrites its table on reload, so netvm writes
    nothing there and `netvm doctor` prints the `ufw route allow` command instead.
    """
    if any(name.startswith("ufw-") for name in chains):
        return None
    if DOCKER_USER in chains:
        return DOCKER_USER
    if "FORWARD" in chains:
        return "FORWARD"
    return None


class Firewall(Protocol):
    """The firewall seam: set up, list and tear down netvm's rules for one bridge."""

    kind: FirewallKind

    def unavailable(self) -> str | None:
        """Why this firewall cannot be used here (a library is missing), or None."""

    def in_use(self) -> bool:
        """Whether it holds rules that are not netvm's (what `auto` looks at)."""

    def ensure(self, policy: BridgeFirewall) -> bool:
        """Converge netvm's rules of `policy.bridge` to `policy`; True if anything changed.

        A failure leaves the rules as they were (nftables: one transaction; iptables: the
        steps done are undone). ConflictError if netvm's own chain holds foreign rules.
        """

    def check(self, policy: BridgeFirewall) -> list[str]:
        """What `ensure(policy)` would change, one phrase each; empty when it is in place."""

    def listing(self, bridge: str, guarantees: bool = False) -> list[Placed]:
        """netvm's rules of `bridge`, wherever they are; empty when there are none. With
        `guarantees`, also the rules behind the per-VM guarantees (nftables only)."""

    def remove(self, bridge: str) -> list[str]:
        """Remove every rule and chain of netvm's for `bridge`; it is fine if there is none.

        Returns what had to be left (e.g. a foreign rule that jumps into netvm's chain),
        having removed everything else.
        """

    # Per-VM guarantees (netvm/policy.py): elements of sets, never a rule per VM.

    def guard(self, bridge: str, vm: VmGuard, fresh: bool = False) -> None:
        """Give the VM on `vm.tap` the guarantees of `vm.policy` (replacing what it had), in
        one transaction. ConfigError where this firewall cannot give them. `fresh`: the TAP
        was just created (it most likely has nothing yet: a cheaper path, as correct)."""

    def restore(self, bridge: str, vm: VmGuard) -> None:
        """Write every element of `vm` again, whatever is there already (none is removed):
        a record can outlive elements in another of netvm's tables, when a foreign change
        took that table and ensure_host made it again."""

    def record(self, bridge: str, tap: str) -> VmGuard | None:
        """What the firewall holds for `tap`, or None."""

    def unguard(self, bridge: str, taps: Collection[str]) -> dict[str, VmGuard]:
        """Remove everything the firewall holds for these TAPs (in one transaction where it
        can); it is fine if there is nothing. Returns what each TAP that had some had."""

    def guards(self, bridge: str) -> dict[str, VmGuard]:
        """Every TAP's guarantees on this bridge."""

    def prune(self, bridge: str, live: Collection[str]) -> list[str]:
        """Remove the guarantees of every TAP not in `live`; return those TAPs."""
