"""FakeBackend: an in-memory model of one network namespace's links, addresses and rules.

It enforces the kernel's rules and raises the errno the kernel raises for the same request
(checked by the contract tests, which run against both backends), and it can be told to
fail the k-th change so that rollback can be tested at every step.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from netvm.backends.base import (
    FILTER,
    NAT,
    NO_MASTER,
    STANDARD_TARGETS,
    Address,
    BridgeOptions,
    Link,
    LinkChange,
    LinkSetting,
    Rule,
    TapOptions,
)
from netvm.config import IFNAMSIZ, MAX_MTU, MIN_MTU
from netvm.errors import HostError, host_error
from netvm.firewall.fake_nft import FakeElements, FakeNftRunner, FakeRuleset
from netvm.firewall.model import Firewall, FirewallKind
from netvm.firewall.nftables import NftablesFirewall
from netvm.firewall.xtables import XtablesFirewall
from netvm.naming import MAX_BRIDGE_PORTS

IFALIASZ = 256
RESTRICTED_GROUP_FWD = 0x0007
"""BR_GROUPFWD_RESTRICTED: the bits of group_fwd_mask the kernel refuses (EINVAL)."""
F = TypeVar("F", bound=Callable[..., Any])
_states: weakref.WeakValueDictionary[int, FakeState] = weakref.WeakValueDictionary()
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    FILTER: ("INPUT", "FORWARD", "OUTPUT"),
    NAT: ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}


@dataclass(frozen=True)
class Connection:
    """A conntrack entry, by the source address of each direction."""

    original: ipaddress.IPv4Address
    reply: ipaddress.IPv4Address


@dataclass
class FakeState:
    """Everything the fake kernel holds; tests may read it, the backend changes it."""

    links: dict[str, Link] = field(default_factory=dict)
    addresses: list[Address] = field(default_factory=list)
    ip_forward: bool = False
    chains: dict[str, dict[str, list[Rule]]] = field(
        default_factory=lambda: {t: {c: [] for c in cs} for t, cs in BUILTIN_CHAINS.items()}
    )
    policies: dict[tuple[str, str], str] = field(default_factory=dict)
    """(table, built-in chain) -> policy, where it is not ACCEPT."""
    legacy_tables: set[str] = field(default_factory=set)
    """Legacy tables instantiated: as in the kernel, the first read or write of one."""
    nftables: FakeRuleset = field(default_factory=FakeRuleset)
    proc: dict[str, str] = field(default_factory=dict)
    """Other /proc/sys/net and /proc/thread-self/net files, by path (ip_forward is above)."""
    neighbours: dict[tuple[int, ipaddress.IPv4Address], bytes] = field(default_factory=dict)
    """The host's ARP entries, (device index, address) -> MAC: a test adds what an ARP reply
    would have taught it."""
    connections: list[Connection] = field(default_factory=list)
    """The conntrack table: a test adds what traffic would have made."""
    fdb_cap: bool = True
    """The kernel caps learnt FDB entries on request (IFLA_BR_FDB_MAX_LEARNED, 6.8+)."""
    ipv6: bool = True
    """The kernel has IPv6 (its devices have net.ipv6.conf); the fake models accept_ra for
    bridges only, as netvm reads it for those."""
    next_index: int = 2
    live_rename: bool = True
    """Linux >= 6.2 renames a device that is up; older kernels refuse it (EBUSY)."""
    lock: threading.RLock = field(default_factory=threading.RLock, compare=False, repr=False)
    """Held by every FakeBackend call: backends of one state may run on several threads
    (the reaper's deleter is one), as in one namespace of the kernel."""

    def __post_init__(self) -> None:
        self.links.setdefault("lo", Link(1, "lo", None, None, 65536, False, None))
        _states[id(self)] = self


class FakeBackend:
    """A Backend over a FakeState (a fresh one unless given)."""

    def __init__(self, state: FakeState | None = None) -> None:
        self.state = state if state is not None else FakeState()
        self.mutations = 0
        self._fail_at: int | None = None
        self._fail_errno = errno.EIO
        self._firewalls: dict[FirewallKind, Firewall] = {}

    # Fault injection -------------------------------------------------------------------

    def fail_at(self, k: int | None, error: int = errno.EIO) -> None:
        """Make the k-th change from now (1-based) fail with `error`; None disarms."""
        self._fail_at = None if k is None else self.mutations + k
        self._fail_errno = error

    def _mutate(self, operation: str, device: str | None) -> None:
        self.mutations += 1
        if self._fail_at is not None and self.mutations == self._fail_at:
            self._fail_at = None
            raise host_error(operation, device, self._fail_errno, "injected fault")

    # Links ------------------------------------------------------------------------------

    def _by_index(self, index: int) -> Link | None:
        return next((link for link in self.state.links.values() if link.index == index), None)

    def _require(self, operation: str, name: str) -> Link:
        link = self.state.links.get(name)
        if link is None:
            raise host_error(operation, name, errno.ENODEV)
        return link

    def _new_link(
        self, operation: str, name: str, kind: str | None, mtu: int, tap: TapOptions | None = None
    ) -> None:
        if len(name.encode()) >= IFNAMSIZ:
            raise host_error(operation, name, errno.ERANGE)
        if name in self.state.links:
            raise host_error(operation, name, errno.EBUSY if kind == "tun" else errno.EEXIST)
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise host_error(operation, name, errno.EINVAL)
        self._mutate(operation, name)
        index = self.state.next_index
        self.state.next_index += 1
        self.state.links[name] = Link(index, name, kind, None, mtu, False, None, tap)

    def add_link(self, name: str, kind: str | None, mtu: int = 1500) -> None:
        """Add a device netvm has no primitive for (a veth, a dummy), as a user would."""
        self._new_link("create link", name, kind, mtu)

    def namespace_id(self) -> str:
        """One FakeState is one namespace (it lives in this process only)."""
        return f"fake{id(self.state):x}"

    def get_link(self, name: str) -> Link | None:
        return self.state.links.get(name)

    def list_links(self, master: int | None = None) -> list[Link]:
        links = sorted(self.state.links.values(), key=lambda link: link.index)
        return [link for link in links if master is None or link.master == master]

    def create_bridge(
        self,
        name: str,
        mtu: int,
        alias: str | None = None,
        group: int = 0,
        options: BridgeOptions | None = None,
    ) -> None:
        if options is not None:
            self._check_bridge_options("create bridge", name, options)
        self._new_link("create bridge", name, "bridge", mtu)
        accept_ra = 1 if self.state.ipv6 else None
        link = self.state.links[name]
        # The kernel gives a new bridge a random MAC (and, unless one is set, its ports').
        address = bytes([0x0A, 0, 0, 0, link.index >> 8 & 0xFF, link.index & 0xFF])
        made = replace(
            link,
            alias=alias,
            bridge=self._as_kept(options or BridgeOptions(), None),
            accept_ra=accept_ra,
            address=address,
        )
        self.state.links[name] = made

    def set_bridge_options(self, name: str, options: BridgeOptions) -> None:
        operation = "set bridge options"
        link = self._require(operation, name)
        if link.kind != "bridge":
            raise host_error(operation, name, errno.EOPNOTSUPP)
        self._check_bridge_options(operation, name, options)
        self._mutate(operation, name)
        self.state.links[name] = replace(link, bridge=self._as_kept(options, link.bridge))

    def _as_kept(self, options: BridgeOptions, before: BridgeOptions | None) -> BridgeOptions:
        """What the kernel keeps: without the FDB cap (before 6.8) none is reported; a
        cap not given is left as it was (0, none, on a new bridge)."""
        if not self.state.fdb_cap:
            return replace(options, fdb_max_learned=None)
        if options.fdb_max_learned is None:
            kept = before.fdb_max_learned if before is not None else None
            return replace(options, fdb_max_learned=kept or 0)
        return options

    @staticmethod
    def _check_bridge_options(operation: str, name: str, options: BridgeOptions) -> None:
        """The kernel's rule: the group addresses of STP, pause frames and LACP are
        never forwarded (BR_GROUPFWD_RESTRICTED)."""
        if options.group_fwd_mask & RESTRICTED_GROUP_FWD or options.group_fwd_mask < 0:
            raise host_error(operation, name, errno.EINVAL)

    def forget_connections(self, address: ipaddress.IPv4Address) -> None:
        self._mutate(f"delete the connections of {address}", None)
        self.state.connections = [
            c for c in self.state.connections if address not in (c.original, c.reply)
        ]

    def set_accept_ra(self, name: str, value: int) -> None:
        operation = "set accept_ra"
        link = self.state.links.get(name)
        if link is None or link.accept_ra is None:
            # No /proc/sys/net/ipv6/conf/<name>: no such device, or it has no IPv6.
            raise host_error(operation, name, errno.ENOENT)
        self._mutate(operation, name)
        self.state.links[name] = replace(link, accept_ra=value)

    def create_tap(self, name: str, options: TapOptions) -> int:
        self._new_link("create tap", name, "tun", 1500, tap=options)
        return self.state.links[name].index

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
        """Like the kernel's do_setlink: the attributes are applied in its order (address,
        MTU, group, alias, flags, then master), and a failing step keeps the earlier ones. Changing
        the master releases the old one before the new one is checked. The isolation is
        a request of its own after that one (as the kernel backend sends it)."""
        operation = "set link"
        if index is not None:
            found = self._by_index(index)
            if found is None:
                raise host_error(operation, name, errno.ENODEV, f"no device with index {index}")
            name = found.name
        link = self._require(operation, name)
        if alias is not None and len(alias.encode()) > IFALIASZ - 1:
            raise host_error(operation, name, errno.ERANGE, "ifalias too long")
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            raise host_error(operation, name, errno.EINVAL)
        if address is not None and (len(address) != 6 or address[0] & 1 or not any(address)):
            raise host_error(operation, name, errno.EADDRNOTAVAIL)  # eth_mac_addr's rule
        self._mutate(operation, name)
        changes: dict[str, object] = {}
        if address is not None:
            changes["address"] = address
        if mtu is not None:
            changes["mtu"] = mtu
        if group is not None:
            changes["group"] = group
        if alias is not None:
            changes["alias"] = alias or None
        if up is not None:
            changes["up"] = up
        link = self.state.links[name] = replace(link, **changes)  # type: ignore[arg-type]
        self._set_master(operation, link, master)
        if isolated is not None:
            self.set_port_isolated(name, isolated)

    def _set_master(self, operation: str, link: Link, master: int | None) -> None:
        """do_set_master: 0 releases the device; another master releases the old one
        before the new one is checked."""
        name = link.name
        if master is None or link.master == master:
            return
        if link.master is not None:
            link = self.state.links[name] = replace(link, master=None, isolated=False)
        if master == NO_MASTER:
            return
        bridge = self._by_index(master)
        if bridge is None:
            raise host_error(operation, name, errno.EINVAL, f"no device with index {master}")
        if bridge.kind != "bridge":
            raise host_error(operation, name, errno.EOPNOTSUPP, f"{bridge.name} is no bridge")
        if link.kind == "bridge":
            raise host_error(operation, name, errno.ELOOP)
        ports = sum(1 for other in self.state.links.values() if other.master == master)
        if ports >= MAX_BRIDGE_PORTS:
            raise host_error(operation, name, errno.EXFULL, f"{bridge.name} is full")
        self.state.links[name] = replace(link, master=master)

    def create_taps(self, names: Sequence[str], options: TapOptions) -> dict[str, HostError]:
        failed: dict[str, HostError] = {}
        for name in names:
            try:
                self.create_tap(name, options)
            except HostError as exc:
                failed[name] = exc
        return failed

    def set_links(self, changes: Sequence[LinkSetting]) -> dict[str, HostError]:
        """Each change as set_link, in order (the kernel handles pipelined requests one
        after the other too); a failing one does not stop the others."""
        failed: dict[str, HostError] = {}
        for c in changes:
            try:
                self.set_link(
                    c.name,
                    index=c.index,
                    master=c.master,
                    mtu=c.mtu,
                    up=c.up,
                    alias=c.alias,
                    isolated=c.isolated,
                    group=c.group,
                )
            except HostError as exc:
                failed[c.name] = exc
        return failed

    def set_port_isolated(self, name: str, isolated: bool) -> None:
        link = self._require("set port isolation", name)
        if link.master is None:
            raise host_error("set port isolation", name, errno.EOPNOTSUPP, "not a bridge port")
        self._mutate("set port isolation", name)
        self.state.links[name] = replace(link, isolated=isolated)

    def _remove(self, link: Link) -> None:
        del self.state.links[link.name]
        self.state.addresses = [a for a in self.state.addresses if a.index != link.index]
        self.state.neighbours = {
            k: v for k, v in self.state.neighbours.items() if k[0] != link.index
        }
        for other in list(self.state.links.values()):
            if other.master == link.index:
                self.state.links[other.name] = replace(other, master=None, isolated=False)

    def delete_link(self, name: str, index: int | None = None) -> None:
        if index is not None:
            found = self._by_index(index)
            if found is None:
                raise host_error("delete link", name, errno.ENODEV)
            name = found.name
        link = self._require("delete link", name)
        self._mutate("delete link", name)
        self._remove(link)

    def delete_links(self, names: Sequence[str]) -> None:
        present = [self.state.links[n] for n in names if n in self.state.links]
        if not present:
            return
        self._mutate("delete links", ",".join(link.name for link in present))
        for link in present:
            self._remove(link)

    def get_links(self, names: Sequence[str]) -> dict[str, Link]:
        return {name: self.state.links[name] for name in names if name in self.state.links}

    def change_links(self, changes: Sequence[LinkChange]) -> list[tuple[LinkChange, int]]:
        failed: list[tuple[LinkChange, int]] = []
        for change in changes:
            try:
                self._change(change)
            except HostError as exc:
                failed.append((change, exc.errno))
        return failed

    def _change(self, change: LinkChange) -> None:
        """do_setlink by ifindex, in the kernel's order: group, name, alias, flags, master;
        a failing step keeps the earlier ones."""
        operation = "set link"
        link = self._by_index(change.index)
        if link is None:
            raise host_error(operation, f"index {change.index}", errno.ENODEV)
        if change.alias is not None and len(change.alias.encode()) > IFALIASZ - 1:
            raise host_error(operation, link.name, errno.ERANGE, "ifalias too long")
        if change.name is not None and len(change.name.encode()) >= IFNAMSIZ:
            raise host_error(operation, link.name, errno.ERANGE)
        self._mutate(operation, link.name)
        if change.group is not None:
            link = self._put(replace(link, group=change.group))
        if change.name is not None and change.name != link.name:
            if not _valid_name(change.name):
                raise host_error(operation, link.name, errno.EINVAL, "invalid name")
            if change.name in self.state.links:
                raise host_error(operation, link.name, errno.EEXIST, f"{change.name} exists")
            if link.up and not self.state.live_rename:
                raise host_error(operation, link.name, errno.EBUSY, "the device is up")
            del self.state.links[link.name]
            link = self._put(replace(link, name=change.name))
        if change.alias is not None:
            link = self._put(replace(link, alias=change.alias or None))
        if change.up is not None:
            link = self._put(replace(link, up=change.up))
        self._set_master(operation, link, change.master)

    def _put(self, link: Link) -> Link:
        self.state.links[link.name] = link
        return link

    def link_groups(self) -> set[int]:
        return {link.group for link in self.state.links.values()}

    def delete_group(self, group: int) -> None:
        """Like the kernel, group 0 (every device's default) is refused."""
        if group == 0:
            raise host_error("delete link group", "0", errno.EOPNOTSUPP)
        members = [link for link in self.state.links.values() if link.group == group]
        if not members:
            return
        self._mutate("delete link group", str(group))
        for link in members:
            self._remove(link)

    def deleter(self) -> FakeBackend:
        """Another backend over the same state, with its own fault injection."""
        return FakeBackend(self.state)

    # Addresses --------------------------------------------------------------------------

    def list_addresses(self, index: int | None = None) -> list[Address]:
        return [a for a in self.state.addresses if index is None or a.index == index]

    def _device(self, operation: str, index: int) -> str:
        link = self._by_index(index)
        if link is None:
            raise host_error(operation, f"index {index}", errno.ENODEV)
        return link.name

    def add_address(self, index: int, interface: ipaddress.IPv4Interface) -> None:
        device = self._device("add address", index)
        if Address(index, interface) in self.state.addresses:
            raise host_error("add address", device, errno.EEXIST, str(interface))
        self._mutate("add address", device)
        self.state.addresses.append(Address(index, interface))

    def delete_address(self, index: int, interface: ipaddress.IPv4Interface) -> None:
        device = self._device("delete address", index)
        if Address(index, interface) not in self.state.addresses:
            raise host_error("delete address", device, errno.EADDRNOTAVAIL, str(interface))
        self._mutate("delete address", device)
        self.state.addresses.remove(Address(index, interface))

    def forget_neighbour(self, index: int, address: ipaddress.IPv4Address) -> None:
        device = self._device("delete neighbour", index)
        if (index, address) not in self.state.neighbours:
            raise host_error(f"delete neighbour {address}", device, errno.ENOENT)
        self._mutate("delete neighbour", device)
        del self.state.neighbours[index, address]

    # ip_forward -------------------------------------------------------------------------

    def get_ip_forward(self) -> bool:
        return self.state.ip_forward

    def set_ip_forward(self, enabled: bool) -> None:
        self._mutate("set ip_forward", None)
        self.state.ip_forward = enabled

    # Firewall ---------------------------------------------------------------------------

    def firewall(self, kind: FirewallKind) -> Firewall:
        found = self._firewalls.get(kind)
        if found is None:
            if kind == "nftables":
                runner = FakeNftRunner(self.state.nftables, on_change=self._mutate)
                found = NftablesFirewall(runner, lambda: None, FakeElements(runner))
            else:
                found = XtablesFirewall(self)
            self._firewalls[kind] = found
        return found

    def xtables_unavailable(self) -> str | None:
        return None

    def legacy_tables(self) -> set[str]:
        return set(self.state.legacy_tables)

    def legacy_in_use(self) -> bool:
        state = self.state
        return bool(state.policies) or any(
            rules or chain not in BUILTIN_CHAINS[table]
            for table in state.legacy_tables
            for chain, rules in state.chains[table].items()
        )

    def legacy_policy(self, table: str, chain: str) -> str:
        self._chain("read policy", table, chain)
        return self.state.policies.get((table, chain), "ACCEPT")

    def read_proc(self, path: str) -> str | None:
        if path == "/proc/sys/net/ipv4/ip_forward":
            return "1\n" if self.state.ip_forward else "0\n"
        return self.state.proc.get(path)

    def set_policy(self, table: str, chain: str, policy: str) -> None:
        """Set a built-in chain's policy, as `iptables-legacy -P` would."""
        self._chain("set policy", table, chain)
        if policy == "ACCEPT":
            self.state.policies.pop((table, chain), None)
        else:
            self.state.policies[(table, chain)] = policy

    def _table(self, operation: str, table: str) -> dict[str, list[Rule]]:
        if table not in self.state.chains:
            raise host_error(operation, f"table {table}", errno.ENOENT)
        self.state.legacy_tables.add(table)
        return self.state.chains[table]

    def _chain(self, operation: str, table: str, chain: str) -> list[Rule]:
        chains = self._table(operation, table)
        if chain not in chains:
            raise host_error(operation, f"chain {table}/{chain}", errno.ENOENT)
        return chains[chain]

    def list_chains(self, table: str) -> list[str]:
        return list(self._table("list chains", table))

    def create_chain(self, table: str, chain: str) -> None:
        chains = self._table("create chain", table)
        if chain in chains:
            raise host_error("create chain", f"chain {table}/{chain}", errno.EEXIST)
        self._mutate("create chain", f"chain {table}/{chain}")
        chains[chain] = []

    def delete_chain(self, table: str, chain: str) -> None:
        operation = "delete chain"
        where = f"chain {table}/{chain}"
        rules = self._chain(operation, table, chain)
        if chain in BUILTIN_CHAINS[table]:
            raise host_error(operation, where, errno.EPERM)
        if rules:
            raise host_error(operation, where, errno.ENOTEMPTY)
        if any(r.target == chain for rs in self.state.chains[table].values() for r in rs):
            raise host_error(operation, where, errno.EMLINK)
        self._mutate(operation, where)
        del self.state.chains[table][chain]

    def list_rules(self, table: str, chain: str) -> list[Rule]:
        return list(self._chain("list rules", table, chain))

    def insert_rule(self, table: str, chain: str, rule: Rule, position: int = 0) -> None:
        operation = "insert rule"
        where = f"chain {table}/{chain}"
        rules = self._chain(operation, table, chain)
        if rule.target not in STANDARD_TARGETS and rule.target not in self.state.chains[table]:
            raise host_error(operation, where, errno.ENOENT, f"no target {rule.target}")
        if not 0 <= position <= len(rules):
            raise host_error(operation, where, errno.E2BIG)
        self._mutate(operation, where)
        rules.insert(position, rule)

    def delete_rule(self, table: str, chain: str, rule: Rule) -> None:
        operation = "delete rule"
        where = f"chain {table}/{chain}"
        rules = self._chain(operation, table, chain)
        if rule not in rules:
            raise host_error(operation, where, errno.ENOENT)
        self._mutate(operation, where)
        rules.remove(rule)

    def close(self) -> None:
        """Nothing to release: the state lives as long as the object."""


def _valid_name(name: str) -> bool:
    """The kernel's dev_valid_name."""
    return (
        bool(name)
        and name not in (".", "..")
        and not any(c == "/" or c == ":" or c.isspace() for c in name)
    )


def _locked(method: F) -> F:
    @functools.wraps(method)
    def run(self: FakeBackend, *args: Any, **kwargs: Any) -> Any:
        with self.state.lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


for _name, _method in list(vars(FakeBackend).items()):
    if callable(_method) and not _name.startswith("_"):
        setattr(FakeBackend, _name, _locked(_method))


def _unlock_in_child() -> None:
    """A fork while another thread held a state's lock must not leave the child stuck."""
    for state in list(_states.values()):
        state.lock = threading.RLock()


os.register_at_fork(after_in_child=_unlock_in_child)
