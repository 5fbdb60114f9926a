"""The firewall seam, on both implementations, each on the fake and on the kernel.

Foreign rulesets are made the way their managers make them: on the kernel with iptables-nft,
iptables-legacy and nft in the test's namespace; on the fake with the same objects written
into its model (JSON commands for nftables, chains and rules for the legacy tables).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
from collections.abc import Iterator

import pytest

from netvm import (
    ConflictError,
    FakeBackend,
    KernelBackend,
    NetworkConfig,
    NetworkManager,
    Rule,
)
from netvm.backends.base import FILTER, Backend
from netvm.firewall import BridgeFirewall, Firewall, FirewallKind
from netvm.firewall.fake_nft import FakeNftRunner
from netvm.firewall.xtables import forward_chain
from netvm.testing import snapshot

POLICY = BridgeFirewall("nvbr0", ipaddress.IPv4Network("192.0.2.0/24"), "up0")
OTHER = BridgeFirewall("nvbr1", ipaddress.IPv4Network("198.51.100.0/24"), "up0")


@pytest.fixture(params=["nftables", "iptables"])
def kind(request: pytest.FixtureRequest) -> FirewallKind:
    chosen: FirewallKind = request.param
    return chosen


@pytest.fixture
def firewall(backend: Backend, kind: FirewallKind) -> Firewall:
    return backend.firewall(kind)


def tool(backend: Backend, *command: str) -> None:
    assert isinstance(backend, KernelBackend)
    assert backend.netns is not None
    subprocess.run(["ip", "netns", "exec", backend.netns, *command], check=True)


def fake_nft(backend: Backend, *commands: dict[str, object]) -> None:
    assert isinstance(backend, FakeBackend)
    FakeNftRunner(backend.state.nftables).run(list(commands), "test", None)


def iptables_nft_forward(backend: Backend, docker_user: bool, ufw: bool = False) -> None:
    """iptables-nft's filter table with FORWARD policy DROP, as Docker or ufw leave it."""
    if isinstance(backend, KernelBackend):
        if docker_user:
            tool(backend, "iptables-nft", "-N", "DOCKER-USER")
            tool(backend, "iptables-nft", "-A", "FORWARD", "-j", "DOCKER-USER")
        if ufw:
            tool(backend, "iptables-nft", "-N", "ufw-before-forward")
            tool(backend, "iptables-nft", "-A", "FORWARD", "-j", "ufw-before-forward")
        tool(backend, "iptables-nft", "-P", "FORWARD", "DROP")
        return
    table = {"family": "ip", "table": "filter"}
    base = {"type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}
    fake_nft(
        backend,
        {"add": {"table": {"family": "ip", "name": "filter"}}},
        {"add": {"chain": {**table, "name": "FORWARD", **base}}},
    )
    for chain, wanted in (("DOCKER-USER", docker_user), ("ufw-before-forward", ufw)):
        if wanted:
            fake_nft(
                backend,
                {"add": {"chain": {**table, "name": chain}}},
                {
                    "add": {
                        "rule": {**table, "chain": "FORWARD", "expr": [{"jump": {"target": chain}}]}
                    }
                },
            )


def jump_to(chain: str) -> dict[str, object]:
    return {"jump": {"target": chain}}


def legacy_forward(backend: Backend, docker_user: bool) -> None:
    """The legacy filter table with FORWARD policy DROP (and Docker's DOCKER-USER)."""
    if isinstance(backend, KernelBackend):
        if docker_user:
            tool(backend, "iptables-legacy", "-N", "DOCKER-USER")
            tool(backend, "iptables-legacy", "-A", "FORWARD", "-j", "DOCKER-USER")
        tool(backend, "iptables-legacy", "-P", "FORWARD", "DROP")
        return
    assert isinstance(backend, FakeBackend)
    if docker_user:
        backend.create_chain(FILTER, "DOCKER-USER")
        backend.insert_rule(FILTER, "FORWARD", Rule("DOCKER-USER"))
    backend.set_policy(FILTER, "FORWARD", "DROP")


def foreign_rule_in_netvms_chain(backend: Backend, kind: FirewallKind) -> None:
    if kind == "iptables":
        backend.insert_rule(FILTER, forward_chain("nvbr0"), Rule("ACCEPT", in_iface="other0"))
    elif isinstance(backend, KernelBackend):
        tool(
            backend,
            "nft",
            "add",
            "rule",
            "inet",
            "netvm-nvbr0",
            "forward",
            "iifname",
            "other0",
            "accept",
        )
    else:
        rule = {"family": "inet", "table": "netvm-nvbr0", "chain": "forward"}
        other = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "other0"}}
        fake_nft(backend, {"add": {"rule": {**rule, "expr": [other, {"accept": None}]}}})


# The seam --------------------------------------------------------------------------------


def test_ensure_installs_then_changes_nothing(backend: Backend, firewall: Firewall) -> None:
    assert firewall.check(POLICY) != []
    assert firewall.ensure(POLICY) is True
    assert firewall.check(POLICY) == []
    once = snapshot(backend)
    assert firewall.ensure(POLICY) is False
    assert snapshot(backend) == once
    texts = [placed.text for placed in firewall.listing("nvbr0")]
    assert any("192.0.2.0/24" in text and "MASQUERADE" in text.upper() for text in texts)


def test_a_change_by_someone_else_between_two_ensures_is_mended(
    backend: Backend, firewall: Firewall, kind: FirewallKind
) -> None:
    """The nftables warm path skips reading while the ruleset's generation is unchanged:
    any other commit (here, a foreign rule dropped into netvm's table, then netvm's own
    rules removed behind its back) must make the next ensure look again."""
    firewall.ensure(POLICY)
    assert firewall.ensure(POLICY) is False
    foreign_rule_in_netvms_chain(backend, kind)
    with pytest.raises(ConflictError):
        firewall.ensure(POLICY)
    other = backend.firewall("iptables" if kind == "nftables" else "nftables")
    assert other.listing("nvbr0") == []
    firewall.remove("nvbr0")
    if kind == "nftables" and isinstance(backend, KernelBackend):
        tool(backend, "nft", "delete", "table", "inet", "netvm-nvbr0")
    elif kind == "nftables":
        fake_nft(backend, {"delete": {"table": {"family": "inet", "name": "netvm-nvbr0"}}})
    else:
        backend.delete_rule(FILTER, forward_chain("nvbr0"), Rule("ACCEPT", in_iface="other0"))
        backend.delete_chain(FILTER, forward_chain("nvbr0"))
    assert firewall.ensure(POLICY) is True
    assert firewall.check(POLICY) == []


def test_rules_deleted_behind_netvms_back_are_put_back(
    backend: Backend, firewall: Firewall, kind: FirewallKind
) -> None:
    firewall.ensure(POLICY)
    assert firewall.ensure(POLICY) is False
    if kind == "iptables":
        (nat,) = backend.list_rules("nat", "NETVM-NAT-nvbr0")
        backend.delete_rule("nat", "NETVM-NAT-nvbr0", nat)
    elif isinstance(backend, KernelBackend):
        tool(backend, "nft", "flush", "chain", "inet", "netvm-nvbr0", "postrouting")
    else:
        fake_nft(backend, {"delete": {"table": {"family": "inet", "name": "netvm-nvbr0"}}})
    assert firewall.check(POLICY) != []
    assert firewall.ensure(POLICY) is True
    assert firewall.check(POLICY) == []


def test_remove_takes_everything_and_is_idempotent(backend: Backend, firewall: Firewall) -> None:
    before = snapshot(backend)
    firewall.ensure(POLICY)
    assert firewall.remove("nvbr0") == []
    assert firewall.listing("nvbr0") == []
    assert firewall.remove("nvbr0") == []
    assert snapshot(backend) == before


def test_two_bridges_are_independent(firewall: Firewall) -> None:
    firewall.ensure(POLICY)
    firewall.ensure(OTHER)
    firewall.remove("nvbr0")
    assert firewall.listing("nvbr0") == []
    assert firewall.check(OTHER) == []


def test_a_changed_policy_converges(firewall: Firewall) -> None:
    firewall.ensure(POLICY)
    moved = dataclasses.replace(POLICY, egress="up1")
    assert firewall.ensure(moved) is True
    assert firewall.check(moved) == []
    assert not any("up0" in placed.text for placed in firewall.listing("nvbr0"))


def test_a_foreign_rule_in_netvms_chain_is_refused_and_kept(
    backend: Backend, firewall: Firewall, kind: FirewallKind
) -> None:
    firewall.ensure(POLICY)
    foreign_rule_in_netvms_chain(backend, kind)
    with pytest.raises(ConflictError, match="did not write"):
        firewall.ensure(POLICY)
    problems = firewall.remove("nvbr0")
    assert len(problems) == 1
    assert "kept" in problems[0]
    assert firewall.listing("nvbr0") == []
    assert "other0" in str(snapshot(backend)), "the foreign rule survives"


def test_nftables_puts_its_accepts_in_docker_user(backend: Backend) -> None:
    iptables_nft_forward(backend, docker_user=True)
    firewall = backend.firewall("nftables")
    firewall.ensure(POLICY)
    chains = {placed.chain for placed in firewall.listing("nvbr0")}
    assert "ip filter DOCKER-USER" in chains
    assert "ip filter FORWARD" not in chains
    assert firewall.ensure(POLICY) is False
    firewall.remove("nvbr0")
    assert firewall.listing("nvbr0") == []


def test_nftables_puts_its_accepts_atop_a_plain_forward_chain(backend: Backend) -> None:
    iptables_nft_forward(backend, docker_user=False)
    firewall = backend.firewall("nftables")
    firewall.ensure(POLICY)
    assert "ip filter FORWARD" in {placed.chain for placed in firewall.listing("nvbr0")}


def test_nftables_writes_nothing_into_ufws_table(backend: Backend) -> None:
    iptables_nft_forward(backend, docker_user=False, ufw=True)
    firewall = backend.firewall("nftables")
    firewall.ensure(POLICY)
    assert not any(placed.chain.startswith("ip filter") for placed in firewall.listing("nvbr0"))


def test_iptables_jumps_from_docker_user(backend: Backend) -> None:
    legacy_forward(backend, docker_user=True)
    firewall = backend.firewall("iptables")
    firewall.ensure(POLICY)
    chains = {placed.chain for placed in firewall.listing("nvbr0")}
    assert "filter DOCKER-USER" in chains
    assert "filter FORWARD" not in chains


def test_iptables_jump_goes_above_an_existing_drop(backend: Backend) -> None:
    backend.insert_rule(FILTER, "FORWARD", Rule("DROP", in_iface="up0"))
    backend.firewall("iptables").ensure(POLICY)
    assert backend.list_rules(FILTER, "FORWARD") == [
        Rule(forward_chain("nvbr0"), comment="netvm:nvbr0"),
        Rule("DROP", in_iface="up0"),
    ]


# The choice, and moving between firewalls -------------------------------------------------


@pytest.fixture
def auto_manager(config: NetworkConfig, backend: Backend) -> Iterator[NetworkManager]:
    with NetworkManager(config, backend) as manager:
        yield manager


def test_auto_on_a_bare_host_is_nftables(auto_manager: NetworkManager) -> None:
    chosen = auto_manager.choose_firewall()
    assert (chosen.kind, chosen.configured) == ("nftables", "auto")


def test_auto_follows_legacy_rules_when_nftables_holds_none(
    auto_manager: NetworkManager, backend: Backend
) -> None:
    legacy_forward(backend, docker_user=False)
    chosen = auto_manager.choose_firewall()
    assert chosen.kind == "iptables"
    assert "legacy" in chosen.reason
    iptables_nft_forward(backend, docker_user=False)
    assert auto_manager.choose_firewall().kind == "nftables"


def test_switching_firewall_moves_netvms_rules(config: NetworkConfig, backend: Backend) -> None:
    with NetworkManager(dataclasses.replace(config, firewall="iptables"), backend) as legacy:
        legacy.ensure_host()
        assert backend.firewall("iptables").listing("nvbr0") != []
    with NetworkManager(dataclasses.replace(config, firewall="nftables"), backend) as nft:
        nft.ensure_host()
        assert backend.firewall("iptables").listing("nvbr0") == []
        assert backend.firewall("nftables").check(nft.firewall_policy) == []


def test_teardown_also_cleans_a_firewall_no_longer_in_use(
    config: NetworkConfig, backend: Backend
) -> None:
    with NetworkManager(dataclasses.replace(config, firewall="iptables"), backend) as legacy:
        legacy.ensure_host()
    with NetworkManager(dataclasses.replace(config, firewall="nftables"), backend) as nft:
        nft.teardown_host()
    assert backend.firewall("iptables").listing("nvbr0") == []
    assert backend.firewall("nftables").listing("nvbr0") == []
