"""The guarantees survive what happens to the firewall behind netvm's back, on the fake and
on the kernel: netvm's tables lost (a foreign `nft flush ruleset`) are given back with every
VM's elements at the next ensure_host, and a firewall that cannot hold them (`auto` turning
to iptables, or the configuration) is refused before anything changes."""

from __future__ import annotations

import dataclasses

import pytest

from netvm import ConflictError, NetworkConfig, NetworkManager
from netvm.backends.base import Backend
from netvm.policy import OPEN, GuestPolicy
from netvm.testing import snapshot

SHOP = GuestPolicy.of(
    isolated=True, egress_deny=["198.51.100.0/24"], port_forwards=["8080:80", "5353:53/udp"]
)


def policies(manager: NetworkManager) -> dict[str, GuestPolicy | None]:
    return {a.vm_id: a.policy for a in manager.list()}


def test_ensure_host_gives_back_the_guarantees_the_tables_lost(
    config: NetworkConfig, backend: Backend
) -> None:
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-shop", policy=SHOP)
        manager.attach("vm-default")
        manager.attach("vm-open", policy=OPEN)
        before = policies(manager)
        assert before["vm-shop"] == SHOP
        backend.firewall("nftables").remove("nvbr0")  # what a flush does to netvm's tables
        lost = policies(manager)
        assert lost["vm-shop"] is None  # the control: the loss is seen
        assert lost["vm-default"] is None
        manager.ensure_host()
        assert policies(manager) == before
        manager.ensure_host()  # and again: nothing to give back, nothing changes
        assert policies(manager) == before
        manager.detach("vm-shop")
        backend.firewall("nftables").remove("nvbr0")
        manager.ensure_host()  # a detached VM's policy is forgotten with its lease
        assert set(policies(manager)) == {"vm-default", "vm-open"}
        manager.teardown_host()


def test_a_firewall_that_cannot_hold_the_guarantees_is_refused_before_any_change(
    config: NetworkConfig, backend: Backend
) -> None:
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-shop", policy=SHOP)
        manager.attach("vm-open", policy=OPEN)
        kept = snapshot(backend)
    iptables = dataclasses.replace(config, firewall="iptables")
    with NetworkManager(iptables, backend) as switched:
        with pytest.raises(ConflictError, match="vm-shop"):
            switched.ensure_host()
        assert snapshot(backend) == kept
        switched.detach("vm-shop")  # the control: with no guarded VM, the switch goes on
        switched.ensure_host()
        assert switched.choose_firewall().kind == "iptables"
        assert [a.vm_id for a in switched.list()] == ["vm-open"]
        switched.teardown_host()


def test_giving_back_cut_short_is_finished_by_the_next_ensure_host(
    config: NetworkConfig, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ensure_host that made the tables again dies before it gave the guarantees back
    (or one VM's failed): the tables are current then, but the next ensure_host still
    gives them back, as a file in state_dir says it must."""
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-shop", policy=SHOP)
        before = policies(manager)
        backend.firewall("nftables").remove("nvbr0")

        def killed() -> bool:
            raise KeyboardInterrupt  # as a kill would stop it

        monkeypatch.setattr(manager, "_restore_guarantees", killed)
        with pytest.raises(KeyboardInterrupt):
            manager.ensure_host()
        monkeypatch.undo()
        assert policies(manager)["vm-shop"] is None
    with NetworkManager(config, backend) as again:  # the tables are in place already
        again.ensure_host()
        assert policies(again) == before
        again.ensure_host()
        assert not list(config.state_dir.glob("guarantees-to-restore.*"))
        again.teardown_host()
