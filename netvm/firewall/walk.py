"""What a foreign nftables base chain does to the guests' packets, for `netvm doctor`.

Two packets stand for a guest's traffic: a new connection from the bridge to the egress,
and a reply from the egress back to the bridge (ct state established), as each hook they
pass sees them (hook_packets), and at the bridge's hooks the guests' ARP with the gateway
too. A base chain's rules are walked in order, as the kernel walks them, through jumps
(back at the end of the chain jumped to), gotos (not back) and returns, down to a verdict
or the chain's policy.

Only what the packets are known to carry is decided: interface names (with `*` wildcards
and sets), ct state, ct status dnat (they are not DNATed), the IPv4 family or ARP, and the
guest's own address where NAT has not rewritten it. A match on anything else (an address
of the internet, a port, a mark, an xtables match, a rate) may go either way: the rules
after it are walked both ways, and where the two ways end differently the verdict is
"unknown". A ruleset that is unknown beyond a fixed number of branches is "unknown" too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from netvm.firewall.nftables import is_xt_comment

Json = dict[str, Any]
Verdict = Literal["accept", "drop", "unknown"]
_Outcome = Literal["accept", "drop", "unknown", "return"]
MAX_DEPTH = 16
"""Jumps deep (the kernel allows 16 too)."""
MAX_FORKS = 32
"""Rules walked both ways on one path, beyond which the verdict is unknown."""
MAX_STEPS = 20_000
"""Rules looked at in all, beyond which the verdict is unknown (a ruleset built to be slow
to walk, or one too large for doctor to tell)."""
_IGNORED = {"counter", "log", "comment", "notrack"}
"""Statements that neither match nor decide."""
_NAMES = {"iifname": "iifname", "oifname": "oifname", "ibrname": "ibrname", "obrname": "obrname"}
"""meta keys of device names, and the Packet field each reads."""
_NOT_IPV4 = {"ip6", "icmpv6", "arp", "vlan"}
"""Headers an IPv4 packet does not have."""


@dataclass(frozen=True)
class Packet:
    what: str
    """e.g. "a guest's new connection to up0"."""
    iifname: str
    """"" where the hook has no input device (the kernel compares an empty name then). A
    name ending in `*` stands for some device whose name starts so (a guest's TAP)."""
    oifname: str
    ct_state: str
    """"invalid" for ARP, which conntrack does not track."""
    saddr: ipaddress.IPv4Address | None
    """None: not known here (an address of the internet, or the egress's own address
    where NAT has rewritten the guest's)."""
    daddr: ipaddress.IPv4Address | None
    ibrname: str | None = None
    """The bridge of the input port (bridge family hooks); None: no bridge port, where the
    kernel breaks a rule that asks."""
    obrname: str | None = None
    ethertype: str = "ip"
    """"ip" or "arp"."""


def guest_packets(bridge: str, egress: str, guest: ipaddress.IPv4Address) -> list[Packet]:
    """The two packets at the forward hook of the ip and inet families."""
    return [
        Packet(f"a guest's new connection to {egress}", bridge, egress, "new", guest, None),
        Packet(f"the replies to it from {egress}", egress, bridge, "established", None, guest),
    ]


ANY_TAP = "tap-*"
NAT_DST_PRIORITY = -100
"""Replies are un-NATed (to the guest's address) by conntrack at prerouting, -100."""
NAT_SRC_PRIORITY = 100
"""A guest's packets are masqueraded (to the egress's address) at postrouting, 100."""


def hook_packets(
    family: str,
    hook: str,
    device: str | None,
    priority: int,
    bridge: str,
    egress: str,
    guest: ipaddress.IPv4Address,
) -> list[Packet]:
    """The guests' packets (out, and the replies) that a base chain at `hook` of `family`
    and `priority` sees, with what the kernel knows of them there; [] where they do not
    pass. `device`: a netdev chain's device.

    The way out: the bridge family's prerouting and input (from a TAP, to the gateway's
    MAC), then ip prerouting, forward and postrouting (masqueraded at priority 100), netdev
    egress of the egress; the replies: netdev ingress of the egress (still to the egress's
    address), ip prerouting (un-NATed at priority -100), forward and postrouting, the
    bridge family's output and postrouting (to a TAP). The guests' ARP with the gateway
    passes the bridge family's hooks and the bridge device's netdev hooks. The bridge
    family's forward hook sees traffic between guests only. A device a hook does not have
    is "" (a forwarded packet has both at postrouting).
    """
    out, reply = guest_packets(bridge, egress, guest)
    replace = dataclasses.replace
    unnated = replace(reply, daddr=guest if priority > NAT_DST_PRIORITY else None)
    unmasqueraded = replace(out, saddr=guest if priority < NAT_SRC_PRIORITY else None)
    arp_in = Packet("a guest's ARP with the gateway", ANY_TAP, "", "invalid", None, None)
    arp_in = replace(arp_in, ibrname=bridge, ethertype="arp")
    arp_out = Packet("the gateway's ARP with the guests", "", ANY_TAP, "invalid", None, None)
    arp_out = replace(arp_out, obrname=bridge, ethertype="arp")
    if family in ("ip", "inet"):
        if hook == "forward":
            return [out, reply]
        if hook == "prerouting":
            return [replace(out, oifname=""), replace(unnated, oifname="")]
        if hook == "postrouting":
            return [unmasqueraded, reply]
        return []
    if family == "bridge":
        if hook in ("prerouting", "input"):
            return [replace(out, iifname=ANY_TAP, oifname="", ibrname=bridge), arp_in]
        if hook in ("output", "postrouting"):
            return [replace(reply, iifname="", oifname=ANY_TAP, obrname=bridge), arp_out]
        return []
    if family == "netdev" and device == egress:
        if hook == "ingress":
            return [replace(reply, oifname="", daddr=None)]  # not un-NATed yet
        if hook == "egress":
            return [replace(out, iifname="", saddr=None)]  # masqueraded by then
    if family == "netdev" and device == bridge:
        if hook == "ingress":  # what the bridge passes up to the host
            return [replace(out, oifname=""), replace(arp_in, iifname=bridge, ibrname=None)]
        if hook == "egress":
            return [replace(reply, iifname=""), replace(arp_out, oifname=bridge, obrname=None)]
    return []


class Walk:
    """The chains and rules of one table, ready to be walked."""

    def __init__(self, chains: dict[str, Json], rules: Sequence[Json]) -> None:
        self._chains = chains
        self._rules: dict[str, list[Json]] = {name: [] for name in chains}
        for rule in rules:
            self._rules.setdefault(rule.get("chain", ""), []).append(rule)
        self._steps = 0

    def verdict(self, chain: str, packet: Packet) -> Verdict:
        """What the base chain `chain` does to `packet`."""
        self._steps = MAX_STEPS
        outcome = self._from(chain, 0, packet, 0, 0)
        if outcome == "return":
            return "drop" if self._chains[chain].get("policy") == "drop" else "accept"
        return outcome

    def _from(self, chain: str, start: int, packet: Packet, depth: int, forks: int) -> _Outcome:
        """From rule `start` of `chain` on: its verdict, or "return" at the chain's end.
        `depth`: jumps taken; `forks`: rules walked both ways on the way here."""
        rules = self._rules.get(chain, [])
        at = start
        while at < len(rules):
            self._steps -= 1
            if self._steps <= 0:
                return "unknown"
            matched = matches(rules[at], packet)
            verdict = None if matched is False else _verdict_of(rules[at])
            if verdict is None:
                at += 1
                continue
            kind, target = verdict
            if matched and kind == "continue":
                at += 1
                continue
            if matched and kind == "jump":
                inner = self._enter(target, packet, depth, forks)
                if inner != "return":
                    return inner
                at += 1
                continue
            taken = self._taken(kind, target, chain, at, packet, depth, forks)
            if matched:
                return taken
            if forks >= MAX_FORKS:
                return "unknown"
            skipped = self._from(chain, at + 1, packet, depth, forks + 1)
            return taken if taken == skipped else "unknown"
        return "return"

    def _taken(
        self,
        kind: str,
        target: str | None,
        chain: str,
        at: int,
        packet: Packet,
        depth: int,
        forks: int,
    ) -> _Outcome:
        """The outcome if rule `at` of `chain` takes the packet."""
        if kind in ("accept", "drop", "return", "unknown"):
            return kind  # type: ignore[return-value]
        if kind == "continue":
            return self._from(chain, at + 1, packet, depth, forks + 1)
        inner = self._enter(target, packet, depth, forks + 1)
        if kind == "goto" or inner != "return":
            return inner
        return self._from(chain, at + 1, packet, depth, forks + 1)

    def _enter(self, target: str | None, packet: Packet, depth: int, forks: int) -> _Outcome:
        if target is None or target not in self._rules or depth >= MAX_DEPTH:
            return "unknown"
        return self._from(target, 0, packet, depth + 1, forks)


_XT_GOES_ON = frozenset(
    {"LOG", "NFLOG", "ULOG", "MARK", "CONNMARK", "TCPMSS", "CT", "NOTRACK", "CLASSIFY", "DSCP"}
    | {"TOS", "TTL", "SECMARK", "CONNSECMARK", "AUDIT", "CHECKSUM", "TRACE"}
)
"""xtables targets after which the packet goes on to the next rule."""


def _xt_target(expr: Json) -> str | None:
    xt = expr.get("xt")
    if isinstance(xt, dict) and xt.get("type") == "target":
        return str(xt.get("name"))
    return None


def _verdict_of(rule: Json) -> tuple[str, str | None] | None:
    for expr in rule.get("expr", []):
        if not isinstance(expr, dict):
            continue
        for kind in ("accept", "drop", "return", "continue"):
            if kind in expr:
                return kind, None
        if "reject" in expr:
            return "drop", None
        target = _xt_target(expr)  # iptables-nft writes REJECT (and others) as xtables
        if target == "REJECT":
            return "drop", None
        if target is not None and target not in _XT_GOES_ON:
            return "unknown", None
        if "vmap" in expr:
            return "unknown", None  # a verdict looked up by a key: not walked
        if "queue" in expr:
            return "unknown", None  # a program decides (without one, the packet is dropped)
        for kind in ("jump", "goto"):
            if kind in expr and isinstance(expr[kind], dict):
                return kind, str(expr[kind].get("target"))
    return None


def matches(rule: Json, packet: Packet) -> bool | None:
    """Whether the rule's matches take the packet: True, False, or None (may or may not)."""
    known = True
    for expr in rule.get("expr", []):
        if not isinstance(expr, dict) or _verdict_of({"expr": [expr]}) is not None:
            continue
        if "match" in expr:
            found = _match(expr["match"], packet)
        elif any(key in _IGNORED for key in expr) or is_xt_comment(expr) or _xt_target(expr):
            continue
        else:
            found = None
        if found is False:
            return False
        if found is None:
            known = False
    return True if known else None


def _match(match: Json, packet: Packet) -> bool | None:
    left, right, op = match.get("left"), match.get("right"), match.get("op", "==")
    if not isinstance(left, dict):
        return None
    meta, ct, payload = left.get("meta"), left.get("ct"), left.get("payload")
    found: bool | None = None
    values = _values(right)
    if any(isinstance(value, str) and value.startswith("@") for value in values):
        return None  # a named set: its elements are not looked up
    fields: Json = payload if isinstance(payload, dict) else {}
    protocol, field = fields.get("protocol"), fields.get("field")
    if isinstance(meta, dict) and meta.get("key") in _NAMES:
        name = getattr(packet, _NAMES[meta["key"]])
        if name is None:
            return False  # not a bridge port: the kernel breaks the rule
        answers = {_name_matches(name, value) for value in values}
        found = True if True in answers else (None if None in answers else False)
    elif isinstance(meta, dict) and meta.get("key") == "nfproto":
        found = packet.ethertype == "ip" and "ipv4" in values
    elif (isinstance(meta, dict) and meta.get("key") == "protocol") or (
        protocol == "ether" and field == "type"
    ):
        found = packet.ethertype in values
    elif isinstance(ct, dict) and ct.get("key") == "state":
        found = packet.ct_state in values
    elif isinstance(ct, dict) and ct.get("key") == "status" and values == ["dnat"]:
        found = False
    elif protocol == "arp":
        if packet.ethertype != "arp":
            return False  # a header the packet does not have: no match, whatever the op
        return None  # what the ARP packet says is not modelled
    elif packet.ethertype == "arp" and protocol not in (None, "ether", "vlan"):
        return False  # an IP (or transport) header: ARP has none
    elif protocol in _NOT_IPV4:
        return False  # a header an IPv4 packet does not have: no match, whatever the op
    elif protocol == "ip":
        address = {"saddr": packet.saddr, "daddr": packet.daddr}.get(str(field))
        if address is not None:
            found = any(_address_in(address, value) for value in values)
    if found is None or op not in ("==", "!=", "in"):
        return None
    return found if op != "!=" else not found


def _values(right: object) -> list[Any]:
    if isinstance(right, dict) and "set" in right:
        return list(right["set"])
    if isinstance(right, list):
        return right
    return [right]


def _name_matches(name: str, pattern: object) -> bool | None:
    """Whether device `name` matches `pattern` (None: it may; `name` is a prefix then)."""
    if not isinstance(pattern, str):
        return False
    wildcard = pattern.endswith("*") and not pattern.endswith("\\*")
    literal = pattern[:-1] if wildcard else pattern.replace("\\*", "*")
    if name.endswith("*"):  # some device whose name starts with `prefix`
        prefix = name[:-1]
        if wildcard and prefix.startswith(literal):
            return True
        return None if literal.startswith(prefix) else False
    return name.startswith(literal) if wildcard else name == literal


def _address_in(address: ipaddress.IPv4Address, value: object) -> bool:
    try:
        if isinstance(value, dict) and "prefix" in value:
            prefix = value["prefix"]
            network = ipaddress.IPv4Network(f"{prefix['addr']}/{prefix['len']}", strict=False)
        elif isinstance(value, dict) and "range" in value:
            low, high = (ipaddress.IPv4Address(v) for v in value["range"])
            return low <= address <= high
        else:
            network = ipaddress.IPv4Network(str(value), strict=False)
    except (ValueError, KeyError, TypeError):
        return False
    return address in network
