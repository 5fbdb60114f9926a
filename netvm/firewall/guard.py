"""One VM's guarantees as set and map elements of netvm's nftables tables: the per-VM value.

Rules never name a VM. netvm's tables for bridge B hold, once per bridge, rules that look a
packet up in a set (one hash or pipapo lookup, whatever the number of VMs), and every VM
adds only elements:

    bridge netvm-B  vms       ifname . inet_service    the VM's record (comments), below
                    guarded   ifname                   TAPs under anti-spoofing
                    addrs     ifname . ether_addr . ipv4_addr   the MAC and addresses each
                                                       guarded TAP may send from
                    isolated  ifname                   TAPs cut off from the other VMs
    inet netvm-B    egress-D  ipv4_addr                the addresses of the VMs whose egress
                                                       lists have the digest D; the chain
                                                       egress-D holds the lists (shared by
                                                       every VM with the same lists)
                    forward_addrs inet_proto . inet_service : ipv4_addr
                    forward_ports inet_proto . inet_service : inet_service

The record is the VM's `VmGuard` as text in the comments of `vms` elements (one per 200
characters): the elements a VM has can be computed from it, so detach and gc remove exactly
those, and since the record is written in the same transaction as the elements, a crash
never leaves elements without the record that names them.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from netvm.naming import format_mac, sha256_hex
from netvm.policy import PROTOCOLS, EgressRule, GuestPolicy

FieldType = Literal["ifname", "ether_addr", "ipv4_addr", "inet_proto", "inet_service", "verdict"]
Value = str | int | bytes | ipaddress.IPv4Address
RECORD_CHUNK = 200
"""Characters of the record per element comment (the kernel keeps at most 255 bytes)."""


@dataclass(frozen=True)
class SetSchema:
    """One of netvm's sets (or maps, with `data`)."""

    family: Literal["bridge", "inet"]
    name: str
    key: tuple[FieldType, ...]
    data: tuple[FieldType, ...] | None = None
    interval: bool = False

    def declaration(self, table: str) -> dict[str, Any]:
        """The libnftables JSON object that creates it."""
        kind = "map" if self.data is not None else "set"
        body: dict[str, Any] = {
            "family": self.family,
            "table": table,
            "name": self.name,
            "type": self.key[0] if len(self.key) == 1 else list(self.key),
        }
        if self.data is not None:
            body["map"] = self.data[0]
        if self.interval:
            body["flags"] = ["interval"]
        return {kind: body}


VMS = SetSchema("bridge", "vms", ("ifname", "inet_service"))
GUARDED = SetSchema("bridge", "guarded", ("ifname",))
ADDRS = SetSchema("bridge", "addrs", ("ifname", "ether_addr", "ipv4_addr"))
OWNED_MACS = SetSchema("bridge", "owned_macs", ("ether_addr",))
"""The guarded VMs' MACs, and (next) each with its TAP: no other port may use one."""
MAC_PORTS = SetSchema("bridge", "mac_ports", ("ether_addr", "ifname"))
OWNED_IPS = SetSchema("bridge", "owned_ips", ("ipv4_addr",))
"""The guarded VMs' addresses: no other port may claim one (by IPv4 or by ARP)."""
ISOLATED = SetSchema("bridge", "isolated", ("ifname",))
ISOLATED_ADDRS = SetSchema("inet", "isolated_addrs", ("ipv4_addr",))
"""The isolated VMs' addresses: what the host must not route to from the bridge."""
# Two maps rather than one to `ipv4_addr . inet_service`: libnftables 1.0.6 cannot declare a
# map to a concatenation in JSON. A DNAT looks both up, once per new connection.
FORWARD_ADDRS = SetSchema(
    "inet", "forward_addrs", ("inet_proto", "inet_service"), data=("ipv4_addr",)
)
FORWARD_PORTS = SetSchema(
    "inet", "forward_ports", ("inet_proto", "inet_service"), data=("inet_service",)
)
FORWARD_OWNERS = SetSchema("inet", "forward_owners", ("inet_proto", "inet_service", "ipv4_addr"))
"""Each forward's host port with the address of the VM it goes to: that VM may send from
the port (masquerade_guard drops any other guest's connection mapped to it)."""
SCHEMAS = (
    VMS,
    GUARDED,
    ADDRS,
    OWNED_MACS,
    MAC_PORTS,
    OWNED_IPS,
    ISOLATED,
    ISOLATED_ADDRS,
    FORWARD_ADDRS,
    FORWARD_PORTS,
    FORWARD_OWNERS,
)
"""The sets of every bridge. Each egress policy adds its own set (egress_members)."""
UNSPECIFIED = ipaddress.IPv4Address("0.0.0.0")
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
EGRESS_PREFIX = "egress-"
EGRESS_DISPATCH = "egress_dispatch"
"""The chain, jumped to from netvm's forward chain, with one rule per egress policy:
`ip saddr @egress-<digest> jump egress-<digest>`."""
_MEMBERS: dict[str, SetSchema] = {}


def egress_members(chain: str) -> SetSchema:
    """The set of the addresses of the VMs whose egress policy is `chain` (same name)."""
    found = _MEMBERS.get(chain)
    if found is None:
        found = _MEMBERS[chain] = SetSchema("inet", chain, ("ipv4_addr",))
    return found


class Element(NamedTuple):
    """One element of one of netvm's sets: its key (and, for an interval, the key's end).

    A NamedTuple rather than a dataclass: an attach makes a dozen, and this is cheaper."""

    schema: SetSchema
    key: tuple[Value, ...]
    key_end: tuple[Value, ...] | None = None
    data: tuple[Value, ...] | None = None
    comment: str | None = None

    def identity(self) -> tuple[object, ...]:
        """What the kernel tells elements apart by (the comment is not part of it)."""
        return (self.schema.family, self.schema.name, self.key, self.key_end)


@dataclass(frozen=True)
class VmGuard:
    """One VM's policy, bound to its TAP, MAC and leased address."""

    tap: str
    mac: bytes
    ip: ipaddress.IPv4Address
    policy: GuestPolicy

    def record(self) -> str:
        """`<address> <mac> <policy.describe()>`: readable in `nft list`, and parsed back."""
        return f"{self.ip} {format_mac(self.mac)} {self.policy.describe()}"

    @classmethod
    def from_record(cls, tap: str, record: str) -> VmGuard:
        """ValueError (ConfigError) if the record is not one `record()` wrote."""
        ip, mac, *words = record.split()
        policy = GuestPolicy.parse(" ".join(words) or "none")
        return cls(tap, bytes.fromhex(mac.replace(":", "")), ipaddress.IPv4Address(ip), policy)


def record_elements(tap: str, record: str) -> list[Element]:
    """The record in chunks; the first says how many there are (`<count> <text>`)."""
    chunks = [record[i : i + RECORD_CHUNK] for i in range(0, len(record), RECORD_CHUNK)] or [""]
    chunks[0] = f"{len(chunks)} {chunks[0]}"
    return [Element(VMS, (tap, index), comment=chunk) for index, chunk in enumerate(chunks)]


def record_key(tap: str, index: int) -> Element:
    return Element(VMS, (tap, index))


def egress_chain(policy: GuestPolicy) -> str | None:
    """The chain of this egress policy, named by a digest of it: VMs with equal lists share
    one chain, so an attach adds only a map element (the chain is written once, cold)."""
    if not policy.egress_allow and not policy.egress_deny:
        return None
    return _egress_chain(policy.egress_text)


@functools.lru_cache(maxsize=1024)
def _egress_chain(text: str) -> str:
    return EGRESS_PREFIX + sha256_hex(text.encode())[:16]


def elements(vm: VmGuard) -> list[Element]:
    """Every element the VM has, its record first (empty when the policy asks nothing),
    grouped by set in the order of SCHEMAS: each group is one message (elements.py)."""
    policy = vm.policy
    if not policy.any:
        return []
    tap, ip = vm.tap, vm.ip
    found = record_elements(tap, vm.record())
    if policy.anti_spoof:
        mac = vm.mac
        found += (
            Element(GUARDED, (tap,)),
            Element(ADDRS, (tap, mac, ip)),
            # DHCP discovery and ARP probes come from 0.0.0.0 (with the VM's MAC).
            Element(ADDRS, (tap, mac, UNSPECIFIED)),
            Element(OWNED_MACS, (mac,)),
            Element(MAC_PORTS, (mac, tap)),
            Element(OWNED_IPS, (ip,)),
        )
    if policy.isolated:
        found += (Element(ISOLATED, (tap,)), Element(ISOLATED_ADDRS, (ip,)))
    chain = egress_chain(policy)
    if chain is not None:
        found.append(Element(egress_members(chain), (ip,)))
    forwards = policy.port_forwards
    if forwards:
        keys = [(PROTOCOLS[f.protocol], f.host_port) for f in forwards]
        found += (Element(FORWARD_ADDRS, key, data=(ip,)) for key in keys)
        found += (
            Element(FORWARD_PORTS, key, data=(f.guest_port,))
            for key, f in zip(keys, forwards, strict=True)
        )
        found += (Element(FORWARD_OWNERS, (*key, ip)) for key in keys)
    return found


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def egress_rule_exprs(rule: EgressRule, verdict: str) -> list[dict[str, Any]]:
    """`ip daddr NET [meta l4proto P | tcp/udp dport PORTS] VERDICT`, as nft lists it."""
    net = rule.network
    exprs = [
        _match(
            {"payload": {"protocol": "ip", "field": "daddr"}},
            {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
            if net.prefixlen < 32
            else str(net.network_address),
        )
    ]
    if rule.ports is not None:
        first, last = rule.ports
        exprs.append(
            _match(
                {"payload": {"protocol": rule.protocol, "field": "dport"}},
                first if first == last else {"range": [first, last]},
            )
        )
    elif rule.protocol is not None:
        exprs.append(_match({"meta": {"key": "l4proto"}}, rule.protocol))
    exprs.append({verdict: None})
    return exprs


def egress_chain_rules(policy: GuestPolicy) -> list[list[dict[str, Any]]]:
    """The rules of an egress chain: deny entries drop, allow entries return to netvm's
    forward chain, and with an allow list anything else drops."""
    rules = [egress_rule_exprs(rule, "drop") for rule in policy.egress_deny]
    rules += [egress_rule_exprs(rule, "return") for rule in policy.egress_allow]
    if policy.egress_allow:
        rules.append([{"drop": None}])
    return rules


# libnftables JSON of an element (what the fake takes, and how nft lists it) ---------------


def _scalar(kind: FieldType, value: Value) -> Any:
    if kind == "verdict":
        return {"jump": {"target": value}}
    if kind == "ether_addr":
        assert isinstance(value, bytes)
        return format_mac(value)
    if kind == "ipv4_addr":
        return str(value)
    if kind == "inet_proto":
        return PROTOCOL_NAMES.get(int(value), value)  # as nft lists it
    return value


def _field(kind: FieldType, low: Value, high: Value) -> Any:
    if low == high:
        return _scalar(kind, low)
    if kind == "ipv4_addr":
        first = ipaddress.IPv4Address(low)
        last = ipaddress.IPv4Address(high)
        (net, *more) = ipaddress.summarize_address_range(first, last)
        if not more:
            return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
        return {"range": [str(first), str(last)]}
    return {"range": [low, high]}


def _joined(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else {"concat": values}


def element_json(element: Element) -> Any:
    """The element as a libnftables JSON `elem` entry."""
    schema = element.schema
    end = element.key_end if element.key_end is not None else element.key
    key = _joined(
        [
            _field(kind, low, high)
            for kind, low, high in zip(schema.key, element.key, end, strict=True)
        ]
    )
    if element.comment is not None:
        key = {"elem": {"val": key, "comment": element.comment}}
    if schema.data is None or element.data is None:
        return key
    data = _joined(
        [_scalar(kind, value) for kind, value in zip(schema.data, element.data, strict=True)]
    )
    return [key, data]


def _value_of(kind: FieldType, value: Any) -> Value:
    if kind == "ipv4_addr" and isinstance(value, str):
        return ipaddress.IPv4Address(value)
    if kind == "inet_proto" and isinstance(value, str):
        return PROTOCOLS[value]
    if kind in ("inet_proto", "inet_service") and isinstance(value, int):
        return value
    raise ValueError(f"not a {kind}: {value!r}")


def element_from_json(schema: SetSchema, item: Any) -> Element | None:
    """An element of a plain set or map as `nft -j list` prints it (element_json's
    inverse for the inet sets, which have no interval and no comment); None if it is not
    one netvm could have written."""
    key, data = (
        (item[0], item[1])
        if schema.data is not None and isinstance(item, list)
        else (
            item,
            None,
        )
    )
    keys = key["concat"] if isinstance(key, dict) and "concat" in key else [key]
    try:
        if len(keys) != len(schema.key):
            return None
        parsed = tuple(_value_of(kind, v) for kind, v in zip(schema.key, keys, strict=True))
        datum = None
        if schema.data is not None:
            datum = (_value_of(schema.data[0], data),)
    except (KeyError, ValueError, TypeError):
        return None
    return Element(schema, parsed, data=datum)


def element_command(verb: str, element: Element, table: str) -> dict[str, Any]:
    schema = element.schema
    body = {
        "family": schema.family,
        "table": table,
        "name": schema.name,
        "elem": [element_json(element)],
    }
    return {verb: {"element": body}}
