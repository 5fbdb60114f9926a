"""host_status(): what of the host set-up is present, read from the backend (fake here)."""

from __future__ import annotations

import dataclasses

from netvm import FakeBackend, NetworkConfig, NetworkManager, Rule
from netvm.backends.base import FILTER, NAT
from netvm.firewall.xtables import describe_rule, nat_chain
from netvm.status import host_status


def test_a_bare_host_reports_everything_missing(config: NetworkConfig) -> None:
    with NetworkManager(config, FakeBackend()) as manager:
        status = host_status(manager)
    assert not status.bridge_present
    assert not status.ready
    assert (status.mtu, status.up, status.gateway_present, status.ip_forward) == (
        None,
        False,
        False,
        False,
    )
    assert status.firewall.kind == "nftables"
    assert status.firewall.rules == ()
    assert status.firewall.missing == ("nftables table inet netvm-nvbr0 is missing or differs",)
    assert (status.vms_attached, status.vms_leased) == (0, 0)
    assert "bridge nvbr0 is missing" in status.problems()
    assert not config.state_dir.exists(), "status must not create the lease store"


def test_after_ensure_host_and_attach_everything_is_present(config: NetworkConfig) -> None:
    backend = FakeBackend()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-a")
        manager.attach("vm-b")
        status = host_status(manager)
    assert status.ready, status.problems()
    assert status.bridge_owned
    assert (status.mtu, status.up, status.ip_forward) == (1500, True, True)
    assert (status.vms_attached, status.vms_leased) == (2, 2)
    document = status.to_dict()
    assert document["ready"] is True
    assert document["problems"] == []
    assert document["gateway"] == {"address": "192.0.2.1/24", "present": True}
    firewall = document["firewall"]
    assert (firewall["kind"], firewall["configured"], firewall["missing"]) == (
        "nftables",
        "auto",
        [],
    )
    assert firewall["reason"] == "auto: the legacy xtables tables hold no rules"
    assert [(r["chain"], r["rule"]) for r in firewall["rules"]] == [
        ("inet netvm-nvbr0 forward", "in nvbr0 out up0 accept"),
        ("inet netvm-nvbr0 forward", "in nvbr0 out nvbr0 accept"),
        ("inet netvm-nvbr0 forward", "out nvbr0 established/related accept"),
        ("inet netvm-nvbr0 forward", "out nvbr0 drop"),
        ("inet netvm-nvbr0 postrouting", "from 192.0.2.0/24 out up0 masquerade"),
    ]


def test_each_missing_piece_is_reported(config: NetworkConfig) -> None:
    backend = FakeBackend()
    with NetworkManager(dataclasses.replace(config, firewall="iptables"), backend) as manager:
        manager.ensure_host()
        (masquerade,) = backend.list_rules(NAT, nat_chain("nvbr0"))
        backend.delete_rule(NAT, nat_chain("nvbr0"), masquerade)
        backend.set_ip_forward(False)
        backend.set_link("nvbr0", mtu=1400, up=False)
        status = host_status(manager)
    assert not status.ready
    assert status.firewall.kind == "iptables"
    assert FILTER in status.firewall.rules[0].chain
    assert status.problems() == [
        "nvbr0 has MTU 1400, not 1500",
        "nvbr0 is down",
        "ip_forward is off",
        "rule missing in nat/NETVM-NAT-nvbr0: "
        "-s 192.0.2.0/24 -o up0 -m comment --comment netvm:nvbr0 -j MASQUERADE",
    ]


def test_a_foreign_device_with_the_bridge_name_is_not_ready(config: NetworkConfig) -> None:
    backend = FakeBackend()
    backend.add_link("nvbr0", "veth")
    with NetworkManager(config, backend) as manager:
        status = host_status(manager)
    assert status.bridge_present
    assert status.bridge_kind == "veth"
    assert not status.bridge_owned
    assert "nvbr0 is not a bridge (kind veth)" in status.problems()


def test_describe_rule_reads_like_iptables_save() -> None:
    rule = Rule("ACCEPT", in_iface="up0", out_iface="br0", ctstate=("ESTABLISHED", "RELATED"))
    assert describe_rule(rule) == (
        "-i up0 -o br0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    )
