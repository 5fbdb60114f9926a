"""The Backend protocol: small, kernel-shaped primitives, and the values they exchange.

Every decision (idempotency, rollback, allocation, ownership) lives in NetworkManager;
a backend only does what it is told and raises netvm's errors (netvm.errors.host_error)
with the errno the kernel gives for the same situation.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from netvm.errors import ConfigError, HostError

if TYPE_CHECKING:
    from netvm.firewall.model import Firewall, FirewallKind


MAX_ID = 2**32 - 2
"""The largest uid/gid a TAP can be given: (uid_t)-1 means "none" to TUNSETOWNER/TUNSETGROUP."""


@dataclass(frozen=True)
class TapOptions:
    """How a TAP is opened: who may open it later, and its queue and header flags.

    Checked on construction (ConfigError naming the field): owner and group are None or an
    int from 0 to 2**32-2, the flags are bools (not 0/1, not strings).
    """

    owner: int | None = None
    group: int | None = None
    multi_queue: bool = False
    vnet_hdr: bool = False

    def __post_init__(self) -> None:
        for name in ("owner", "group"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID
            ):
                what = "user" if name == "owner" else "group"
                raise ConfigError(name, value, f"None or a {what} id: an int from 0 to {MAX_ID}")
        for name in ("multi_queue", "vnet_hdr"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(name, value, "True or False")


@dataclass(frozen=True)
class BridgeOptions:
    """What a bridge does with frames to the 802.1D link-local addresses 01:80:c2:00:00:0X.

    By default the kernel hands them to the host's stack *on the port* (the TAP), past the
    bridge family's prerouting hook, and learns their source MAC: a guest could reach the
    host's services from any address and take a neighbour's MAC. `group_fwd_mask` bit X
    sends those to X through the bridge's hooks like any frame (bits 0-2 are refused by the
    kernel: EINVAL); `no_linklocal_learn` stops the learning. With `stp` on, frames to the
    STP address (01:80:c2:00:00:00) take that way again, whatever the mask.
    """

    group_fwd_mask: int = 0
    no_linklocal_learn: bool = False
    stp: bool = False
    fdb_max_learned: int | None = None
    """The cap on MACs the bridge learns (0: none); None where the kernel has no cap
    (before 6.8): a guest without anti-spoofing could otherwise fill the FDB."""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str | None
    """rtnetlink's IFLA_INFO_KIND: "bridge", "tun", "veth"... (None for a plain device)."""
    master: int | None
    mtu: int
    up: bool
    alias: str | None
    tap: TapOptions | None = None
    """For a TAP (kind "tun"): the flags it was created with."""
    isolated: bool = False
    """For a bridge port: the kernel's port isolation (IFLA_BRPORT_ISOLATED)."""
    group: int = 0
    """The link group (IFLA_GROUP); 0 is the kernel's default group."""
    bridge: BridgeOptions | None = None
    """For a bridge: its link-local options."""
    accept_ra: int | None = None
    """For a bridge: net.ipv6.conf.<name>.accept_ra, whether the host's IPv6 takes router
    advertisements that arrive on it (None: the device has no IPv6)."""
    address: bytes | None = None
    """For a bridge: its MAC, the gateway's to the guests."""


NO_MASTER = 0
"""`master=NO_MASTER` in a LinkChange releases the device from its bridge."""


@dataclass(frozen=True)
class LinkChange:
    """One RTM_NEWLINK on the device with ifindex `index`; None leaves an attribute as is.

    The kernel applies them in its own order (group, name, alias, up/down, then master) and
    keeps the earlier ones when a later one fails. `name` renames the device.
    """

    index: int
    name: str | None = None
    up: bool | None = None
    master: int | None = None
    alias: str | None = None
    group: int | None = None


@dataclass(frozen=True)
class LinkSetting:
    """One set_link request of a batch (Backend.set_links), by name (or by `index`)."""

    name: str
    index: int | None = None
    """The device's ifindex, where known: the request goes to that device (ENODEV if it
    is gone), and needs no look-up for `isolated`."""
    master: int | None = None
    mtu: int | None = None
    up: bool | None = None
    alias: str | None = None
    isolated: bool | None = None
    """The port isolation to set once the device is a bridge port (set_link)."""
    group: int | None = None
    """The link group (IFLA_GROUP)."""


@dataclass(frozen=True)
class Address:
    index: int
    interface: ipaddress.IPv4Interface


@dataclass(frozen=True)
class Rule:
    """One legacy xtables rule, with only the matches netvm writes.

    A rule with anything else is listed with that part in `other` (as text), so it never
    compares equal to a rule netvm would write.
    """

    target: str
    source: ipaddress.IPv4Network | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    ctstate: tuple[str, ...] = ()
    comment: str | None = None
    other: str = ""


FILTER = "filter"
NAT = "nat"
# Targets that are not user chains (any other target must name an existing chain).
STANDARD_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "REJECT", "MASQUERADE", "LOG"})


class XtablesTables(Protocol):
    """Chains and rules of the legacy IPv4 tables `filter` and `nat` of one namespace."""

    def xtables_unavailable(self) -> str | None: ...

    def legacy_tables(self) -> set[str]:
        """The legacy tables the kernel has instantiated in the namespace (none is read)."""

    def legacy_in_use(self) -> bool:
        """A legacy table holds a rule, a user chain or a policy other than ACCEPT."""

    def legacy_policy(self, table: str, chain: str) -> str:
        """The policy of a built-in chain ("ACCEPT", "DROP")."""

    def list_chains(self, table: str) -> list[str]: ...

    def create_chain(self, table: str, chain: str) -> None: ...

    def delete_chain(self, table: str, chain: str) -> None:
        """The chain must be empty and no rule may jump to it."""

    def list_rules(self, table: str, chain: str) -> list[Rule]: ...

    def insert_rule(self, table: str, chain: str, rule: Rule, position: int = 0) -> None: ...

    def delete_rule(self, table: str, chain: str, rule: Rule) -> None:
        """Delete the first rule equal to `rule`; NotFound if there is none."""


class GroupDeleter(Protocol):
    """What the reaper's thread needs (netvm/reaper.py)."""

    def link_groups(self) -> set[int]: ...

    def delete_group(self, group: int) -> None: ...

    def close(self) -> None: ...


class Backend(XtablesTables, Protocol):
    """Links, addresses, the ip_forward switch and the firewalls of one network namespace.

    The legacy xtables primitives (XtablesTables) are the layer XtablesFirewall is built on;
    the manager only uses `firewall(kind)`.
    """

    def firewall(self, kind: FirewallKind) -> Firewall:
        """The firewall seam of `kind` (nftables or iptables) in this namespace."""

    def namespace_id(self) -> str:
        """Names the network namespace for per-namespace state files (leases, locks).

        The same for every backend of one namespace, in any process, while it exists.
        """

    def get_link(self, name: str) -> Link | None:
        """One lookup by name (never a dump); None when there is no such device."""

    def list_links(self, master: int | None = None) -> list[Link]:
        """Every link, or only the ports of the bridge with index `master`."""

    def create_bridge(
        self,
        name: str,
        mtu: int,
        alias: str | None = None,
        group: int = 0,
        options: BridgeOptions | None = None,
    ) -> None:
        """A bridge made in link group `group` with `options` (both in the creating
        request), then given `mtu`, `alias` and the default group 0 in a second one."""

    def set_bridge_options(self, name: str, options: BridgeOptions) -> None:
        """The bridge's link-local options (one request)."""

    def forget_connections(self, address: ipaddress.IPv4Address) -> None:
        """Delete the kernel's connection tracking entries whose original or reply source
        is `address`. A kernel without ctnetlink: nothing is deleted, a warning says so."""

    def set_accept_ra(self, name: str, value: int) -> None:
        """net.ipv6.conf.<name>.accept_ra (HostError ENOENT where the device has no IPv6)."""

    def create_tap(self, name: str, options: TapOptions) -> int:
        """A persistent TAP, and its ifindex; DeviceExists if any device has that name
        (never reused)."""

    def set_link(
        self,
        name: str,
        *,
        index: int | None = None,
        master: int | None = None,
        mtu: int | None = None,
        up: bool | None = None,
        alias: str | None = None,
        isolated: bool | None = None,
        group: int | None = None,
        address: bytes | None = None,
    ) -> None:
        """Change several attributes of a link in one request; `isolated` (the port's
        isolation, as set_port_isolated) applies once the other changes are made, so it
        can come with the enslave. A failure keeps the changes made before it. With
        `index`, the device with that ifindex (ENODEV if there is none), `name` in errors."""

    def create_taps(self, names: Sequence[str], options: TapOptions) -> dict[str, HostError]:
        """create_tap for each name, back to back; the error of each that failed (the
        others exist). DeviceExists for a name in use, as create_tap."""

    def set_links(self, changes: Sequence[LinkSetting]) -> dict[str, HostError]:
        """set_link for each change, the requests pipelined (all sent, then all answers
        read); the error of each that failed, the others are applied."""

    def set_port_isolated(self, name: str, isolated: bool) -> None:
        """Set the kernel's isolation of bridge port `name`: isolated ports exchange no
        frames with each other. EOPNOTSUPP if `name` is not on a bridge."""

    def delete_link(self, name: str, index: int | None = None) -> None:
        """Delete the device `name`; with `index`, only if it still is that device
        (NotFound otherwise, even when another device has the name by now)."""

    def delete_links(self, names: Sequence[str]) -> None:
        """Delete many links paying the kernel's per-request grace period once.

        Names that are already gone are skipped.
        """

    def get_links(self, names: Sequence[str]) -> dict[str, Link]:
        """Look up many devices by name in one round trip; absent names are left out."""

    def change_links(self, changes: Sequence[LinkChange]) -> list[tuple[LinkChange, int]]:
        """Apply each change (by ifindex), all requests in flight at once; return the
        failed ones with their errno (ENODEV: no device with that index)."""

    def link_groups(self) -> set[int]:
        """The link groups some device of the namespace is in."""

    def delete_group(self, group: int) -> None:
        """Delete every device of link group `group` in one request (one grace period).

        A group no device is in is success. Only group numbers netvm chose unused may be
        given: the kernel deletes whatever is in the group.
        """

    def deleter(self) -> GroupDeleter:
        """A handle of this namespace for a thread that deletes groups: its requests wait
        for the kernel's grace period without holding up this backend's callers. Closed by
        whoever asked for it."""

    def list_addresses(self, index: int | None = None) -> list[Address]: ...

    def add_address(self, index: int, interface: ipaddress.IPv4Interface) -> None: ...

    def delete_address(self, index: int, interface: ipaddress.IPv4Interface) -> None: ...

    def forget_neighbour(self, index: int, address: ipaddress.IPv4Address) -> None:
        """Delete the host's neighbour (ARP) entry of `address` on device `index`; NotFound
        if it has none."""

    def get_ip_forward(self) -> bool: ...

    def read_proc(self, path: str) -> str | None:
        """A file of /proc/sys/net or /proc/thread-self/net in this namespace (None if absent)."""

    def set_ip_forward(self, enabled: bool) -> None: ...

    def close(self) -> None: ...
