"""An in-memory nftables ruleset that takes libnftables JSON commands, as the kernel does.

It models what netvm and its tests rely on: tables, chains, rules with handles, named sets
and maps with their elements (and element comments), the errors the kernel gives (ENOENT for
what is missing, EBUSY for a chain or set still in use, EEXIST for an element whose key
exists with other data) and the all-or-nothing batch: a command that fails leaves the
ruleset as it was before the batch.
"""

from __future__ import annotations

import copy
import errno
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from netvm.errors import host_error
from netvm.firewall.guard import Element, element_command, element_json

Json = dict[str, Any]


@dataclass
class _Chain:
    spec: Json
    rules: list[Json] = field(default_factory=list)


@dataclass
class _Set:
    kind: str
    """"set" or "map"."""
    spec: Json
    elements: list[Json] = field(default_factory=list)
    """{"key": canonical JSON of the key, "val": the key, "data": ..., "comment": ...}."""


@dataclass
class FakeRuleset:
    """Tables by (family, name): chains by name, each with its rules in order; and the
    named sets and maps of each table."""

    tables: dict[tuple[str, str], dict[str, _Chain]] = field(default_factory=dict)
    sets: dict[tuple[str, str], dict[str, _Set]] = field(default_factory=dict)
    next_handle: int = 1
    transactions: int = 0
    """Batches that changed something (a listing is not one)."""
    listening: set[tuple[str, int]] = field(default_factory=set)
    """(protocol, port) of host services listening beyond loopback (not nftables state:
    what the port forward check reads, listeners.py)."""


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
            self.ruleset.sets = work.sets
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


def _set_object(family: str, table: str, name: str, found: _Set) -> Json:
    body: Json = {"family": family, "name": name, "table": table, **copy.deepcopy(found.spec)}
    listed: list[Any] = []
    for element in found.elements:
        value: Any = copy.deepcopy(element["val"])
        if element.get("comment") is not None:
            value = {"elem": {"val": value, "comment": element["comment"]}}
        listed.append([value, copy.deepcopy(element["data"])] if found.kind == "map" else value)
    if listed:
        body["elem"] = listed
    return {found.kind: body}


def _table_objects(work: FakeRuleset, family: str, name: str) -> list[Json]:
    table = work.tables[(family, name)]
    objects: list[Json] = [{"table": {"family": family, "name": name}}]
    for set_name, found in work.sets.get((family, name), {}).items():
        objects.append(_set_object(family, name, set_name, found))
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
        return [o for (f, n) in work.tables for o in _table_objects(work, f, n)]
    if kind == "table":
        _table(work, what["family"], what["name"])
        return _table_objects(work, what["family"], what["name"])
    if kind == "chain":
        family, table = what["family"], what["table"]
        chain = _chain(work, {"family": family, "table": table, "chain": what["name"]})
        head = {"chain": {"family": family, "table": table, "name": what["name"], **chain.spec}}
        return [head] + [_rule_object(family, table, what["name"], rule) for rule in chain.rules]
    if kind in ("set", "map"):
        found = _named_set(work, what["family"], what["table"], what["name"])
        return [_set_object(what["family"], what["table"], what["name"], found)]
    raise _Refused(errno.EOPNOTSUPP)


def _named_set(work: FakeRuleset, family: str, table: str, name: str) -> _Set:
    _table(work, family, table)
    found = work.sets.get((family, table), {}).get(name)
    if found is None:
        raise _Refused(errno.ENOENT)
    return found


def _references(value: object) -> list[str]:
    """The named sets ("@name") an expression refers to."""
    if isinstance(value, str):
        return [value[1:]] if value.startswith("@") else []
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in _references(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in _references(item)]
    return []


def _element_jumps(found: _Set) -> list[str]:
    return [
        element["data"]["jump"]["target"]
        for element in found.elements
        if isinstance(element["data"], dict) and "jump" in element["data"]
    ]


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
            work.sets.pop(key, None)
        else:
            raise _Refused(errno.EOPNOTSUPP)
    elif kind in ("set", "map"):
        _change_set(work, verb, kind, what)
    elif kind == "element":
        _change_elements(work, verb, what)
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
            sets = work.sets.get((family, what["table"]), {}).values()
            used = used or any(what["name"] in _element_jumps(found) for found in sets)
            if chain.rules or used:
                raise _Refused(errno.EBUSY)
            del table[what["name"]]
        elif verb == "flush":
            chain = table.get(what["name"])
            if chain is None:
                raise _Refused(errno.ENOENT)
            chain.rules = []
        else:
            raise _Refused(errno.EOPNOTSUPP)
    elif kind == "rule":
        chain = _chain(work, what)
        if verb in ("add", "insert"):
            table = _table(work, family, what["table"])
            if any(target not in table for target in _jumps(what)):
                raise _Refused(errno.ENOENT)
            named = work.sets.get((family, what["table"]), {})
            if any(ref not in named for ref in _references(what["expr"])):
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


_SET_SPEC = ("type", "map", "flags")


def _change_set(work: FakeRuleset, verb: str, kind: str, what: Json) -> None:
    family, table_name, name = what["family"], what["table"], what["name"]
    table = _table(work, family, table_name)
    named = work.sets.setdefault((family, table_name), {})
    if verb == "add":
        spec = {key: copy.deepcopy(what[key]) for key in _SET_SPEC if key in what}
        found = named.get(name)
        if found is None:
            named[name] = _Set(kind, spec)
        elif (found.kind, found.spec) != (kind, spec):
            raise _Refused(errno.EEXIST)
    elif verb == "delete":
        if name not in named:
            raise _Refused(errno.ENOENT)
        used = any(name in _references(r["expr"]) for c in table.values() for r in c.rules)
        if used:
            raise _Refused(errno.EBUSY)
        del named[name]
    else:
        raise _Refused(errno.EOPNOTSUPP)


def _split(item: Any, kind: str) -> tuple[Any, Any, str | None]:
    """(key, data, comment) of one `elem` entry of a command."""
    data = None
    if kind == "map":
        item, data = item
    comment = None
    if isinstance(item, dict) and "elem" in item:
        comment = item["elem"].get("comment")
        item = item["elem"]["val"]
    return item, data, comment


def _change_elements(work: FakeRuleset, verb: str, what: Json) -> None:
    found = _named_set(work, what["family"], what["table"], what["name"])
    table = work.tables[(what["family"], what["table"])]
    for item in what["elem"]:
        key, data, comment = _split(item, found.kind)
        canonical = json.dumps(key, sort_keys=True)
        index = next(
            (i for i, element in enumerate(found.elements) if element["key"] == canonical), None
        )
        if verb in ("add", "create"):
            if isinstance(data, dict) and "jump" in data and data["jump"]["target"] not in table:
                raise _Refused(errno.ENOENT)
            if index is not None:
                if verb == "create" or found.elements[index]["data"] != data:
                    raise _Refused(errno.EEXIST)
                continue  # as the kernel: no change, the old comment stays
            found.elements.append(
                {"key": canonical, "val": copy.deepcopy(key), "data": data, "comment": comment}
            )
        elif verb in ("delete", "destroy"):
            if index is not None:
                del found.elements[index]
            elif verb == "delete":
                raise _Refused(errno.ENOENT)
        else:
            raise _Refused(errno.EOPNOTSUPP)


def element_comment(
    ruleset: FakeRuleset, family: str, table: str, name: str, key: Any
) -> str | None:
    """The element's comment ("" without one), None if there is no such element; ENOENT
    (as a HostError) if the set does not exist."""
    try:
        found = _named_set(ruleset, family, table, name)
    except _Refused as exc:
        raise host_error("get element", f"{family} {table} {name}", exc.code) from None
    canonical = json.dumps(key, sort_keys=True)
    for element in found.elements:
        if element["key"] == canonical:
            return str(element["comment"] or "")
    return None


class FakeElements:
    """The ElementStore of the fake: the same elements as libnftables JSON commands."""

    def __init__(self, runner: FakeNftRunner) -> None:
        self._runner = runner

    def commit(
        self, changes: Sequence[tuple[str, Element]], table: str, operation: str, where: str
    ) -> None:
        if changes:
            commands = [element_command(verb, element, table) for verb, element in changes]
            self._runner.run(commands, operation, where)

    def listening(self, wanted: Collection[tuple[str, int]]) -> list[str]:
        busy = self._runner.ruleset.listening
        return sorted(f"0.0.0.0:{port}/{proto}" for proto, port in wanted if (proto, port) in busy)

    def rule_comments(self, family: str, table: str, operation: str) -> dict[int, str]:
        """The model's rules carry their comments in the listing: nothing to add (it has
        no xtables matches, which only iptables-nft writes)."""
        return {}

    def rule_ctstates(self, family: str, table: str, operation: str) -> dict[int, tuple[str, ...]]:
        """The model has no xtables matches: nothing to read."""
        return {}

    def chain_devices(self, operation: str) -> dict[tuple[str, str], list[str]]:
        """The model's netdev chains list their devices (as libnftables 1.0.7 and later
        do): nothing to add."""
        return {}

    def comment(self, element: Element, table: str, operation: str) -> str | None:
        schema = element.schema
        key = element_json(Element(schema, element.key, element.key_end))
        return element_comment(self._runner.ruleset, schema.family, table, schema.name, key)
