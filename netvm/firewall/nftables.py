"""The firewall seam on nftables: netvm's own table per bridge, one transaction per change.

netvm keeps, for bridge B, the table `inet netvm-B` with a `forward` chain (filter hook) and
a `postrouting` chain (NAT hook), every rule commented `netvm:B`. Where the iptables-nft
`filter` table is present (Docker, or an administrator's `iptables -P FORWARD DROP`), the
accepts of `BridgeFirewall.passes` go into its DOCKER-USER chain or at the top of FORWARD,
in the same transaction: written as plain iifname/oifname matches with a comment, which
iptables-nft lists as `-i B -o E -m comment --comment netvm:B -j ACCEPT`.

The per-VM guarantees (guard.py, guard_rules.py) add the table `bridge netvm-B` and, in
`inet netvm-B`, a DNAT chain, egress chains and named sets. Converging rewrites chains, never
the tables: the sets keep the elements of the VMs that run. Elements are written by
`ElementStore` (packed netlink on the kernel, elements.py), not libnftables.

Commands are libnftables JSON (names are JSON strings, never parsed as syntax). A warm
ensure reads the tables and, when they already hold what they should, changes nothing.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Protocol, cast

from netvm.errors import ConflictError, HostError, NetvmError, NotFound, host_error
from netvm.firewall import guard_rules
from netvm.firewall.guard import (
    EGRESS_DISPATCH,
    EGRESS_PREFIX,
    FORWARD_PORTS,
    SCHEMAS,
    VMS,
    Element,
    Value,
    VmGuard,
    egress_chain,
    egress_chain_rules,
    egress_members,
    element_from_json,
    elements,
    record_key,
)
from netvm.firewall.model import (
    Action,
    BridgeFirewall,
    FirewallKind,
    FirewallRule,
    Placed,
    pass_chain,
    tag_of,
)
from netvm.policy import PortForward

log = logging.getLogger("netvm")
Json = dict[str, Any]
FAMILY = "inet"
BRIDGE_FAMILY = "bridge"
IPTABLES_FAMILY, IPTABLES_TABLE = "ip", "filter"
TABLE_PREFIX = "netvm-"
_INET_SCHEMAS = {schema.name: schema for schema in SCHEMAS if schema.family == FAMILY}
UNGUARD_CHUNK = 128
"""TAPs whose elements one transaction removes: their keys stay well within a netlink
attribute (64 KiB) and the socket's send buffer."""
CHAINS: dict[str, Json] = {
    "forward": {"type": "filter", "hook": "forward", "prio": 0, "policy": "accept"},
    "postrouting": {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
    "prerouting": {"type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"},
    guard_rules.MASQUERADE_GUARD: guard_rules.MASQUERADE_GUARD_CHAIN,
}
OWN_CHAINS: dict[str, dict[str, Json]] = {FAMILY: CHAINS, BRIDGE_FAMILY: guard_rules.BRIDGE_CHAINS}


class NftRunner(Protocol):
    """Runs libnftables JSON commands in one namespace, as one transaction."""

    def run(self, commands: list[Json], operation: str, where: str | None) -> list[Json]:
        """The objects the commands listed (metainfo left out); HostError on failure."""

    def generation(self) -> int | None:
        """The ruleset's generation (bumped by every commit), or None if unknown."""


class ElementStore(Protocol):
    """Writes and reads elements of netvm's sets, O(1) per element."""

    def commit(
        self, changes: Sequence[tuple[str, Element]], table: str, operation: str, where: str
    ) -> None:
        """("add" | "create" | "delete" | "destroy", element) in order, as one transaction;
        HostError on failure. A destroy is a delete that is no error where the element is
        gone (the set must exist); a create fails where it exists (EEXIST)."""

    def comment(self, element: Element, table: str, operation: str) -> str | None:
        """The comment of the element with this key ("" if none), None if there is none."""

    def listening(self, wanted: Collection[tuple[str, int]]) -> list[str]:
        """`ADDRESS:PORT/PROTOCOL` of host sockets that serve these (protocol, port) pairs
        from outside loopback (listeners.py)."""

    def rule_comments(self, family: str, table: str, operation: str) -> dict[int, str]:
        """handle -> comment of each rule of the table that has one, read from the kernel:
        also the comment of an xtables `comment` match, which libnftables lists without
        its text (iptables-nft-restore writes netvm's comments that way)."""

    def chain_devices(self, operation: str) -> dict[tuple[str, str], list[str]]:
        """(table, chain) -> the devices of each netdev base chain, read from the kernel
        (libnftables before 1.0.7 lists netdev chains without their devices)."""

    def rule_ctstates(self, family: str, table: str, operation: str) -> dict[int, tuple[str, ...]]:
        """handle -> states of each rule whose one xtables match is a plain `conntrack
        --ctstate` (iptables-nft writes them so; libnftables lists them without states)."""


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
    if rule is not None:
        return rule.describe()
    try:
        return " ".join(_statement(expr) for expr in exprs)
    except (KeyError, TypeError, ValueError, AttributeError):
        return _canonical(exprs)


def _operand(value: Any) -> str:
    """An expression or value of libnftables JSON in nft's words (for listings)."""
    if not isinstance(value, dict):
        return str(value)
    ((kind, body),) = value.items()
    if kind == "meta":
        return str(body["key"])
    if kind == "payload":
        return f"{body['protocol']} {body['field']}"
    if kind == "concat":
        return " . ".join(_operand(part) for part in body)
    if kind == "ct":
        return f"ct {body['key']}"
    if kind == "fib":
        return f"fib {' '.join(body['flags'])} {body['result']}"
    if kind == "prefix":
        return f"{body['addr']}/{body['len']}"
    if kind == "range":
        return f"{body[0]}-{body[1]}"
    if kind == "set":
        return "{ " + ", ".join(_operand(item) for item in body) + " }"
    if kind == "map":
        return f"{_operand(body['key'])} map {body['data']}"
    raise ValueError(kind)


def _statement(expr: Json) -> str:
    ((kind, body),) = expr.items()
    if kind == "match":
        op = "" if body["op"] in ("==", "in") else f"{body['op']} "
        return f"{_operand(body['left'])} {op}{_operand(body['right'])}"
    if kind == "vmap":
        return f"{_operand(body['key'])} vmap {body['data']}"
    if kind in ("jump", "goto"):
        return f"{kind} {body['target']}"
    if kind == "dnat":
        return f"dnat ip to {_operand(body['addr'])} : {_operand(body['port'])}"
    if body is None:
        return str(kind)
    raise ValueError(kind)


class _Table:
    """One table as listed: its chains (name -> spec), rules (in order) and sets."""

    def __init__(self, objects: list[Json]) -> None:
        self.chains: dict[str, Json] = {}
        self.rules: list[Json] = []
        self.sets: dict[str, Json] = {}
        for item in objects:
            if "chain" in item:
                self.chains[item["chain"]["name"]] = item["chain"]
            elif "rule" in item:
                self.rules.append(item["rule"])
            else:
                for kind in ("set", "map"):
                    if kind in item:
                        self.sets[item[kind]["name"]] = {"kind": kind, **item[kind]}


def _spec(chain: Json) -> Json:
    return {key: chain.get(key) for key in ("type", "hook", "prio", "policy")}


def wanted_rules(policy: BridgeFirewall) -> dict[str, dict[str, list[list[Json]]]]:
    """family -> chain -> the expressions of its rules, in order, for netvm's two tables."""
    forward = [rule_exprs(rule) for rule in policy.forward]
    return {
        FAMILY: {
            "forward": [
                *guard_rules.forward_head(policy),
                *forward[:-1],
                guard_rules.forward_before_drop(policy),
                forward[-1],
            ],
            "postrouting": [rule_exprs(rule) for rule in policy.postrouting],
            "prerouting": guard_rules.prerouting(policy),
            guard_rules.MASQUERADE_GUARD: guard_rules.masquerade_guard(policy),
        },
        BRIDGE_FAMILY: guard_rules.bridge_rules(policy),
    }


def _set_spec(declared: Json) -> Json:
    return {key: declared.get(key) for key in ("kind", "type", "map", "flags")}


WANTED_SETS: dict[str, dict[str, Json]] = {
    family: {
        schema.name: _set_spec({"kind": kind, **body})
        for schema in SCHEMAS
        if schema.family == family
        for kind, body in schema.declaration("").items()
    }
    for family in OWN_CHAINS
}


def _is_egress(name: str) -> bool:
    """A chain or set of one egress policy (written by guard, removed by prune)."""
    return name.startswith(EGRESS_PREFIX)


LEGACY_SETS = {FAMILY: {"egress"}}
"""Sets earlier netvm versions wrote (a verdict map by address), removed by ensure."""


def _dynamic_set(family: str, name: str) -> bool:
    return family == FAMILY and _is_egress(name)


class NftablesFirewall:
    kind: FirewallKind = "nftables"

    def __init__(
        self,
        runner: NftRunner,
        unavailable: Callable[[], str | None],
        elements: ElementStore | None = None,
    ) -> None:
        self._runner = runner
        self._unavailable = unavailable
        self._elements = elements
        self._verified: dict[str, tuple[BridgeFirewall, int]] = {}
        """bridge -> (policy, generation at which its rules were seen in place)."""

    def unavailable(self) -> str | None:
        return self._unavailable()

    def close(self) -> None:
        """Release the runner's context and sockets (not part of the Firewall seam)."""
        for part in (self._runner, self._elements):
            close = getattr(part, "close", None)
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

    def _read(self, bridge: str) -> tuple[dict[str, _Table | None], _Table | None]:
        """netvm's tables of `bridge` (by family) and the iptables-nft filter table."""
        tables = self._tables()
        own = {
            family: self._list_table(family, table_name(bridge), tables) for family in OWN_CHAINS
        }
        return own, self._with_xt_comments(
            self._list_table(IPTABLES_FAMILY, IPTABLES_TABLE, tables)
        )

    def _with_xt_comments(self, table: _Table | None) -> _Table | None:
        """The iptables-nft table with the comments of its xtables `comment` matches: after
        an iptables-nft-save/restore (netfilter-persistent), netvm's passes carry their tag
        that way, and would be neither found, replaced nor removed by it."""
        if table is None or not any(_xt_commented(rule) for rule in table.rules):
            return table
        comments = self._store().rule_comments(
            IPTABLES_FAMILY, IPTABLES_TABLE, "list nftables rules"
        )
        for rule in table.rules:
            if _xt_commented(rule) and rule.get("handle") in comments:
                rule["comment"] = comments[rule["handle"]]
        return table

    def _try_list(self, family: str, name: str) -> _Table | None:
        """The table, or None if listing it fails (it does not exist, most likely).

        For ensure's warm path: fewer requests. A failure other than a missing table cannot
        hide here: ensure then writes, and that transaction reports it by errno.
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
        """Every table, chain and rule of the namespace (for tests and `doctor`), each
        netdev base chain with its devices ("dev")."""
        listed = self._run([{"list": {"ruleset": None}}], "list nftables ruleset", None)
        unnamed = [
            item["chain"]
            for item in listed
            if "chain" in item
            and item["chain"].get("family") == "netdev"
            and item["chain"].get("hook")
            and not item["chain"].get("dev")
        ]
        if unnamed:
            try:
                devices = self._store().chain_devices("list nftables chains")
            except NetvmError:
                devices = {}  # left without: doctor then says it cannot tell which device
            for chain in unnamed:
                named = devices.get((chain.get("table", ""), chain.get("name", "")))
                if named:
                    chain["dev"] = named[0] if len(named) == 1 else named
        return listed

    def walkable_ruleset(self) -> list[Json]:
        """The ruleset (`ruleset`) with each xtables `conntrack --ctstate` match that
        iptables-nft wrote (libnftables lists it without its states) as the `ct state`
        match it stands for, read from the kernel: what doctor's walk can judge (ufw's
        and Docker's rules on iptables-nft 1.8.9 are written so)."""
        listed = self.ruleset()
        tables = {
            (rule["family"], rule["table"])
            for item in listed
            if (rule := item.get("rule")) is not None and any(map(_is_xt_conntrack, rule["expr"]))
        }
        for family, table in sorted(tables):
            try:
                states = self._store().rule_ctstates(family, table, "read xtables matches")
            except NetvmError:
                continue  # left as they are: the walk calls them unknown
            for item in listed:
                rule = item.get("rule")
                if rule is None or (rule["family"], rule["table"]) != (family, table):
                    continue
                found = states.get(rule.get("handle", -1))
                if found is not None:
                    ct = {"ct": {"key": "state"}}
                    named = [state.lower() for state in found]
                    match = {"match": {"op": "in", "left": ct, "right": named}}
                    rule["expr"] = [match if _is_xt_conntrack(e) else e for e in rule["expr"]]
        return listed

    def in_use(self) -> bool:
        """Whether a table that is not netvm's filters anything: holds a rule, or a base
        chain whose policy drops. An empty table (Debian's default /etc/nftables.conf, or
        one a tool left) does not, and must not make `auto` leave legacy iptables."""
        for family, name in sorted(self._tables()):
            if name.startswith(TABLE_PREFIX):
                continue  # netvm's own (and its per-VM sets): not listed
            table = self._list_table(family, name, {(family, name)})
            if table is not None and (
                table.rules
                or any(c.get("hook") and c.get("policy") == "drop" for c in table.chains.values())
            ):
                return True
        return False

    # Set-up -----------------------------------------------------------------------------

    def _own_commands(
        self, policy: BridgeFirewall, family: str, table: _Table | None
    ) -> list[Json]:
        """Make netvm's table of `family` hold exactly its chains, rules and sets.

        The table is never deleted (its sets hold the running VMs' elements): chains are
        flushed and written again; a chain or set of another shape is replaced.
        """
        name = table_name(policy.bridge)
        ref = {"family": family, "table": name}
        chains, sets = OWN_CHAINS[family], WANTED_SETS[family]
        commands: list[Json] = [{"add": {"table": {"family": family, "name": name}}}]
        present = table.chains if table is not None else {}
        for chain in chains:
            if chain in present:
                commands.append({"flush": {"chain": {**ref, "name": chain}}})
        for chain, spec in chains.items():
            if chain in present and _spec(present[chain]) != _spec(spec):
                commands.append({"delete": {"chain": {**ref, "name": chain}}})
        have_sets = table.sets if table is not None else {}
        for set_name, spec in sets.items():
            if set_name in have_sets and _set_spec(have_sets[set_name]) != spec:
                kind = have_sets[set_name]["kind"]
                commands.append({"delete": {kind: {**ref, "name": set_name}}})
        for set_name in LEGACY_SETS.get(family, set()) & set(have_sets):
            kind = have_sets[set_name]["kind"]
            commands.append({"delete": {kind: {**ref, "name": set_name}}})
        commands += [
            {"add": schema.declaration(name)} for schema in SCHEMAS if schema.family == family
        ]
        for chain, spec in chains.items():
            commands.append({"add": {"chain": {**ref, "name": chain, **spec}}})
        if family == FAMILY:
            # Not flushed: its rules are the egress policies of the running VMs.
            commands.append({"add": {"chain": {**ref, "name": EGRESS_DISPATCH}}})
        for chain, rules in wanted_rules(policy)[family].items():
            for exprs in rules:
                commands.append(
                    {"add": {"rule": {**ref, "chain": chain, "expr": exprs, "comment": policy.tag}}}
                )
        return commands

    def _conflicts(self, bridge: str, family: str, table: _Table) -> bool:
        tag = tag_of(bridge)
        foreign_rules = [rule for rule in table.rules if rule.get("comment") != tag]
        dynamic = {EGRESS_DISPATCH} if family == FAMILY else set()
        unknown = {
            c
            for c in table.chains
            if c not in OWN_CHAINS[family] and c not in dynamic and not _is_egress(c)
        }
        known = set(WANTED_SETS[family]) | LEGACY_SETS.get(family, set())
        sets = {name for name in table.sets if not _dynamic_set(family, name)}
        return bool(foreign_rules or unknown or sets - known)

    def _own_is_current(self, policy: BridgeFirewall, family: str, table: _Table | None) -> bool:
        if table is None:
            return False
        if self._conflicts(policy.bridge, family, table):
            raise ConflictError(
                f"nftables table {family} {table_name(policy.bridge)} holds chains, sets or "
                f"rules netvm did not write (no comment {policy.tag!r}); remove them, netvm "
                "will not"
            )
        chains = OWN_CHAINS[family]
        fixed = {name: _spec(chain) for name, chain in table.chains.items() if name in chains}
        if fixed != {name: _spec(spec) for name, spec in chains.items()}:
            return False
        fixed_sets = {
            name: _set_spec(spec)
            for name, spec in table.sets.items()
            if not _dynamic_set(family, name)
        }
        if fixed_sets != WANTED_SETS[family]:
            return False
        if family == FAMILY and EGRESS_DISPATCH not in table.chains:
            return False
        have = [
            (rule["chain"], _canonical(rule["expr"]))
            for rule in table.rules
            if rule["chain"] in chains
        ]
        want = [
            (chain, _canonical(exprs))
            for chain, rules in wanted_rules(policy)[family].items()
            for exprs in rules
        ]
        return sorted(have) == sorted(want) and self._in_order(have, want)

    @staticmethod
    def _in_order(have: list[tuple[str, str]], want: list[tuple[str, str]]) -> bool:
        def by_chain(items: list[tuple[str, str]]) -> dict[str, list[str]]:
            found: dict[str, list[str]] = {}
            for chain, exprs in items:
                found.setdefault(chain, []).append(exprs)
            return found

        return by_chain(have) == by_chain(want)

    def _pass_commands(self, policy: BridgeFirewall, table: _Table | None) -> list[Json]:
        """Commands that make the iptables-nft filter table hold exactly netvm's passes."""
        if table is None:
            return []
        target = pass_chain(table.chains) if _is_iptables_nft(table) else None
        mine = [rule for rule in table.rules if rule.get("comment") == policy.tag]
        want = [_canonical(rule_exprs(rule)) for rule in policy.passes] if target else []
        have = sorted(
            _canonical(_matching(rule["expr"])) for rule in mine if rule["chain"] == target
        )
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
            commands: list[Json] = []
            for family in OWN_CHAINS:
                own = self._try_list(family, table_name(policy.bridge))
                if not self._own_is_current(policy, family, own):
                    commands += self._own_commands(policy, family, own)
            iptables = self._with_xt_comments(self._try_list(IPTABLES_FAMILY, IPTABLES_TABLE))
            return commands + self._pass_commands(policy, iptables)

        where = f"{FAMILY} {table_name(policy.bridge)}"
        return self._commit(build, "set up nftables rules", where)

    def check(self, policy: BridgeFirewall) -> list[str]:
        own, iptables = self._read(policy.bridge)
        problems: list[str] = []
        for family, table in own.items():
            try:
                current = self._own_is_current(policy, family, table)
            except ConflictError as exc:
                return [str(exc)]
            if not current and not problems:
                # One phrase for both tables: one ensure writes them together.
                problems.append(
                    f"nftables table {family} {table_name(policy.bridge)} is missing or differs"
                )
        if self._pass_commands(policy, iptables):
            problems.append(
                f"netvm's accepts in the iptables-nft table {IPTABLES_FAMILY} {IPTABLES_TABLE} "
                "are missing or misplaced"
            )
        return problems

    # Listing and removal ----------------------------------------------------------------

    def listing(self, bridge: str, guarantees: bool = False) -> list[Placed]:
        """netvm's forward and NAT rules (BridgeFirewall); with `guarantees`, the rules of
        the per-VM guarantees too (guard_rules.py: the bridge table, DNAT, egress)."""
        tag = tag_of(bridge)
        own, iptables = self._read(bridge)
        found: list[Placed] = []
        for family, table in own.items():
            if table is not None:
                found += [
                    Placed(f"{family} {table_name(bridge)} {rule['chain']}", _text(rule["expr"]))
                    for rule in table.rules
                    if rule.get("comment") == tag
                    and (
                        guarantees or (family == FAMILY and decode_exprs(rule["expr"]) is not None)
                    )
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
            for family, table in own.items():
                if table is None:
                    continue
                if self._conflicts(bridge, family, table):
                    # Someone else's rules live in netvm's table: keep it, take only netvm's.
                    problems.append(
                        f"nftables table {family} {table_name(bridge)} kept: it holds chains, "
                        "sets or rules netvm did not write"
                    )
                    commands += [
                        {"delete": {"rule": _rule_ref(rule)}}
                        for rule in table.rules
                        if rule.get("comment") == tag
                    ]
                else:
                    commands.append(
                        {"delete": {"table": {"family": family, "name": table_name(bridge)}}}
                    )
            if iptables is not None:
                commands += [
                    {"delete": {"rule": _rule_ref(rule)}}
                    for rule in iptables.rules
                    if rule.get("comment") == tag
                ]
            return commands

        self._commit(build, "remove nftables rules", f"{FAMILY} {table_name(bridge)}")
        return list(problems)

    # Per-VM guarantees --------------------------------------------------------------------

    def _store(self) -> ElementStore:
        if self._elements is None:
            raise RuntimeError("this NftablesFirewall was made without an element store")
        return self._elements

    def guard(self, bridge: str, vm: VmGuard, fresh: bool = False) -> None:
        """Give the VM of `vm.tap` exactly the elements of `vm` (its previous ones, which
        its record names, are replaced), in one transaction.

        `fresh`: the TAP was just made, so it has no elements unless a crash left some. They
        are then written without reading the record first: its elements are created
        exclusively (NLM_F_EXCL), so a record left behind makes the kernel refuse the whole
        batch, and the VM's elements are then replaced as for any other TAP.
        """
        if fresh:
            self._check_forwards(bridge, vm, vm.policy.port_forwards)
            after = elements(vm)
            if after:
                changes = [("create" if e.schema is VMS else "add", e) for e in after]
                if self._write(bridge, vm, changes, exclusive=True):
                    return
        old = self.record(bridge, vm.tap)
        if old == vm:
            # Attached again with the policy it has: what its record names is written
            # again, for an element or an egress chain deleted by hand since (nothing
            # else would notice: the record says all is well).
            if egress_chain(vm.policy) is not None:
                self._add_egress_chain(bridge, vm)
            self.restore(bridge, vm)
            return
        if not fresh:
            had = set(old.policy.port_forwards) if old is not None else set()
            self._check_forwards(bridge, vm, [f for f in vm.policy.port_forwards if f not in had])
        before = elements(old) if old is not None else []
        after = elements(vm)
        keep = {_full(e) for e in before} & {_full(e) for e in after}
        gone = _by_set(e for e in before if _full(e) not in keep)
        # No failure on an element someone removed (_removal). Grouped by set, each group
        # is one message (elements.py).
        changes = _removal(gone)
        changes += [("add", e) for e in _by_set(e for e in after if _full(e) not in keep)]
        self._write(bridge, vm, changes)

    def restore(self, bridge: str, vm: VmGuard) -> None:
        """Add every element of `vm` (an element there already is left as it is; an egress
        set and chain that are gone are made again by _write)."""
        after = elements(vm)
        if after:
            self._write(bridge, vm, [("add", e) for e in _by_set(after)])

    def _write(
        self, bridge: str, vm: VmGuard, changes: list[tuple[str, Element]], exclusive: bool = False
    ) -> bool:
        """Commit; False when `exclusive` and an element exists already (EEXIST)."""
        table, where = table_name(bridge), f"{vm.tap} in nftables {table_name(bridge)}"
        operation = f"set the guarantees of {vm.tap}"
        for attempt in range(2):
            try:
                self._store().commit(changes, table, operation, where)
                return True
            except HostError as exc:
                if exc.errno == errno.EEXIST:
                    if exclusive:
                        return False
                    raise self._clash(bridge, vm) from None
                if exc.errno != errno.ENOENT:
                    raise
                if attempt or egress_chain(vm.policy) is None:
                    raise host_error(
                        operation, where, exc.errno, "netvm's sets are missing: run ensure_host()"
                    ) from None
            # The egress chain of this policy is written once, cold (libnftables).
            self._add_egress_chain(bridge, vm)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_forwards(self, bridge: str, vm: VmGuard, forwards: Sequence[PortForward]) -> None:
        """A forward must not take a host port a service listens on (listeners.py)."""
        if not forwards:
            return
        busy = self._store().listening([(f.protocol, f.host_port) for f in forwards])
        if busy:
            raise ConflictError(
                f"the port forward of {vm.tap} would take host port(s) in use from the "
                f"service(s) listening on {', '.join(busy)}: every new connection to them from "
                f"the egress would go to the VM; forward another host port"
            )

    def _clash(self, bridge: str, vm: VmGuard) -> ConflictError:
        forwards = ", ".join(str(f) for f in vm.policy.port_forwards) or "none"
        return ConflictError(
            f"the guarantees of {vm.tap} ({vm.policy.describe()}) clash with another VM's in "
            f"nftables {table_name(bridge)}: a host port of {forwards} is forwarded to another "
            f"VM, or a VM that had {vm.ip} was not cleaned up (run gc)"
        )

    def _add_egress_chain(self, bridge: str, vm: VmGuard) -> None:
        """The first VM of an egress policy: its set, its chain and its dispatch rule.

        Written once per policy (libnftables), cold. A VM then adds only an element of the
        set: a plain one, where an element with a jump verdict would make the kernel
        validate the table, walking every VM's element, at each attach.
        """
        chain = egress_chain(vm.policy)
        assert chain is not None
        table = table_name(bridge)
        ref = {"family": FAMILY, "table": table, "name": chain}
        commands: list[Json] = [
            {"add": egress_members(chain).declaration(table)},
            {"add": {"chain": dict(ref)}},
            {"flush": {"chain": dict(ref)}},
        ]
        commands += [
            {"add": {"rule": {**_in(ref, chain), "expr": exprs, "comment": tag_of(bridge)}}}
            for exprs in egress_chain_rules(vm.policy)
        ]
        dispatch = guard_rules.egress_dispatch_rule(chain)
        listed = self._run(
            [{"list": {"chain": {"family": FAMILY, "table": table, "name": EGRESS_DISPATCH}}}],
            "list nftables chain",
            f"{FAMILY} {table} {EGRESS_DISPATCH}",
        )
        present = [item["rule"]["expr"] for item in listed if "rule" in item]
        if not any(_canonical(expr) == _canonical(dispatch) for expr in present):
            commands.append(
                {
                    "add": {
                        "rule": {
                            **_in(ref, EGRESS_DISPATCH),
                            "expr": dispatch,
                            "comment": tag_of(bridge),
                        }
                    }
                }
            )
        self._run(commands, f"add egress chain {chain}", f"{FAMILY} {table}")

    def record(self, bridge: str, tap: str) -> VmGuard | None:
        """The guarantees the kernel holds for `tap`, or None (a few O(1) look-ups)."""
        table = table_name(bridge)
        operation = f"read the guarantees of {tap}"
        store = self._store()
        try:
            first = store.comment(record_key(tap, 0), table, operation)
        except NotFound:
            return None  # no table or set: nothing is guarded
        if first is None:
            return None
        count, _, text = first.partition(" ")
        chunks = [text]
        for index in range(1, int(count) if count.isdigit() else 1):
            chunk = store.comment(record_key(tap, index), table, operation)
            chunks.append(chunk or "")
        try:
            return VmGuard.from_record(tap, "".join(chunks))
        except ValueError as exc:
            raise ConflictError(
                f"nftables {table} holds a record for {tap} netvm cannot read ({exc}); "
                "remove the element from set vms"
            ) from None

    def unguard(self, bridge: str, taps: Collection[str]) -> dict[str, VmGuard]:
        """Remove every element of these TAPs, UNGUARD_CHUNK TAPs per transaction (a
        detach_many, gc or teardown of many VMs pays the kernel's commit once per chunk);
        return what each had."""
        pending = list(dict.fromkeys(taps))
        found: dict[str, VmGuard] = {}
        for first in range(0, len(pending), UNGUARD_CHUNK):
            chunk = pending[first : first + UNGUARD_CHUNK]
            olds = {tap: old for tap in chunk if (old := self.record(bridge, tap)) is not None}
            found.update(self._unguard_known(bridge, olds))
        return found

    def _unguard_known(self, bridge: str, records: dict[str, VmGuard]) -> dict[str, VmGuard]:
        """unguard, the records read already (prune's one listing)."""
        found: dict[str, VmGuard] = {}
        table = table_name(bridge)
        pending = list(records)
        for first in range(0, len(pending), UNGUARD_CHUNK):
            olds = {tap: records[tap] for tap in pending[first : first + UNGUARD_CHUNK]}
            if not olds:
                continue
            gone = _by_set(e for old in olds.values() for e in elements(old))
            where = f"{', '.join(olds)} in nftables {table}"
            operation = f"remove the guarantees of {', '.join(olds)}"
            try:
                self._store().commit(_removal(gone), table, operation, where)
            except HostError as exc:
                if exc.errno not in (errno.ENOENT, errno.EEXIST):
                    raise
                self._unguard_set_by_set(gone, table, operation, where)
            found.update(olds)
        return found

    def _unguard_set_by_set(
        self, gone: list[Element], table: str, operation: str, where: str
    ) -> None:
        """A set of the elements is gone (a foreign change took one of netvm's tables, and
        ensure_host made it again without the egress sets), or a key of a map now holds
        another VM's datum (its own element was deleted by hand, and the key given to
        another VM since): the elements of each set in a batch of their own, skipping the
        sets that are gone, and each map element alone, skipping one that is not this
        VM's any more; the record last, so that a failure on the way leaves it to say
        what is left."""
        groups: dict[tuple[str, str], list[Element]] = {}
        for element in gone:
            groups.setdefault((element.schema.family, element.schema.name), []).append(element)
        # forward_addrs before forward_ports: a forward's port may equal another VM's, its
        # address tells whose the key is.
        order: dict[tuple[str, str], int] = {(VMS.family, VMS.name): 2}
        order[(FORWARD_PORTS.family, FORWARD_PORTS.name)] = 1
        others: set[tuple[Value, ...]] = set()
        for key in sorted(groups, key=lambda key: order.get(key, 0)):
            part = groups[key]
            if part[0].schema is FORWARD_PORTS:
                part = [e for e in part if e.key not in others]
            for batch in [part] if part and part[0].schema.data is None else [[e] for e in part]:
                try:
                    self._store().commit(_removal(batch), table, operation, where)
                except HostError as exc:
                    if exc.errno == errno.EEXIST:
                        others.add(batch[0].key)
                        log.warning(
                            "nftables %s: %s %s is another VM's now: kept",
                            table,
                            batch[0].schema.name,
                            batch[0].key,
                        )
                    elif exc.errno != errno.ENOENT:
                        raise

    def guards(self, bridge: str) -> dict[str, VmGuard]:
        """Every VM's record on this bridge (one listing of set vms, O(number of VMs))."""
        return self._records(bridge)[0]

    def _records(self, bridge: str) -> tuple[dict[str, VmGuard], set[str]]:
        """The readable records, and the TAPs whose record netvm cannot read."""
        table = table_name(bridge)
        command = {"list": {"set": {"family": BRIDGE_FAMILY, "table": table, "name": "vms"}}}
        if (BRIDGE_FAMILY, table) not in self._tables():
            return {}, set()
        try:
            listed = self._run([command], "list nftables set", f"{BRIDGE_FAMILY} {table} vms")
        except NotFound:
            return {}, set()
        chunks: dict[str, dict[int, str]] = {}
        for item in listed:
            for value in item.get("set", {}).get("elem", []):
                elem = value.get("elem", {}) if isinstance(value, dict) else {}
                tap, index = elem.get("val", {}).get("concat", ["", 0])
                chunks.setdefault(tap, {})[int(index)] = elem.get("comment", "")
        found: dict[str, VmGuard] = {}
        unreadable: set[str] = set()
        for tap, parts in chunks.items():
            first = parts.get(0, "")
            count, _, text = first.partition(" ")
            n = int(count) if count.isdigit() else 1
            record = text + "".join(parts.get(i, "") for i in range(1, n))
            try:
                found[tap] = VmGuard.from_record(tap, record)
            except ValueError:
                log.warning("nftables %s: unreadable record for %s: %r", table, tap, record)
                unreadable.add(tap)
        return found, unreadable

    def prune(self, bridge: str, live: Collection[str]) -> list[str]:
        """Remove the elements of every TAP not in `live`, and egress chains no VM uses.

        What a crash can leave is elements of a TAP that no longer exists: this is the
        reconciliation (gc, teardown). Returns the TAPs whose elements went.
        """
        listed = self._inet_elements(bridge)  # first: an attach committing later has a record
        records, unreadable = self._records(bridge)
        dead = {tap: records[tap] for tap in sorted(set(records) - set(live))}
        removed = sorted(self._unguard_known(bridge, dead))
        # The dead ones' elements went with them: stranded are those no record names.
        self._remove_stranded(bridge, listed, records, unreadable)
        self._prune_egress_chains(bridge)
        return removed

    def _inet_elements(self, bridge: str) -> list[Element]:
        """The elements of netvm's inet sets (forwards, egress members), from one listing."""
        table = self._try_list(FAMILY, table_name(bridge))
        if table is None:
            return []
        found: list[Element] = []
        for name, declared in table.sets.items():
            schema = _INET_SCHEMAS.get(name)
            if schema is None and name.startswith(EGRESS_PREFIX):
                schema = egress_members(name)
            if schema is None:
                continue
            for value in declared.get("elem", []):
                element = element_from_json(schema, value)
                if element is not None:
                    found.append(element)
        return found

    def _remove_stranded(
        self,
        bridge: str,
        listed: list[Element],
        records: dict[str, VmGuard],
        unreadable: set[str],
    ) -> None:
        """Elements of the inet table that no record names: a foreign change took the
        bridge table, which holds the records, and its VMs were detached since (a forward
        would hand the next VM with that address the connections meant for the old one)."""
        expected = {_full(e) for guard in records.values() for e in elements(guard)}
        stranded = _by_set(e for e in listed if _full(e) not in expected)
        if not stranded:
            return
        if unreadable:  # its elements are among them, and cannot be told apart
            log.warning(
                "nftables %s: elements no record names are kept: the record of %s cannot be read",
                table_name(bridge),
                ", ".join(sorted(unreadable)),
            )
            return
        table, where = table_name(bridge), f"nftables {table_name(bridge)}"
        operation = "remove elements no VM's record names"
        log.warning(
            "nftables %s: removing %d element(s) no VM's record names", table, len(stranded)
        )
        try:
            self._store().commit(_removal(stranded), table, operation, where)
        except HostError as exc:
            if exc.errno not in (errno.ENOENT, errno.EEXIST):
                raise
            self._unguard_set_by_set(stranded, table, operation, where)

    def _prune_egress_chains(self, bridge: str) -> None:
        """The set, chain and dispatch rule of every egress policy no VM has any more."""
        table = table_name(bridge)
        if (FAMILY, table) not in self._tables():
            return
        listed = _Table(
            self._run(
                [{"list": {"table": {"family": FAMILY, "name": table}}}],
                "list nftables table",
                f"{FAMILY} {table}",
            )
        )
        used = {name for name, body in listed.sets.items() if _is_egress(name) and body.get("elem")}
        ref = {"family": FAMILY, "table": table}
        commands: list[Json] = [
            {"delete": {"rule": _rule_ref(rule)}}
            for rule in listed.rules
            if rule["chain"] == EGRESS_DISPATCH
            and not any(
                _canonical(rule["expr"]) == _canonical(guard_rules.egress_dispatch_rule(name))
                for name in used
            )
        ]
        for chain in listed.chains:
            if _is_egress(chain) and chain not in used:
                commands += [
                    {"flush": {"chain": {**ref, "name": chain}}},
                    {"delete": {"chain": {**ref, "name": chain}}},
                ]
        for name in listed.sets:
            if _is_egress(name) and name not in used:
                commands.append({"delete": {"set": {**ref, "name": name}}})
        if commands:
            self._run(commands, "remove unused egress chains", f"{FAMILY} {table}")


def _is_xt_conntrack(expr: Json) -> bool:
    xt = expr.get("xt") if isinstance(expr, dict) else None
    return isinstance(xt, dict) and xt.get("type") == "match" and xt.get("name") == "conntrack"


def is_xt_comment(expr: Json) -> bool:
    """iptables-nft's `-m comment` as libnftables lists it (without its text): a match
    that takes every packet."""
    xt = expr.get("xt")
    return isinstance(xt, dict) and xt.get("type") == "match" and xt.get("name") == "comment"


def _matching(exprs: list[Json]) -> list[Json]:
    """A rule's expressions less what does not decide its verdict: the comment match and
    the counter that iptables-nft-restore adds to every rule."""
    return [e for e in exprs if "counter" not in e and not is_xt_comment(e)]


def _xt_commented(rule: Json) -> bool:
    return "comment" not in rule and any(is_xt_comment(e) for e in rule.get("expr", ()))


def _in(ref: Json, chain: str) -> Json:
    """A rule's place: the family and table of `ref`, chain `chain`."""
    return {"family": ref["family"], "table": ref["table"], "chain": chain}


def _by_set(found: Iterable[Element]) -> list[Element]:
    return sorted(found, key=lambda e: (e.schema.family, e.schema.name))


def _removal(gone: Iterable[Element]) -> list[tuple[str, Element]]:
    """The changes that remove `gone` and nothing else: a set's element is destroyed (no
    failure where it is gone already); a map's is added and then deleted, since a destroy
    goes by the key alone and the key may hold another VM's datum now (the add then fails,
    EEXIST, instead of deleting that VM's element)."""
    found = list(gone)
    maps = [e for e in found if e.schema.data is not None]
    changes: list[tuple[str, Element]] = [("destroy", e) for e in found if e.schema.data is None]
    return changes + [("add", e) for e in maps] + [("delete", e) for e in maps]


def _full(element: Element) -> tuple[object, ...]:
    return (*element.identity(), element.data, element.comment)


def _rule_ref(rule: Json) -> Json:
    return {key: rule[key] for key in ("family", "table", "chain", "handle")}


def _is_iptables_nft(table: _Table) -> bool:
    """iptables-nft names its base chains in capitals (FORWARD at the forward hook)."""
    forward = table.chains.get("FORWARD")
    return forward is not None and forward.get("hook") == "forward"
