"""The firewall seam on the legacy xtables tables (python-iptables), one rule at a time.

For bridge B netvm keeps the chains NETVM-FWD-B (filter) and NETVM-NAT-B (nat), jumped to
from DOCKER-USER when Docker made it (else from the top of FORWARD) and from POSTROUTING.
xtables has no transaction: each step of an ensure is undone if a later one fails. Tables
the kernel has not instantiated in the namespace are never read: reading one would create
it, and iptables-nft would then warn that legacy tables are present.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection

from netvm.backends.base import FILTER, NAT, Rule, XtablesTables
from netvm.errors import ConfigError, ConflictError, HostError
from netvm.firewall.guard import VmGuard
from netvm.firewall.model import (
    DOCKER_USER,
    BridgeFirewall,
    FirewallKind,
    FirewallRule,
    Placed,
    pass_chain,
    tag_of,
)
from netvm.undo import Undo

_TARGETS = {"accept": "ACCEPT", "drop": "DROP", "masquerade": "MASQUERADE"}
JUMP_CHAINS = {FILTER: ("FORWARD", DOCKER_USER), NAT: ("POSTROUTING",)}


def forward_chain(bridge: str) -> str:
    return f"NETVM-FWD-{bridge}"


def nat_chain(bridge: str) -> str:
    return f"NETVM-NAT-{bridge}"


def to_rule(rule: FirewallRule, tag: str) -> Rule:
    return Rule(
        _TARGETS[rule.action],
        source=rule.source,
        in_iface=rule.in_iface,
        out_iface=rule.out_iface,
        ctstate=("ESTABLISHED", "RELATED") if rule.established else (),
        comment=tag,
    )


def describe_rule(rule: Rule) -> str:
    """A rule in iptables-save's notation (without the chain)."""
    parts: list[str] = []
    if rule.source is not None:
        parts += ["-s", str(rule.source)]
    if rule.in_iface is not None:
        parts += ["-i", rule.in_iface]
    if rule.out_iface is not None:
        parts += ["-o", rule.out_iface]
    if rule.ctstate:
        parts += ["-m", "conntrack", "--ctstate", ",".join(rule.ctstate)]
    if rule.comment is not None:
        parts += ["-m", "comment", "--comment", rule.comment]
    if rule.other:
        parts.append(rule.other)
    parts += ["-j", rule.target]
    return " ".join(parts)


class XtablesFirewall:
    kind: FirewallKind = "iptables"

    def __init__(self, tables: XtablesTables) -> None:
        self._tables = tables

    def unavailable(self) -> str | None:
        return self._tables.xtables_unavailable()

    def in_use(self) -> bool:
        return self._tables.legacy_in_use()

    def expected(self, policy: BridgeFirewall) -> dict[tuple[str, str], list[Rule]]:
        """(table, chain) -> netvm's rules there, the jumps included, for this host."""
        tag = policy.tag
        jump_from = pass_chain(self._tables.list_chains(FILTER))
        expected = {
            (FILTER, forward_chain(policy.bridge)): [to_rule(r, tag) for r in policy.forward],
            (NAT, nat_chain(policy.bridge)): [to_rule(r, tag) for r in policy.postrouting],
            (NAT, "POSTROUTING"): [Rule(nat_chain(policy.bridge), comment=tag)],
        }
        if jump_from is not None:
            expected[(FILTER, jump_from)] = [Rule(forward_chain(policy.bridge), comment=tag)]
        return expected

    def ensure(self, policy: BridgeFirewall) -> bool:
        undo = Undo()
        changed = False
        try:
            expected = self.expected(policy)
            for table, chain in (
                (FILTER, forward_chain(policy.bridge)),
                (NAT, nat_chain(policy.bridge)),
            ):
                changed |= self._ensure_chain(
                    table, chain, expected[(table, chain)], policy.tag, undo
                )
            for table, builtins in JUMP_CHAINS.items():
                present = self._tables.list_chains(table)
                for builtin in builtins:
                    if builtin not in present:
                        continue
                    changed |= self._ensure_jumps(
                        table, builtin, expected.get((table, builtin), []), policy, undo
                    )
        except BaseException:
            undo.run()
            raise
        return changed

    def _ensure_jumps(
        self, table: str, chain: str, wanted: list[Rule], policy: BridgeFirewall, undo: Undo
    ) -> bool:
        own = {forward_chain(policy.bridge), nat_chain(policy.bridge)}
        current = self._tables.list_rules(table, chain)
        changed = False
        for rule in current:
            if rule.comment == policy.tag and rule.target in own and rule not in wanted:
                self._tables.delete_rule(table, chain, rule)
                undo.push(f"restore a rule in {table}/{chain}", self._reinsert(table, chain, rule))
                changed = True
        for rule in wanted:
            if rule not in current:
                self._insert(table, chain, rule, 0, undo)
                changed = True
        return changed

    def _insert(self, table: str, chain: str, rule: Rule, position: int, undo: Undo) -> None:
        self._tables.insert_rule(table, chain, rule, position)
        undo.push(
            f"delete a rule from {table}/{chain}",
            lambda: self._tables.delete_rule(table, chain, rule),
        )

    def _reinsert(self, table: str, chain: str, rule: Rule) -> Callable[[], None]:
        return lambda: self._tables.insert_rule(table, chain, rule, 0)

    def _ensure_chain(
        self, table: str, chain: str, expected: list[Rule], tag: str, undo: Undo
    ) -> bool:
        if chain not in self._tables.list_chains(table):
            self._tables.create_chain(table, chain)
            undo.push(
                f"delete chain {table}/{chain}", lambda: self._tables.delete_chain(table, chain)
            )
            current: list[Rule] = []
        else:
            current = self._tables.list_rules(table, chain)
        foreign = [rule for rule in current if rule.comment != tag]
        if foreign:
            raise ConflictError(
                f"chain {table}/{chain} holds {len(foreign)} rule(s) netvm did not write "
                f"(no comment {tag!r}); remove them, netvm will not"
            )
        if current == expected:
            return False
        for rule in current:
            self._tables.delete_rule(table, chain, rule)
            undo.push(f"restore a rule in {table}/{chain}", self._reinsert(table, chain, rule))
        for position, rule in enumerate(expected):
            self._insert(table, chain, rule, position, undo)
        return True

    def check(self, policy: BridgeFirewall) -> list[str]:
        problems: list[str] = []
        chains = {table: self._tables.list_chains(table) for table in (FILTER, NAT)}
        for (table, chain), rules in self.expected(policy).items():
            current = self._tables.list_rules(table, chain) if chain in chains[table] else []
            problems += [
                f"rule missing in {table}/{chain}: {describe_rule(rule)}"
                for rule in rules
                if rule not in current
            ]
        return problems

    # Listing and removal ----------------------------------------------------------------

    def _present(self) -> set[str]:
        if self.unavailable() is not None:
            return set()
        return self._tables.legacy_tables() & {FILTER, NAT}

    def listing(self, bridge: str, guarantees: bool = False) -> list[Placed]:
        tag = tag_of(bridge)
        own = {FILTER: forward_chain(bridge), NAT: nat_chain(bridge)}
        found: list[Placed] = []
        for table in sorted(self._present()):
            chains = self._tables.list_chains(table)
            for chain in (*JUMP_CHAINS[table], own[table]):
                if chain not in chains:
                    continue
                found += [
                    Placed(f"{table} {chain}", f"-A {chain} {describe_rule(rule)}")
                    for rule in self._tables.list_rules(table, chain)
                    if rule.comment == tag
                ]
        return found

    def remove(self, bridge: str) -> list[str]:
        tag = tag_of(bridge)
        problems: list[str] = []
        own = {FILTER: forward_chain(bridge), NAT: nat_chain(bridge)}
        for table in sorted(self._present()):
            chains = self._tables.list_chains(table)
            for builtin in JUMP_CHAINS[table]:
                if builtin not in chains:
                    continue
                for rule in self._tables.list_rules(table, builtin):
                    if rule.comment == tag and rule.target == own[table]:
                        self._tables.delete_rule(table, builtin, rule)
            chain = own[table]
            if chain not in chains:
                continue
            remaining = self._tables.list_rules(table, chain)
            for rule in remaining:
                if rule.comment == tag:
                    self._tables.delete_rule(table, chain, rule)
            if any(rule.comment != tag for rule in remaining):
                problems.append(f"chain {table}/{chain} kept: it holds rules netvm did not write")
                continue
            try:
                self._tables.delete_chain(table, chain)
            except HostError as exc:
                if exc.errno not in (errno.EMLINK, errno.EBUSY, errno.ENOTEMPTY):
                    raise
                problems.append(
                    f"chain {table}/{chain} kept (emptied): a rule netvm did not write jumps to it"
                )
        return problems

    # Per-VM guarantees -------------------------------------------------------------------
    # Without ipset (python-iptables has none) each guarantee would be rules per VM in
    # chains every packet walks: netvm refuses instead of making attach O(N).

    def guard(self, bridge: str, vm: VmGuard, fresh: bool = False) -> None:
        if vm.policy.any:
            raise ConfigError(
                "guest policy",
                vm.policy.describe(),
                f"{', '.join(vm.policy.needs())} needs the nftables firewall "
                "(firewall='nftables', or 'auto' on a host whose legacy tables hold no rules); "
                "the iptables firewall has no sets to keep it O(1) per VM",
            )

    def restore(self, bridge: str, vm: VmGuard) -> None:
        self.guard(bridge, vm)

    def record(self, bridge: str, tap: str) -> VmGuard | None:
        return None

    def unguard(self, bridge: str, taps: Collection[str]) -> dict[str, VmGuard]:
        return {}

    def guards(self, bridge: str) -> dict[str, VmGuard]:
        return {}

    def prune(self, bridge: str, live: Collection[str]) -> list[str]:
        return []
