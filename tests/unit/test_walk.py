"""The walk of a foreign forward chain (netvm/firewall/walk.py): the rulesets an attacker's
and a new user's review found doctor wrong about, each with the control that passes."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from netvm.firewall.walk import Packet, Walk, guest_packets, hook_packets

GUEST = ipaddress.IPv4Address("192.0.2.2")
OUT, REPLY = guest_packets("nvbr0", "up0", GUEST)
Json = dict[str, Any]


def name(key: str, value: str, op: str = "==") -> Json:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": value}}


def state(*states: str) -> Json:
    return {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": list(states)}}


def saddr(prefix: str, op: str = "==") -> Json:
    addr, length = prefix.split("/")
    right = {"prefix": {"addr": addr, "len": int(length)}}
    return {
        "match": {
            "op": op,
            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
            "right": right,
        }
    }


def walk(policy: str, chains: dict[str, list[list[Json]]]) -> Walk:
    base = {"forward": {"name": "forward", "hook": "forward", "policy": policy}}
    others = {n: {"name": n} for n in chains if n != "forward"}
    rules = [{"chain": n, "expr": exprs} for n, body in chains.items() for exprs in body]
    return Walk({**base, **others}, rules)


ACCEPT, DROP = {"accept": None}, {"drop": None}


def test_a_goto_into_a_zone_that_rejects_drops_the_new_connection() -> None:
    # firewalld with the bridge in zone public: the zone's chain ends in a reject.
    zone = {"goto": {"target": "filter_FWD_public"}}
    ruleset = walk(
        "accept",
        {
            "forward": [
                [state("established", "related"), ACCEPT],
                [name("iifname", "nvbr0"), zone],
            ],
            "filter_FWD_public": [[{"reject": None}]],
        },
    )
    assert ruleset.verdict("forward", OUT) == "drop"
    assert ruleset.verdict("forward", REPLY) == "accept"
    trusted = walk(
        "accept", {"forward": [[name("iifname", "nvbr0"), zone]], "filter_FWD_public": [[ACCEPT]]}
    )
    assert trusted.verdict("forward", OUT) == "accept"  # the control: a zone that accepts


def test_a_jump_to_a_chain_that_drops_drops_and_one_that_returns_goes_on() -> None:
    jump = {"jump": {"target": "block"}}
    dropping = walk("accept", {"forward": [[jump]], "block": [[DROP]]})
    assert dropping.verdict("forward", OUT) == "drop"
    returning = walk("drop", {"forward": [[jump], [ACCEPT]], "block": [[{"return": None}]]})
    assert returning.verdict("forward", OUT) == "accept"


def test_a_drop_policy_that_lets_only_the_bridge_in_drops_the_replies() -> None:
    half = walk("drop", {"forward": [[name("iifname", "nvbr0"), ACCEPT]]})
    assert half.verdict("forward", OUT) == "accept"
    assert half.verdict("forward", REPLY) == "drop"
    both = walk(
        "drop",
        {
            "forward": [
                [name("iifname", "nvbr0"), ACCEPT],
                [name("oifname", "nvbr0"), state("established", "related"), ACCEPT],
            ]
        },
    )
    assert both.verdict("forward", REPLY) == "accept"


def test_a_drop_on_an_address_of_the_internet_before_the_accepts_is_unknown() -> None:
    # Docker's documented restriction, inserted above netvm's accepts in DOCKER-USER.
    restricted = walk(
        "drop",
        {
            "forward": [
                [name("iifname", "up0"), saddr("198.51.100.0/24", "!="), DROP],
                [name("iifname", "up0"), name("oifname", "nvbr0"), ACCEPT],
                [name("iifname", "nvbr0"), ACCEPT],
            ]
        },
    )
    assert restricted.verdict("forward", OUT) == "accept"  # the guest's address is known
    assert restricted.verdict("forward", REPLY) == "unknown"
    own = walk("drop", {"forward": [[saddr("192.0.2.0/24", "!="), DROP], [ACCEPT]]})
    assert own.verdict("forward", OUT) == "accept"  # from the guest: its address is known


@pytest.mark.parametrize("pattern", ["nvbr*", "nvbr0"])
def test_wildcards_and_sets_of_names_match_as_nftables_does(pattern: str) -> None:
    ruleset = walk("drop", {"forward": [[name("iifname", pattern), ACCEPT]]})
    assert ruleset.verdict("forward", OUT) == "accept"
    listed = {
        "match": {
            "op": "==",
            "left": {"meta": {"key": "oifname"}},
            "right": {"set": ["x", "nvbr0"]},
        }
    }
    assert walk("drop", {"forward": [[listed, ACCEPT]]}).verdict("forward", REPLY) == "accept"
    other = walk("drop", {"forward": [[name("iifname", "docker*"), ACCEPT]]})
    assert other.verdict("forward", OUT) == "drop"


def test_a_loop_of_jumps_ends_unknown() -> None:
    loop = walk(
        "accept", {"forward": [[{"jump": {"target": "a"}}]], "a": [[{"jump": {"target": "a"}}]]}
    )
    assert loop.verdict("forward", OUT) == "unknown"


def test_what_an_ipv4_packet_cannot_carry_does_not_match_and_named_sets_are_unknown() -> None:
    v6 = {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
            "right": "::/96",
        }
    }
    # firewalld's default filter_FORWARD rejects some IPv6 before its zones: not IPv4's.
    firewalld = walk("accept", {"forward": [[v6, {"reject": None}], [ACCEPT]]})
    assert firewalld.verdict("forward", OUT) == "accept"
    named = walk("drop", {"forward": [[name("iifname", "@lan", "!="), DROP], [ACCEPT]]})
    assert named.verdict("forward", OUT) == "unknown"
    mapped = walk("accept", {"forward": [[{"vmap": {"key": {}, "data": {}}}]]})
    assert mapped.verdict("forward", OUT) == "unknown"


def test_a_ruleset_made_to_be_slow_to_walk_ends_unknown_at_once() -> None:
    chains: dict[str, list[list[Json]]] = {
        f"c{n}": [[{"jump": {"target": f"c{n + 1}"}}] for _ in range(10)] for n in range(15)
    }
    chains["forward"] = [[{"jump": {"target": "c0"}}]]
    chains["c15"] = [[{"return": None}]]
    assert walk("accept", chains).verdict("forward", OUT) == "unknown"
    long = walk(
        "drop", {"forward": [[saddr("10.0.0.0/8", "!="), {"counter": None}]] * 800 + [[ACCEPT]]}
    )
    assert long.verdict("forward", REPLY) == "accept"  # no rule decides: walked, no recursion error


def base(hook: str, policy: str) -> dict[str, Json]:
    return {"c": {"name": "c", "hook": hook, "policy": policy}}


def rules(*body: list[Json]) -> list[Json]:
    return [{"chain": "c", "expr": exprs} for exprs in body]


def at(family: str, hook: str, device: str | None = None, priority: int = 0) -> list[Packet]:
    return hook_packets(family, hook, device, priority, "nvbr0", "up0", GUEST)


def daddr(prefix: str, op: str = "==") -> Json:
    rule = saddr(prefix, op)
    rule["match"]["left"]["payload"]["field"] = "daddr"
    return rule


def ether_type(*types: str) -> Json:
    left = {"payload": {"protocol": "ether", "field": "type"}}
    return {"match": {"op": "==", "left": left, "right": {"set": list(types)}}}


def test_a_device_the_hook_does_not_have_has_an_empty_name_as_in_the_kernel() -> None:
    # At prerouting no output device is known: `oifname != "eth9"` matches the empty name.
    unequal = Walk(base("prerouting", "accept"), rules([name("oifname", "eth9", "!="), DROP]))
    assert {unequal.verdict("c", p) for p in at("ip", "prerouting")} == {"drop"}
    equal = Walk(base("prerouting", "accept"), rules([name("oifname", "up0"), DROP]))
    assert {equal.verdict("c", p) for p in at("ip", "prerouting")} == {"accept"}
    # A forwarded packet has both devices at postrouting.
    by_input = Walk(base("postrouting", "accept"), rules([name("iifname", "nvbr0"), DROP]))
    out, reply = at("ip", "postrouting")
    assert by_input.verdict("c", out) == "drop"
    assert by_input.verdict("c", reply) == "accept"  # the control: from the egress


def test_the_guests_addresses_are_known_only_where_nat_has_not_rewritten_them() -> None:
    guests = Walk(base("prerouting", "accept"), rules([daddr("192.0.2.0/24"), DROP]))
    _, before = at("ip", "prerouting", priority=-300)  # raw: still to the egress's address
    _, after = at("ip", "prerouting", priority=0)  # after conntrack's un-NAT
    assert guests.verdict("c", before) == "unknown"  # the egress's address: not known
    assert guests.verdict("c", after) == "drop"
    leak = Walk(base("postrouting", "accept"), rules([saddr("192.0.2.0/24"), DROP]))
    masqueraded, _ = at("ip", "postrouting", priority=300)
    unmasqueraded, _ = at("ip", "postrouting", priority=0)
    assert leak.verdict("c", masqueraded) == "unknown"  # the egress's address: not known
    assert leak.verdict("c", unmasqueraded) == "drop"
    (ingress,) = at("netdev", "ingress", "up0")
    assert ingress.daddr is None  # netdev ingress is before any un-NAT


def test_at_the_bridge_hooks_the_packets_come_from_some_tap_of_the_bridge() -> None:
    out, arp = at("bridge", "input")
    assert Walk(base("input", "drop"), []).verdict("c", out) == "drop"
    for accepted in (name("iifname", "tap-*"), name("iifname", "t*"), name("ibrname", "nvbr0")):
        chain = Walk(base("input", "drop"), rules([accepted, ACCEPT]))
        assert {chain.verdict("c", p) for p in (out, arp)} == {"accept"}
    one_tap = Walk(base("input", "drop"), rules([name("iifname", "tap-0123456789a"), ACCEPT]))
    assert one_tap.verdict("c", out) == "unknown"  # some guests' TAP, not every one
    other = Walk(base("input", "drop"), rules([name("iifname", "eth*"), ACCEPT]))
    assert other.verdict("c", out) == "drop"
    reply, _ = at("bridge", "output")
    assert reply.oifname == "tap-*"
    assert reply.obrname == "nvbr0"
    assert at("bridge", "forward") == []  # between guests only


def test_arp_with_the_gateway_is_walked_at_the_bridge_hooks() -> None:
    out, arp = at("bridge", "input")
    ip_only = Walk(base("input", "drop"), rules([ether_type("ip"), ACCEPT]))
    assert ip_only.verdict("c", out) == "accept"
    assert ip_only.verdict("c", arp) == "drop"  # the guests never learn the gateway's MAC
    both = Walk(base("input", "drop"), rules([ether_type("ip", "arp"), ACCEPT]))
    assert both.verdict("c", arp) == "accept"  # the control
    tracked = Walk(base("input", "drop"), rules([state("established", "related", "new"), ACCEPT]))
    assert tracked.verdict("c", arp) == "drop"  # conntrack does not track ARP: invalid
    assert all(p.ethertype == "ip" for p in at("ip", "forward"))


def test_netdev_hooks_see_the_guests_packets_only_on_the_egress_and_the_bridge() -> None:
    (reply,) = at("netdev", "ingress", "up0")
    assert reply.iifname == "up0"
    assert reply.ct_state == "established"
    (out,) = at("netdev", "egress", "up0")
    assert out.saddr is None  # masqueraded before the egress hook
    assert at("netdev", "ingress", "eth9") == []
    assert {p.ethertype for p in at("netdev", "ingress", "nvbr0")} == {"ip", "arp"}


def test_a_queue_verdict_is_a_program_s_decision_not_a_match() -> None:
    queued = walk("accept", {"forward": [[name("iifname", "nvbr0"), {"queue": {"num": 7}}]]})
    assert queued.verdict("forward", OUT) == "unknown"
    assert queued.verdict("forward", REPLY) == "accept"  # the control: not the bridge's
