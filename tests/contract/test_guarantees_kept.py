"""The guarantees survive what happens to the firewall behind netvm's back, on the fake and
on the kernel: netvm's tables lost (a foreign `nft flush ruleset`) are given back with every
VM's elements at the next ensure_host, and a firewall that cannot hold them (`auto` turning
to iptables, or the configuration) is refused before anything changes."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from netvm import ConflictError, FakeBackend, KernelBackend, NetworkConfig, NetworkManager
from netvm.backends.base import Backend
from netvm.firewall.fake_nft import FakeNftRunner
from netvm.policy import OPEN, GuestPolicy
from netvm.testing import snapshot

SHOP = GuestPolicy.of(
    isolated=True, egress_deny=["198.51.100.0/24"], port_forwards=["8080:80", "5353:53/udp"]
)


def policies(manager: NetworkManager) -> dict[str, GuestPolicy | None]:
    return {a.vm_id: a.policy for a in manager.list()}


def three_tenants(manager: NetworkManager) -> dict[str, GuestPolicy | None]:
    """A host set up with a VM of every guarantee, one of the default, one open."""
    manager.ensure_host()
    manager.attach("vm-shop", policy=SHOP)
    manager.attach("vm-default")
    manager.attach("vm-open", policy=OPEN)
    return policies(manager)


def test_ensure_host_gives_back_the_guarantees_the_tables_lost(
    config: NetworkConfig, backend: Backend
) -> None:
    with NetworkManager(config, backend) as manager:
        before = three_tenants(manager)
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


def _lose_the_store(manager: NetworkManager) -> None:
    path = manager.leases.path
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


@pytest.mark.parametrize("flush_first", [False, True], ids=["store-then-flush", "control"])
def test_a_store_rebuilt_from_the_kernel_learns_the_policies_the_firewall_holds(
    config: NetworkConfig, backend: Backend, flush_first: bool
) -> None:
    """The lease store is lost (deleted, or from a netvm that did not remember policies):
    the rebuild takes each VM's policy from its TAP's record, so that a later flush of the
    firewall is still mended. The control loses both at once: nothing can say what the
    guarantees were, and the test sees that they are gone."""
    with NetworkManager(config, backend) as manager:
        before = three_tenants(manager)
        if flush_first:
            backend.firewall("nftables").remove("nvbr0")
        _lose_the_store(manager)
    with NetworkManager(config, backend) as rebuilt:
        rebuilt.ensure_host()
        with rebuilt.leases.transaction() as tx:
            remembered = tx.policies()
        backend.firewall("nftables").remove("nvbr0")
        rebuilt.ensure_host()
        if flush_first:
            assert policies(rebuilt) == dict.fromkeys(before)
            assert set(remembered.values()) == {OPEN.describe()}
        else:
            assert remembered == {vm: p.describe() for vm, p in before.items() if p} | {
                "vm-open": OPEN.describe()
            }
            assert policies(rebuilt) == before
        rebuilt.teardown_host()


def _delete_netvms_inet_table(backend: Backend) -> None:
    """A foreign `nft delete table inet netvm-nvbr0`: the records (in the bridge table)
    stay, the VMs' forward-side elements, egress sets and chains go."""
    if isinstance(backend, KernelBackend):
        assert backend.netns is not None
        command = ["nft", "delete", "table", "inet", "netvm-nvbr0"]
        subprocess.run(["ip", "netns", "exec", backend.netns, *command], check=True)
    else:
        assert isinstance(backend, FakeBackend)
        table = {"family": "inet", "name": "netvm-nvbr0"}
        FakeNftRunner(backend.state.nftables).run([{"delete": {"table": table}}], "test", None)


def _by_table(state: dict[str, object]) -> dict[tuple[str, str], list[object]]:
    """The nftables part of a snapshot, table by table (each in its order): a table made
    again is listed after the others."""
    tables: dict[tuple[str, str], list[object]] = {}
    nftables = state["nftables"]
    assert isinstance(nftables, list)
    for entry in nftables:
        ((kind, body),) = entry.items()
        key = (body["family"], body["name"] if kind == "table" else body["table"])
        tables.setdefault(key, []).append(entry)
    return tables


def test_a_table_taken_behind_netvms_back_comes_back_with_every_vms_elements(
    config: NetworkConfig, backend: Backend
) -> None:
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-shop", policy=SHOP)
        manager.attach("vm-default")
        before = snapshot(backend)
        _delete_netvms_inet_table(backend)
        assert snapshot(backend) != before  # the control: the loss is seen
        manager.ensure_host()
        after = snapshot(backend)
        assert _by_table(after) == _by_table(before)
        assert {**after, "nftables": None} == {**before, "nftables": None}
        manager.teardown_host()


def test_detach_gc_and_teardown_work_while_a_table_of_netvms_is_gone(
    config: NetworkConfig, backend: Backend
) -> None:
    """Removing a VM's guarantees must not need the sets a foreign change took: what is
    left of them goes, and nothing stops detach, gc or teardown."""
    empty = snapshot(backend)
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        for vm_id in ("vm-a", "vm-b", "vm-c"):
            manager.attach(vm_id, policy=GuestPolicy.of(egress_deny=["198.51.100.0/24"]))
        _delete_netvms_inet_table(backend)
        manager.detach("vm-a")
        assert manager.wait_detached()
        assert manager.gc(keep=["vm-c"]) == ["vm-b"]
        assert set(policies(manager)) == {"vm-c"}
        manager.teardown_host()
    assert snapshot(backend) == empty


def test_attaching_again_gives_back_elements_and_egress_rules_deleted_by_hand(
    config: NetworkConfig, backend: Backend
) -> None:
    """An element of the VM's (its anti-spoofing, its isolation) and its egress chain's
    rules deleted behind netvm's back: the VM's record still says all is well, so only an
    attach again with its policy can see it; it writes them back."""
    from netvm.firewall.guard import GUARDED, ISOLATED, egress_chain, elements
    from netvm.firewall.nftables import NftablesFirewall, table_name
    from netvm.testing.state import nftables_ruleset

    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        vm = manager.attach("vm-shop", policy=SHOP)
        firewall = backend.firewall("nftables")
        assert isinstance(firewall, NftablesFirewall)
        record = firewall.record("nvbr0", vm.tap_name)
        assert record is not None
        whole = nftables_ruleset(backend)
        table = table_name("nvbr0")
        cut = [("delete", e) for e in elements(record) if e.schema in (GUARDED, ISOLATED)]
        assert len(cut) == 2
        firewall._store().commit(cut, table, "test", "test")
        chain = egress_chain(SHOP)
        assert chain is not None
        flush = {"flush": {"chain": {"family": "inet", "table": table, "name": chain}}}
        firewall._run([flush], "test", None)
        assert nftables_ruleset(backend) != whole  # the control: the loss is seen
        manager.attach("vm-shop", policy=SHOP)
        assert nftables_ruleset(backend) == whole


def test_attaching_again_without_a_policy_keeps_the_vms_own(
    config: NetworkConfig, backend: Backend
) -> None:
    """A retry of an attach without its policy (an orchestrator's, `netvm attach VM`) must
    not take a tenant's isolation, lists and forwards away; a policy given replaces it."""
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-shop", policy=SHOP)
        manager.attach("vm-shop")
        assert policies(manager)["vm-shop"] == SHOP
        result = manager.attach_many(["vm-shop", "vm-new"])
        assert not result.errors
        assert policies(manager) == {"vm-shop": SHOP, "vm-new": GuestPolicy()}
        manager.attach("vm-shop", policy=GuestPolicy())  # the control: given, it replaces
        assert policies(manager)["vm-shop"] == GuestPolicy()
        manager.attach_many(["vm-shop"], policy=OPEN)
        assert policies(manager)["vm-shop"] is None


def test_auto_without_a_usable_nftables_says_the_default_guarantees_are_lost(
    config: NetworkConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """`auto` turning to iptables because nftables cannot be used (its Python binding
    missing, say), not because the host's legacy tables hold rules: VMs attached without a
    policy get no anti-spoofing, and netvm says so once."""
    backend = FakeBackend()
    nftables = backend.firewall("nftables")
    missing = "libnftables' Python binding is not installed"
    nftables._unavailable = lambda: missing  # type: ignore[attr-defined]
    with NetworkManager(config, backend) as manager, caplog.at_level("WARNING", "netvm"):
        manager.ensure_host()
        manager.attach("vm-1")
        manager.attach("vm-2")
        assert policies(manager) == {"vm-1": None, "vm-2": None}
    said = [r.getMessage() for r in caplog.records if "get no guarantee" in r.getMessage()]
    assert len(said) == 1, said
    assert missing in said[0]
