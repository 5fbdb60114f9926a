"""The rules behind the per-VM sets (guard.py), once per bridge, as libnftables JSON.

Written as `nft -j list` prints them, so that a listing compares equal to what netvm wrote.

`bridge netvm-B` (the bridge family sees every frame with the port it came in on):

    prerouting  (hook prerouting)  from any port, a guarded VM's MAC, or its address (IPv4
                                   source, ARP sender), not from its own TAP: drop
                                   iifname @guarded jump anti_spoof
    anti_spoof                     ether type other than ip, arp: drop    (VLAN tags, IPv6, ...)
                                   udp sport 67 drop                      (DHCP server replies)
                                   ARP (Ethernet/IPv4 request or reply): sender MAC and
                                        address in @addrs with the frame's source MAC, accept
                                   DHCP discovery from 0.0.0.0 with the TAP's MAC, accept
                                   IPv4: source MAC and address in @addrs, accept
                                   drop                                   (everything else)
    forward     (hook forward)     iifname @isolated drop; oifname @isolated drop
    input       (hook input)       from the bridge's port group (all of netvm's TAPs) or
                                   iifname @guarded, to 01:80:c2:00:00:00-0f: drop
                                   iifname @isolated, to the subnet but not the gateway: drop
    output      (hook output)      oifname @isolated, from the subnet but not the gateway: drop

The @isolated rules of input and output stop isolated VMs from reaching, or being reached
by, the other VMs through the gateway (the host routes between two guests of one subnet when
a guest sends to the gateway's MAC). The link-local drop closes the way past prerouting:
netvm's bridge sends LLDP's address through the hooks (group_fwd_mask, host.py), and the
kernel passes the other 802.1D addresses through the input hook only.

`inet netvm-B` gets, beside the forward and NAT rules of BridgeFirewall:

    prerouting  (hook prerouting, dstnat)  from the egress to a local address: DNAT by
                                           @forward_addrs and @forward_ports
    forward     iifname B oifname B ip daddr @isolated_addrs drop   (routed back, to one)
                iifname B ct status dnat accept       (replies of forwarded connections)
                iifname B jump egress_dispatch         (per egress policy, shared by its
                                                        VMs: ip saddr @egress-D jump egress-D)
                ... BridgeFirewall.forward, with `iifname E oifname B ct status dnat accept`
                    before its drop of new connections from the egress
"""

from __future__ import annotations

from typing import Any

from netvm import naming
from netvm.firewall.guard import (
    ADDRS,
    EGRESS_DISPATCH,
    FORWARD_ADDRS,
    FORWARD_OWNERS,
    FORWARD_PORTS,
    GUARDED,
    ISOLATED,
    ISOLATED_ADDRS,
    MAC_PORTS,
    OWNED_IPS,
    OWNED_MACS,
    UNSPECIFIED,
)
from netvm.firewall.model import BridgeFirewall

Json = dict[str, Any]


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: Any, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _set(name: str) -> str:
    return f"@{name}"


def _concat(*parts: Json) -> Json:
    return {"concat": list(parts)}


def _prefix(policy: BridgeFirewall) -> Json:
    net = policy.subnet
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


LINK_LOCAL = ("01:80:c2:00:00:00", "01:80:c2:00:00:0f")
"""The 802.1D reserved group addresses (is_link_local_ether_addr)."""
BRIDGE_CHAINS: dict[str, Json] = {
    "prerouting": {"type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept"},
    "anti_spoof": {},
    "forward": {"type": "filter", "hook": "forward", "prio": -200, "policy": "accept"},
    "input": {"type": "filter", "hook": "input", "prio": -200, "policy": "accept"},
    "output": {"type": "filter", "hook": "output", "prio": -200, "policy": "accept"},
}


def bridge_rules(policy: BridgeFirewall) -> dict[str, list[list[Json]]]:
    gateway = str(policy.gateway)
    iif, oif = _meta("iifname"), _meta("oifname")
    ether_saddr = _payload("ether", "saddr")
    arp_ip, ip_saddr = _payload("arp", "saddr ip"), _payload("ip", "saddr")
    return {
        "prerouting": [
            # From any port: a guarded VM's MAC or address used by another port (a VM
            # without anti-spoofing would take its traffic: the bridge learns the MAC, the
            # host the address).
            [
                _match(ether_saddr, _set(OWNED_MACS.name)),
                _match(_concat(ether_saddr, iif), _set(MAC_PORTS.name), "!="),
                {"drop": None},
            ],
            [
                _match(ip_saddr, _set(OWNED_IPS.name)),
                _match(_concat(iif, ether_saddr, ip_saddr), _set(ADDRS.name), "!="),
                {"drop": None},
            ],
            [
                _match(arp_ip, _set(OWNED_IPS.name)),
                _match(_concat(iif, ether_saddr, arp_ip), _set(ADDRS.name), "!="),
                {"drop": None},
            ],
            [_match(iif, _set(GUARDED.name)), {"jump": {"target": "anti_spoof"}}],
        ],
        "anti_spoof": [
            # `ether type` reads a VLAN tag (802.1Q, 802.1ad) as the kernel took it off, so
            # tagged frames, IPv6 and every other ethertype end here. Without this rule a
            # tagged IPv4 frame would pass the rules below: their `ip` matches test the
            # skb's protocol, which is the inner one once the tag is off.
            [_match(_payload("ether", "type"), {"set": ["ip", "arp"]}, "!="), {"drop": None}],
            [_match(_payload("udp", "sport"), 67), {"drop": None}],
            [
                # Only Ethernet/IPv4 requests and replies, whose fields are where nft and
                # the neighbours' kernels read them.
                _match(_payload("arp", "htype"), 1),
                _match(_payload("arp", "ptype"), "ip"),
                _match(_payload("arp", "hlen"), 6),
                _match(_payload("arp", "plen"), 4),
                _match(_payload("arp", "operation"), {"set": ["request", "reply"]}),
                _match(_concat(iif, ether_saddr, _payload("arp", "saddr ip")), _set(ADDRS.name)),
                _match(
                    _concat(iif, _payload("arp", "saddr ether"), _payload("arp", "saddr ip")),
                    _set(ADDRS.name),
                ),
                {"accept": None},
            ],
            [
                _match(_payload("ip", "saddr"), str(UNSPECIFIED)),
                _match(_payload("ip", "daddr"), "255.255.255.255"),
                _match(_payload("udp", "sport"), 68),
                _match(_payload("udp", "dport"), 67),
                _match(_concat(iif, ether_saddr, _payload("ip", "saddr")), _set(ADDRS.name)),
                {"accept": None},
            ],
            [
                _match(_payload("ip", "saddr"), str(UNSPECIFIED), "!="),
                _match(_concat(iif, ether_saddr, _payload("ip", "saddr")), _set(ADDRS.name)),
                {"accept": None},
            ],
            [{"drop": None}],
        ],
        "forward": [
            [_match(iif, _set(ISOLATED.name)), {"drop": None}],
            [_match(oif, _set(ISOLATED.name)), {"drop": None}],
        ],
        "input": [
            # 802.1D link-local frames, which the kernel would hand to the host's stack on
            # the TAP itself (past prerouting, where anti_spoof is): dropped from every
            # netvm TAP of the bridge (its port group), guarded or not, so that no guest
            # reconfigures the host (an IPv6 router advertisement there would give it a
            # default route via the guest), nor passes the host's filters on the bridge's
            # name. By @guarded too: a TAP attached by an older netvm is in no group yet.
            [
                _match(_meta("iifgroup"), naming.port_group(policy.bridge)),
                _match(_payload("ether", "daddr"), {"range": list(LINK_LOCAL)}),
                {"drop": None},
            ],
            [
                _match(iif, _set(GUARDED.name)),
                _match(_payload("ether", "daddr"), {"range": list(LINK_LOCAL)}),
                {"drop": None},
            ],
            [
                _match(iif, _set(ISOLATED.name)),
                _match(_payload("ip", "daddr"), _prefix(policy)),
                _match(_payload("ip", "daddr"), gateway, "!="),
                {"drop": None},
            ],
        ],
        "output": [
            [
                _match(oif, _set(ISOLATED.name)),
                _match(_payload("ip", "saddr"), _prefix(policy)),
                _match(_payload("ip", "saddr"), gateway, "!="),
                {"drop": None},
            ]
        ],
    }


def _dnat_status(*matches: Json) -> list[Json]:
    return [*matches, _match({"ct": {"key": "status"}}, "dnat", "in"), {"accept": None}]


def forward_head(policy: BridgeFirewall) -> list[list[Json]]:
    """Rules before BridgeFirewall.forward's accepts.

    The first drops what the host would route from the bridge back to it, to an isolated
    VM: a guest without anti-spoofing could otherwise reach one through the gateway from
    a source outside the subnet, which the bridge's output rule lets pass (replies and
    forwards from the egress have such sources). By destination, so that frames between
    other VMs that br_netfilter passes through this hook keep whatever source they have."""
    bridge = _match(_meta("iifname"), policy.bridge)
    return [
        [
            bridge,
            _match(_meta("oifname"), policy.bridge),
            _match(_payload("ip", "daddr"), _set(ISOLATED_ADDRS.name)),
            {"drop": None},
        ],
        # Replies only: `ct status dnat` is the whole connection's, and a connection the
        # host's own prerouting DNATed (a service address, kube-proxy, a published port)
        # would pass the VM's egress lists in its original direction.
        _dnat_status(bridge, _match({"ct": {"key": "direction"}}, "reply")),
        [bridge, {"jump": {"target": EGRESS_DISPATCH}}],
    ]


MASQUERADE_GUARD = "masquerade_guard"
"""A filter chain after srcnat: a guest's connection that masquerade would give a forwarded
host port as its source port is dropped."""
MASQUERADE_GUARD_CHAIN: Json = {
    "type": "filter",
    "hook": "postrouting",
    "prio": 101,
    "policy": "accept",
}


def masquerade_guard(policy: BridgeFirewall) -> list[list[Json]]:
    """Masquerade keeps a guest's source port: a guest sending first from a forwarded host
    port to a peer would own the conntrack entry that the peer's later connections to the
    forward are replies of (they would reach that guest, not the forward's VM). After
    srcnat (priority 100) the packet carries the port it leaves with."""
    return [
        [
            _match(_meta("iifname"), policy.bridge),
            _match(_meta("oifname"), policy.egress),
            _match({"ct": {"key": "direction"}}, "original"),
            _match(_concat(_meta("l4proto"), _payload("th", "sport")), _set(FORWARD_PORTS.name)),
            # ...unless it is the forward's own VM (its original source address).
            _match(
                _concat(
                    _meta("l4proto"),
                    _payload("th", "sport"),
                    {"ct": {"key": "ip saddr", "dir": "original"}},
                ),
                _set(FORWARD_OWNERS.name),
                "!=",
            ),
            {"drop": None},
        ]
    ]


def forward_before_drop(policy: BridgeFirewall) -> list[Json]:
    """Inbound connections a port forward DNATed pass netvm's drop of new ones."""
    return _dnat_status(
        _match(_meta("iifname"), policy.egress), _match(_meta("oifname"), policy.bridge)
    )


def prerouting(policy: BridgeFirewall) -> list[list[Json]]:
    key = _concat(_meta("l4proto"), _payload("th", "dport"))
    return [
        [
            _match(_meta("iifname"), policy.egress),
            _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
            {
                "dnat": {
                    "family": "ip",
                    "addr": {"map": {"key": key, "data": _set(FORWARD_ADDRS.name)}},
                    "port": {"map": {"key": key, "data": _set(FORWARD_PORTS.name)}},
                }
            },
        ]
    ]


def egress_dispatch_rule(chain: str) -> list[Json]:
    """`ip saddr @egress-D jump egress-D`: the VMs of one egress policy to its chain."""
    return [_match(_payload("ip", "saddr"), _set(chain)), {"jump": {"target": chain}}]
