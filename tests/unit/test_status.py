"""host_status(): what of the host set-up is present, read from the backend (fake here)."""

from __future__ import annotations

from netvm import FakeBackend, NetworkConfig, NetworkManager, Rule
from netvm.backends.base import FILTER, NAT
from netvm.status import describe_rule, host_status


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
    assert len(status.rules) == 6
    assert not any(r.present for r in status.rules)
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
    assert [(r["table"], r["chain"]) for r in document["rules"]] == [
        (FILTER, "FORWARD"),
        (FILTER, "NETVM-FWD-nvbr0"),
        (FILTER, "NETVM-FWD-nvbr0"),
        (FILTER, "NETVM-FWD-nvbr0"),
        (NAT, "POSTROUTING"),
        (NAT, "NETVM-NAT-nvbr0"),
    ]


def test_each_missing_piece_is_reported(config: NetworkConfig) -> None:
    backend = FakeBackend()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        masquerade = manager.expected_rules()[(NAT, manager.nat_chain)][0]
        backend.delete_rule(NAT, manager.nat_chain, masquerade)
        backend.set_ip_forward(False)
        backend.set_link("nvbr0", mtu=1400, up=False)
        status = host_status(manager)
    assert not status.ready
    missing = [r for r in status.rules if not r.present]
    assert [r.rule for r in missing] == [masquerade]
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
