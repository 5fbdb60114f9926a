"""An in-memory nftables ruleset that takes libnftables JSON commands, as the kernel does.

It models what netvm and its tests rely on: tables, chains, rules with handles, the errors
the kernel gives (ENOENT for what is missing, EBUSY for a chain still in use) and the
all-or-nothing batch: a command that fails leaves the ruleset as it was before the batch.
"""

from __future__ import annotations

import copy
import errno
from dataclasses import dataclass, field
from typing import Any

from netvm.errors import host_error

Json = dict[str, Any]


@dataclass
class _Chain:
    spec: Json
    rules: list[Json] = field(default_factory=list)


@dataclass
class FakeRuleset:
    """Tables by (family, name): chains by name, each with its rules in order."""

    tables: dict[tuple[str, str], dict[str, _Chain]] = field(default_factory=dict)
    next_handle: int = 1
    transactions: int = 0
    """Batches that changed something (a listing is not one)."""


class _Refused(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class FakeNftRunner:
    """Runs JSON commands against a FakeRuleset."""

    def __init__(self, ruleset: FakeRuleset, on_change: Any = None) -> None:
        self.ruleset = ruleset
        self._on_change = on_change

    def generation(self) -> int:
        return self.ruleset.transactions

    def run(self, commands: list[Json], operation: str, where: str | None) -> list[Json]:
        work = copy.deepcopy(self.ruleset)
        listed: list[Json] = []
        changed = False
        try:
            for command in commands:
                ((verb, body),) = command.items()
                if verb == "list":
                    listed += _list(work, body)
                else:
                    changed = True
                    _change(work, verb, body)
        except _Refused as exc:
            raise host_error(operation, where, exc.code, "fake nftables") from None
        if changed:
            if self._on_change is not None:
                self._on_change(operation, where)
            work.transactions += 1
            self.ruleset.tables, self.ruleset.next_handle = work.tables, work.next_handle
            self.ruleset.transactions = work.transactions
        return listed


def _table(work: FakeRuleset, family: str, name: str) -> dict[str, _Chain]:
    table = work.tables.get((family, name))
    if table is None:
        raise _Refused(errno.ENOENT)
    return table


def _chain(work: FakeRuleset, body: Json) -> _Chain:
    chain = _table(work, body["family"], body["table"]).get(body["chain"])
    if chain is None:
        raise _Refused(errno.ENOENT)
    return chain


def _rule_object(family: str, table: str, chain: str, rule: Json) -> Json:
    found = {"family": family, "table": table, "chain": chain, "handle": rule["handle"]}
    if "comment" in rule:
        found["comment"] = rule["comment"]
    found["expr"] = copy.deepcopy(rule["expr"])
    return {"rule": found}


def _table_objects(family: str, name: str, table: dict[str, _Chain]) -> list[Json]:
    objects: list[Json] = [{"table": {"family": family, "name": name}}]
    for chain_name, chain in table.items():
        objects.append(
            {"chain": {"family": family, "table": name, "name": chain_name, **chain.spec}}
        )
    for chain_name, chain in table.items():
        objects += [_rule_object(family, name, chain_name, rule) for rule in chain.rules]
    return objects


def _list(work: FakeRuleset, body: Json) -> list[Json]:
    ((kind, what),) = body.items()
    if kind == "tables":
        return [{"table": {"family": f, "name": n}} for f, n in work.tables]
    if kind == "ruleset":
        return [o for (f, n), t in work.tables.items() for o in _table_objects(f, n, t)]
    if kind == "table":
        return _table_objects(
            what["family"], what["name"], _table(work, what["family"], what["name"])
        )
    raise _Refused(errno.EOPNOTSUPP)


def _jumps(rule: Json) -> list[str]:
    return [
        expr[verdict]["target"]
        for expr in rule["expr"]
        for verdict in ("jump", "goto")
        if isinstance(expr, dict) and verdict in expr
    ]


def _change(work: FakeRuleset, verb: str, body: Json) -> None:
    ((kind, what),) = body.items()
    family = what["family"]
    if kind == "table":
        key = (family, what["name"])
        if verb == "add":
            work.tables.setdefault(key, {})
        elif verb == "delete":
            _table(work, *key)
            del work.tables[key]
        else:
            raise _Refused(errno.EOPNOTSUPP)
    elif kind == "chain":
        table = _table(work, family, what["table"])
        if verb == "add":
            spec = {k: v for k, v in what.items() if k not in ("family", "table", "name")}
            table.setdefault(what["name"], _Chain(spec))
        elif verb == "delete":
            chain = table.get(what["name"])
            if chain is None:
                raise _Refused(errno.ENOENT)
            used = any(what["name"] in _jumps(r) for c in table.values() for r in c.rules)
            if chain.rules or used:
                raise _Refused(errno.EBUSY)
            del table[what["name"]]
        else:
            raise _Refused(errno.EOPNOTSUPP)
    elif kind == "rule":
        chain = _chain(work, what)
        if verb in ("add", "insert"):
            table = _table(work, family, what["table"])
            if any(target not in table for target in _jumps(what)):
                raise _Refused(errno.ENOENT)
            rule = {"handle": work.next_handle, "expr": copy.deepcopy(what["expr"])}
            if "comment" in what:
                rule["comment"] = what["comment"]
            work.next_handle += 1
            if verb == "add":
                chain.rules.append(rule)
            else:
                chain.rules.insert(0, rule)
        elif verb == "delete":
            kept = [r for r in chain.rules if r["handle"] != what["handle"]]
            if len(kept) == len(chain.rules):
                raise _Refused(errno.ENOENT)
            chain.rules = kept
        else:
            raise _Refused(errno.EOPNOTSUPP)
    else:
        raise _Refused(errno.EOPNOTSUPP)
