"""The firewall seam on nftables: netvm's own table per bridge, one transaction per change.

netvm keeps, for bridge B, the table `inet netvm-B` with a `forward` chain (filter hook) and
a `postrouting` chain (NAT hook), every rule commented `netvm:B`. Where the iptables-nft
`filter` table is present (Docker, or an administrator's `iptables -P FORWARD DROP`), the
accepts of `BridgeFirewall.passes` go into its DOCKER-USER chain or at the top of FORWARD,
in the same transaction: written as plain iifname/oifname matches with a comment, which
iptables-nft lists as `-i B -o E -m comment --comment netvm:B -j ACCEPT`.

Commands are libnftables JSON (names are JSON strings, never parsed as syntax). A warm
ensure reads the two tables and, when they already hold what they should, changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Any, Protocol, cast

from netvm.errors import ConflictError, HostError
from netvm.firewall.model import (
    Action,
    BridgeFirewall,
    FirewallKind,
    FirewallRule,
    Placed,
    pass_chain,
    tag_of,
)

Json = dict[str, Any]
FAMILY = "inet"
IPTABLES_FAMILY, IPTABLES_TABLE = "ip", "filter"
TABLE_PREFIX = "netvm-"
CHAINS: dict[str, Json] = {
    "forward": {"type": "filter", "hook": "forward", "prio": 0, "policy": "accept"},
    "postrouting": {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
}


class NftRunner(Protocol):
    """Runs libnftables JSON commands in one namespace, as one transaction."""

    def run(self, commands: list[Json], operation: str, where: str | None) -> list[Json]:
        """The objects the commands listed (metainfo left out); HostError on failure."""

    def generation(self) -> int | None:
        """The ruleset's generation (bumped by every commit), or None if unknown."""


def table_name(bridge: str) -> str:
    return TABLE_PREFIX + bridge


def _meta(key: str, value: str) -> Json:
    return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}}


def rule_exprs(rule: FirewallRule) -> list[Json]:
    """The rule as libnftables JSON expressions."""
    exprs: list[Json] = []
    if rule.source is not None:
        prefix = {"addr": str(rule.source.network_address), "len": rule.source.prefixlen}
        exprs.append(
            {
                "match": {
                    "op": "==",
                    "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": {"prefix": prefix},
                }
            }
        )
    if rule.in_iface is not None:
        exprs.append(_meta("iifname", rule.in_iface))
    if rule.out_iface is not None:
        exprs.append(_meta("oifname", rule.out_iface))
    if rule.established:
        exprs.append(
            {
                "match": {
                    "op": "in",
                    "left": {"ct": {"key": "state"}},
                    "right": ["established", "related"],
                }
            }
        )
    exprs.append({rule.action: None})
    return exprs


def _canonical(exprs: object) -> str:
    return json.dumps(exprs, sort_keys=True)


def decode_exprs(exprs: list[Json]) -> FirewallRule | None:
    """The FirewallRule these expressions are (as rule_exprs writes it), or None."""
    fields: dict[str, Any] = {}
    try:
        *matches, verdict = exprs
        (action,) = verdict
        if action not in ("accept", "drop", "masquerade"):
            return None
        for item in matches:
            match = item["match"]
            left, right = match["left"], match["right"]
            if "meta" in left and left["meta"]["key"] in ("iifname", "oifname"):
                key = "in_iface" if left["meta"]["key"] == "iifname" else "out_iface"
                fields[key] = right
            elif "ct" in left:
                fields["established"] = True
            else:
                prefix = right["prefix"]
                fields["source"] = ipaddress.IPv4Network(f"{prefix['addr']}/{prefix['len']}")
        rule = FirewallRule(cast(Action, action), **fields)
    except (KeyError, TypeError, ValueError):
        return None
    return rule if _canonical(rule_exprs(rule)) == _canonical(exprs) else None


def _text(exprs: list[Json]) -> str:
    rule = decode_exprs(exprs)
    return rule.describe() if rule is not None else _canonical(exprs)


class _Table:
    """One table as listed: its chains (name -> spec) and rules (in order)."""

    def __init__(self, objects: list[Json]) -> None:
        self.chains: dict[str, Json] = {}
        self.rules: list[Json] = []
        for item in objects:
            if "chain" in item:
                self.chains[item["chain"]["name"]] = item["chain"]
            elif "rule" in item:
                self.rules.append(item["rule"])


def _spec(chain: Json) -> Json:
    return {key: chain.get(key) for key in ("type", "hook", "prio", "policy")}


class NftablesFirewall:
    kind: FirewallKind = "nftables"

    def __init__(self, runner: NftRunner, unavailable: Callable[[], str | None]) -> None:
        self._runner = runner
        self._unavailable = unavailable
        self._verified: dict[str, tuple[BridgeFirewall, int]] = {}
        """bridge -> (policy, generation at which its rules were seen in place)."""

    def unavailable(self) -> str | None:
        return self._unavailable()

    def close(self) -> None:
        """Release the runner's context and sockets (not part of the Firewall seam)."""
        close = getattr(self._runner, "close", None)
        if close is not None:
            close()

    def _run(self, commands: list[Json], operation: str, where: str | None) -> list[Json]:
        return self._runner.run(commands, operation, where)

    def _tables(self) -> set[tuple[str, str]]:
        listed = self._run([{"list": {"tables": None}}], "list nftables tables", None)
        return {(t["table"]["family"], t["table"]["name"]) for t in listed if "table" in t}

    def _list_table(self, family: str, name: str, tables: set[tuple[str, str]]) -> _Table | None:
        """The table, or None when `tables` (from `_tables`) does not hold it.

        Existence is asked first because libnftables reports a failed listing only as
        text: netvm never tells errors apart by their message.
        """
        if (family, name) not in tables:
            return None
        command = {"list": {"table": {"family": family, "name": name}}}
        return _Table(self._run([command], "list nftables table", f"{family} {name}"))

    def _read(self, bridge: str) -> tuple[_Table | None, _Table | None]:
        """netvm's table of `bridge` and the iptables-nft filter table, where they exist."""
        tables = self._tables()
        return (
            self._list_table(FAMILY, table_name(bridge), tables),
            self._list_table(IPTABLES_FAMILY, IPTABLES_TABLE, tables),
        )

    def _try_list(self, family: str, name: str) -> _Table | None:
        """The table, or None if listing it fails (it does not exist, most likely).

        For ensure's warm path: two requests instead of three. A failure other than a
        missing table cannot hide here: ensure then writes, and that transaction reports it
        by errno.
        """
        command = {"list": {"table": {"family": family, "name": name}}}
        try:
            return _Table(self._run([command], "list nftables table", f"{family} {name}"))
        except HostError:
            return None

    def _commit(self, build: Callable[[], list[Json]], operation: str, where: str) -> bool:
        """Run what `build` (which reads the tables) asks for, as one transaction.

        Another writer may change the iptables-nft table between the read and the commit
        (a rule netvm deletes by handle is gone): the batch then fails as a whole. It is
        built again from a fresh read, and tried again only if that read changed it.
        """
        commands = build()
        for _ in range(3):
            if not commands:
                return False
            try:
                self._run(commands, operation, where)
            except HostError:
                fresh = build()
                if fresh == commands:
                    raise
                commands = fresh
                continue
            return True
        self._run(commands, operation, where)
        return True

    def ruleset(self) -> list[Json]:
        """Every table, chain and rule of the namespace (for tests and `doctor`)."""
        return self._run([{"list": {"ruleset": None}}], "list nftables ruleset", None)

    def in_use(self) -> bool:
        return any(not name.startswith(TABLE_PREFIX) for _, name in self._tables())

    # Set-up -----------------------------------------------------------------------------

    def _own_commands(self, policy: BridgeFirewall) -> list[Json]:
        table = {"family": FAMILY, "name": table_name(policy.bridge)}
        commands: list[Json] = [
            {"add": {"table": dict(table)}},
            {"delete": {"table": dict(table)}},
            {"add": {"table": dict(table)}},
        ]
        for chain, spec in CHAINS.items():
            commands.append(
                {"add": {"chain": {**table, "table": table["name"], "name": chain, **spec}}}
            )
        for chain, rules in (("forward", policy.forward), ("postrouting", policy.postrouting)):
            for rule in rules:
                commands.append(
                    {
                        "add": {
                            "rule": {
                                "family": FAMILY,
                                "table": table["name"],
                                "chain": chain,
                                "expr": rule_exprs(rule),
                                "comment": policy.tag,
                            }
                        }
                    }
                )
        return commands

    def _own_is_current(self, policy: BridgeFirewall, table: _Table | None) -> bool:
        if table is None:
            return False
        foreign = [rule for rule in table.rules if rule.get("comment") != policy.tag]
        if foreign or set(table.chains) - set(CHAINS):
            raise ConflictError(
                f"nftables table {FAMILY} {table_name(policy.bridge)} holds chains or rules "
                f"netvm did not write (no comment {policy.tag!r}); remove them, netvm will not"
            )
        if {name: _spec(chain) for name, chain in table.chains.items()} != CHAINS:
            return False
        have = [(rule["chain"], _canonical(rule["expr"])) for rule in table.rules]
        want = [
            (chain, _canonical(rule_exprs(rule)))
            for chain, rules in (("forward", policy.forward), ("postrouting", policy.postrouting))
            for rule in rules
        ]
        return have == want

    def _pass_commands(self, policy: BridgeFirewall, table: _Table | None) -> list[Json]:
        """Commands that make the iptables-nft filter table hold exactly netvm's passes."""
        if table is None:
            return []
        target = pass_chain(table.chains) if _is_iptables_nft(table) else None
        mine = [rule for rule in table.rules if rule.get("comment") == policy.tag]
        want = [_canonical(rule_exprs(rule)) for rule in policy.passes] if target else []
        have = sorted(_canonical(rule["expr"]) for rule in mine if rule["chain"] == target)
        if have == sorted(want) and len(mine) == len(have):
            return []
        commands: list[Json] = [{"delete": {"rule": _rule_ref(rule)}} for rule in mine]
        if target is not None:
            # "insert" puts a rule first: inserted in reverse, they keep their order.
            for rule in reversed(policy.passes):
                commands.append(
                    {
                        "insert": {
                            "rule": {
                                "family": IPTABLES_FAMILY,
                                "table": IPTABLES_TABLE,
                                "chain": target,
                                "expr": rule_exprs(rule),
                                "comment": policy.tag,
                            }
                        }
                    }
                )
        return commands

    def ensure(self, policy: BridgeFirewall) -> bool:
        """Converge; while the ruleset's generation is the one at which this policy was last
        seen in place, nothing is read again (see generation.py)."""
        before = self._runner.generation()
        if before is not None and self._verified.get(policy.bridge) == (policy, before):
            return False
        self._verified.pop(policy.bridge, None)
        changed = self._ensure(policy)
        after = self._runner.generation()
        # Trust the generation only if no other commit could have slipped in: none at all,
        # or exactly ours.
        if before is not None and after == before + (1 if changed else 0):
            self._verified[policy.bridge] = (policy, after)
        return changed

    def _ensure(self, policy: BridgeFirewall) -> bool:
        def build() -> list[Json]:
            own = self._try_list(FAMILY, table_name(policy.bridge))
            iptables = self._try_list(IPTABLES_FAMILY, IPTABLES_TABLE)
            commands = [] if self._own_is_current(policy, own) else self._own_commands(policy)
            return commands + self._pass_commands(policy, iptables)

        where = f"{FAMILY} {table_name(policy.bridge)}"
        return self._commit(build, "set up nftables rules", where)

    def check(self, policy: BridgeFirewall) -> list[str]:
        own, iptables = self._read(policy.bridge)
        problems: list[str] = []
        try:
            current = self._own_is_current(policy, own)
        except ConflictError as exc:
            return [str(exc)]
        if not current:
            problems.append(
                f"nftables table {FAMILY} {table_name(policy.bridge)} is missing or differs"
            )
        if self._pass_commands(policy, iptables):
            problems.append(
                f"netvm's accepts in the iptables-nft table {IPTABLES_FAMILY} {IPTABLES_TABLE} "
                "are missing or misplaced"
            )
        return problems

    # Listing and removal ----------------------------------------------------------------

    def listing(self, bridge: str) -> list[Placed]:
        tag = tag_of(bridge)
        own, iptables = self._read(bridge)
        found: list[Placed] = []
        if own is not None:
            found += [
                Placed(f"{FAMILY} {table_name(bridge)} {rule['chain']}", _text(rule["expr"]))
                for rule in own.rules
                if rule.get("comment") == tag
            ]
        if iptables is not None:
            found += [
                Placed(f"{IPTABLES_FAMILY} {IPTABLES_TABLE} {rule['chain']}", _text(rule["expr"]))
                for rule in iptables.rules
                if rule.get("comment") == tag
            ]
        return found

    def remove(self, bridge: str) -> list[str]:
        tag = tag_of(bridge)
        problems: list[str] = []
        self._verified.pop(bridge, None)

        def build() -> list[Json]:
            own, iptables = self._read(bridge)
            problems.clear()
            commands: list[Json] = []
            if own is not None:
                foreign = [rule for rule in own.rules if rule.get("comment") != tag]
                if foreign or set(own.chains) - set(CHAINS):
                    # Someone else's rules live in netvm's table: keep it, take only netvm's.
                    problems.append(
                        f"nftables table {FAMILY} {table_name(bridge)} kept: it holds chains "
                        "or rules netvm did not write"
                    )
                    commands += [
                        {"delete": {"rule": _rule_ref(rule)}}
                        for rule in own.rules
                        if rule.get("comment") == tag
                    ]
                else:
                    table = {"family": FAMILY, "name": table_name(bridge)}
                    commands.append({"delete": {"table": table}})
            if iptables is not None:
                commands += [
                    {"delete": {"rule": _rule_ref(rule)}}
                    for rule in iptables.rules
                    if rule.get("comment") == tag
                ]
            return commands

        self._commit(build, "remove nftables rules", f"{FAMILY} {table_name(bridge)}")
        return list(problems)


def _rule_ref(rule: Json) -> Json:
    return {key: rule[key] for key in ("family", "table", "chain", "handle")}


def _is_iptables_nft(table: _Table) -> bool:
    """iptables-nft names its base chains in capitals (FORWARD at the forward hook)."""
    forward = table.chains.get("FORWARD")
    return forward is not None and forward.get("hook") == "forward"
