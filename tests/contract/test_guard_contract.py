"""Per-VM guarantees at the firewall seam, on the fake and on the kernel.

The kernel side writes elements with netvm's packed nf_tables messages and is read back
through libnftables (`guards`, `snapshot`): a wrong layout would show as a wrong listing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from netvm import ConfigError, ConflictError, FakeBackend, HostError, KernelBackend
from netvm.backends.base import Backend, TapOptions
from netvm.firewall import BridgeFirewall
from netvm.firewall import elements as netlink_elements
from netvm.firewall.guard import VmGuard, egress_chain, elements
from netvm.firewall.nftables import NftablesFirewall
from netvm.policy import OPEN, GuestPolicy
from netvm.testing import run_in_netns, snapshot

POLICY = BridgeFirewall("nvbr0", ipaddress.IPv4Network("192.0.2.0/24"), "up0")
ALL = GuestPolicy.of(
    isolated=True,
    egress_allow=("203.0.113.0/24", "0.0.0.0/0:udp:53"),
    egress_deny=("198.51.100.0/24:tcp:22",),
    port_forwards=("8080:80", "5353:53/udp"),
)


def vm(tap: str, last: int, policy: GuestPolicy) -> VmGuard:
    ip = ipaddress.IPv4Address(f"192.0.2.{last}")
    return VmGuard(tap, bytes([2, 0x6E]) + ip.packed, ip, policy)


@pytest.fixture
def nft(backend: Backend) -> NftablesFirewall:
    firewall = backend.firewall("nftables")
    assert isinstance(firewall, NftablesFirewall)
    firewall.ensure(POLICY)
    return firewall


def egress_chains(firewall: NftablesFirewall) -> set[str]:
    return {
        item["chain"]["name"]
        for item in firewall.ruleset()
        if "chain" in item and item["chain"]["name"].startswith("egress-")
    }


def test_guard_records_and_is_idempotent(backend: Backend, nft: NftablesFirewall) -> None:
    a = vm("tap-a", 5, ALL)
    nft.guard("nvbr0", a)
    assert nft.record("nvbr0", "tap-a") == a
    assert nft.guards("nvbr0") == {"tap-a": a}
    once = snapshot(backend)
    nft.guard("nvbr0", a)
    assert snapshot(backend) == once
    assert nft.check(POLICY) == []
    assert nft.ensure(POLICY) is False, "elements are not part of the rules ensure compares"


def test_unguard_removes_every_element(backend: Backend, nft: NftablesFirewall) -> None:
    before = snapshot(backend)
    nft.guard("nvbr0", vm("tap-a", 5, ALL))
    assert snapshot(backend) != before
    assert nft.unguard("nvbr0", ["tap-a"]) == {"tap-a": vm("tap-a", 5, ALL)}
    nft.prune("nvbr0", live=())  # the shared egress chain goes once no VM uses it
    assert snapshot(backend) == before
    assert nft.unguard("nvbr0", ["tap-a"]) == {}


def test_a_changed_policy_replaces_the_old_elements(
    backend: Backend, nft: NftablesFirewall
) -> None:
    later = GuestPolicy.of(egress_deny=("198.51.100.0/24",), port_forwards=("9090:90",))
    nft.guard("nvbr0", vm("tap-a", 5, later))
    fresh = snapshot(backend)
    nft.unguard("nvbr0", ["tap-a"])
    nft.prune("nvbr0", live=())
    nft.guard("nvbr0", vm("tap-a", 5, ALL))
    nft.guard("nvbr0", vm("tap-a", 5, later))
    nft.prune("nvbr0", live=("tap-a",))
    assert snapshot(backend) == fresh


def test_an_open_policy_has_no_elements(backend: Backend, nft: NftablesFirewall) -> None:
    before = snapshot(backend)
    nft.guard("nvbr0", vm("tap-a", 5, OPEN))
    assert snapshot(backend) == before
    assert nft.record("nvbr0", "tap-a") is None


def test_vms_with_the_same_egress_lists_share_one_chain(nft: NftablesFirewall) -> None:
    nft.guard("nvbr0", vm("tap-a", 5, ALL))
    nft.guard("nvbr0", vm("tap-b", 6, dataclasses.replace(ALL, port_forwards=())))
    assert egress_chains(nft) == {egress_chain(ALL)}
    nft.unguard("nvbr0", ["tap-a"])
    nft.prune("nvbr0", live=("tap-b",))
    assert egress_chains(nft) == {egress_chain(ALL)}, "tap-b still uses it"
    nft.unguard("nvbr0", ["tap-b"])
    nft.prune("nvbr0", live=())
    assert egress_chains(nft) == set()


def test_unguard_of_many_taps_removes_each_ones_elements_chunk_by_chunk(
    backend: Backend, nft: NftablesFirewall, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("netvm.firewall.nftables.UNGUARD_CHUNK", 2)
    before = snapshot(backend)
    lists = GuestPolicy.of(isolated=True, egress_deny=("198.51.100.0/24",))
    guards = {
        f"tap-{n}": vm(f"tap-{n}", n, lists if n % 2 else GuestPolicy()) for n in range(5, 10)
    }
    for guard in guards.values():
        nft.guard("nvbr0", guard)
    nft.guard("nvbr0", vm("tap-k", 20, lists))
    asked = [*guards, "tap-none", "tap-5"]  # one without guarantees, one named twice
    assert nft.unguard("nvbr0", asked) == guards
    assert set(nft.guards("nvbr0")) == {"tap-k"}
    nft.unguard("nvbr0", ["tap-k"])
    nft.prune("nvbr0", live=())
    assert snapshot(backend) == before


def test_unguard_removes_what_is_left_when_someone_took_an_element(
    backend: Backend, nft: NftablesFirewall
) -> None:
    """A VM's elements are destroyed, not deleted: one that a foreign `nft delete element`
    took already fails nothing, and the others still go."""
    before = snapshot(backend)
    a = vm("tap-a", 5, ALL)
    nft.guard("nvbr0", a)
    taken = [e for e in elements(a) if e.schema.name == "isolated"]
    assert taken
    nft._store().commit([("delete", e) for e in taken], "netvm-nvbr0", "take", "tap-a")
    assert nft.unguard("nvbr0", ["tap-a"]) == {"tap-a": a}
    nft.prune("nvbr0", live=())
    assert snapshot(backend) == before


def test_a_destroy_is_no_change_where_the_element_is_gone_but_the_set_must_exist(
    backend: Backend, nft: NftablesFirewall
) -> None:
    store = nft._store()
    a = vm("tap-a", 5, ALL)
    gone = [e for e in elements(a) if e.schema.family == "bridge"]
    before = snapshot(backend)
    store.commit([("destroy", e) for e in gone], "netvm-nvbr0", "destroy", "tap-a")
    assert snapshot(backend) == before
    with pytest.raises(HostError) as deleted:
        store.commit([("delete", e) for e in gone], "netvm-nvbr0", "delete", "tap-a")
    assert deleted.value.errno == errno.ENOENT
    with pytest.raises(HostError) as no_set:
        store.commit([("destroy", e) for e in gone], "netvm-nosuch", "destroy", "tap-a")
    assert no_set.value.errno == errno.ENOENT
    assert snapshot(backend) == before


def test_a_kernel_without_destroy_gets_an_add_and_a_delete(
    backend: Backend, nft: NftablesFirewall, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Linux 6.3 the kernel refuses NFT_MSG_DESTROYSETELEM as an unknown message
    (EINVAL): played here with a message type no kernel knows."""
    if not isinstance(backend, KernelBackend):
        pytest.skip("the fake models the kernel of this machine, which has the message")
    monkeypatch.setitem(netlink_elements._MESSAGES, "destroy", 0xFF)
    batches: list[int] = []
    real = netlink_elements.NetlinkElements._commit

    def counted(self: netlink_elements.NetlinkElements, *args: Any) -> int:
        batches.append(real(self, *args))
        return batches[-1]

    monkeypatch.setattr(netlink_elements.NetlinkElements, "_commit", counted)
    before = snapshot(backend)
    a = vm("tap-a", 5, ALL)
    nft.guard("nvbr0", a, fresh=True)
    batches.clear()
    assert nft.unguard("nvbr0", ["tap-a"]) == {"tap-a": a}
    assert batches == [errno.EINVAL, 0], "refused, then the same as an add and a delete"
    nft.prune("nvbr0", live=())
    assert snapshot(backend) == before
    nft.guard("nvbr0", a, fresh=True)
    batches.clear()
    assert nft.unguard("nvbr0", ["tap-a"]) == {"tap-a": a}
    assert batches == [0], "a kernel that refused once is not asked again"
    nft.prune("nvbr0", live=())
    assert snapshot(backend) == before


def test_prune_removes_only_taps_that_are_gone(nft: NftablesFirewall) -> None:
    nft.guard("nvbr0", vm("tap-a", 5, ALL))
    nft.guard("nvbr0", vm("tap-b", 6, GuestPolicy.of()))
    assert nft.prune("nvbr0", live=("tap-a",)) == ["tap-b"]
    assert set(nft.guards("nvbr0")) == {"tap-a"}


def test_a_host_port_forwarded_twice_is_a_conflict_and_changes_nothing(
    backend: Backend, nft: NftablesFirewall
) -> None:
    nft.guard("nvbr0", vm("tap-a", 5, ALL))
    before = snapshot(backend)
    with pytest.raises(ConflictError, match="8080:81/tcp"):
        nft.guard("nvbr0", vm("tap-b", 6, GuestPolicy.of(port_forwards=("8080:81",))))
    assert snapshot(backend) == before


def test_a_long_record_spans_several_elements(nft: NftablesFirewall) -> None:
    rules = tuple(f"198.51.{i}.0/24:tcp:{1000 + i}" for i in range(20))
    long = vm("tap-a", 5, GuestPolicy.of(egress_deny=rules))
    assert len(long.record()) > 400
    nft.guard("nvbr0", long)
    assert nft.record("nvbr0", "tap-a") == long
    assert nft.guards("nvbr0") == {"tap-a": long}


def test_ensure_keeps_the_elements_of_running_vms(nft: NftablesFirewall) -> None:
    a = vm("tap-a", 5, ALL)
    nft.guard("nvbr0", a)
    moved = dataclasses.replace(POLICY, egress="up1")
    assert nft.ensure(moved) is True
    assert nft.check(moved) == []
    assert nft.record("nvbr0", "tap-a") == a


def test_remove_takes_the_elements_with_the_tables(backend: Backend) -> None:
    before = snapshot(backend)
    firewall = backend.firewall("nftables")
    firewall.ensure(POLICY)
    firewall.guard("nvbr0", vm("tap-a", 5, ALL))
    assert firewall.remove("nvbr0") == []
    assert snapshot(backend) == before
    assert firewall.guards("nvbr0") == {}


def test_guard_without_the_tables_fails_with_the_kernels_error(backend: Backend) -> None:
    firewall = backend.firewall("nftables")
    with pytest.raises(Exception, match="nvbr0") as caught:
        firewall.guard("nvbr0", vm("tap-a", 5, GuestPolicy.of()))
    assert getattr(caught.value, "errno", None) == errno.ENOENT


def test_iptables_refuses_guarantees_by_name(backend: Backend) -> None:
    firewall = backend.firewall("iptables")
    firewall.ensure(POLICY)
    with pytest.raises(ConfigError, match="isolated needs the nftables firewall"):
        firewall.guard("nvbr0", vm("tap-a", 5, GuestPolicy.of(anti_spoof=False, isolated=True)))
    with pytest.raises(ConfigError, match="anti_spoof needs the nftables firewall"):
        firewall.guard("nvbr0", vm("tap-a", 5, GuestPolicy.of()))
    firewall.guard("nvbr0", vm("tap-a", 5, OPEN))
    assert firewall.guards("nvbr0") == {}


def test_a_fault_in_the_transaction_changes_nothing() -> None:
    backend = FakeBackend()
    firewall = backend.firewall("nftables")
    firewall.ensure(POLICY)
    before = snapshot(backend)
    backend.fail_at(1)
    with pytest.raises(Exception, match="injected"):
        firewall.guard("nvbr0", vm("tap-a", 5, GuestPolicy.of(isolated=True)))
    assert snapshot(backend) == before


def test_port_isolation_is_the_kernels_per_port_flag(backend: Backend) -> None:
    backend.create_bridge("br0", 1500)
    bridge = backend.get_link("br0")
    assert bridge is not None
    backend.create_tap("tap-a", TapOptions())
    with pytest.raises(HostError) as refused:
        backend.set_port_isolated("tap-a", True)
    assert refused.value.errno == errno.EOPNOTSUPP
    backend.set_link("tap-a", master=bridge.index, up=True)
    link = backend.get_link("tap-a")
    assert link is not None
    assert not link.isolated
    backend.set_port_isolated("tap-a", True)
    link = backend.get_link("tap-a")
    assert link is not None
    assert link.isolated
    backend.set_port_isolated("tap-a", False)
    link = backend.get_link("tap-a")
    assert link is not None
    assert not link.isolated


def test_the_enslave_can_carry_the_port_isolation(backend: Backend) -> None:
    """set_link(isolated=...) applies the isolation after the enslave (one datagram on the
    kernel), by the index create_tap returned, or looked up when none is given."""
    backend.create_bridge("br0", 1500)
    bridge = backend.get_link("br0")
    assert bridge is not None
    index = backend.create_tap("tap-a", TapOptions())
    made = backend.get_link("tap-a")
    assert made is not None
    assert made.index == index
    backend.set_link("tap-a", index=index, master=bridge.index, up=True, isolated=True)
    link = backend.get_link("tap-a")
    assert link is not None
    assert (link.master, link.up, link.isolated) == (bridge.index, True, True)
    backend.create_tap("tap-b", TapOptions())
    backend.set_link("tap-b", master=bridge.index, isolated=True)
    link = backend.get_link("tap-b")
    assert link is not None
    assert (link.master, link.isolated) == (bridge.index, True)


def test_an_isolation_without_a_bridge_is_refused_after_the_other_changes(
    backend: Backend,
) -> None:
    backend.create_tap("tap-a", TapOptions())
    with pytest.raises(HostError) as refused:
        backend.set_link("tap-a", mtu=1400, isolated=True)
    assert refused.value.errno == errno.EOPNOTSUPP
    link = backend.get_link("tap-a")
    assert link is not None
    assert (link.mtu, link.isolated) == (1400, False)  # the MTU came first, and stays


def test_a_set_link_by_a_gone_index_changes_nothing(backend: Backend) -> None:
    index = backend.create_tap("tap-a", TapOptions())
    backend.delete_link("tap-a")
    backend.create_tap("tap-a", TapOptions())  # same name, another device
    with pytest.raises(HostError) as refused:
        backend.set_link("tap-a", index=index, mtu=1400)
    assert refused.value.errno == errno.ENODEV
    link = backend.get_link("tap-a")
    assert link is not None
    assert link.mtu == 1500


# The fresh path: no record read first, the record created exclusively --------------------


@pytest.mark.parametrize("later", [GuestPolicy(), OPEN, ALL], ids=["default", "open", "all"])
def test_a_fresh_guard_replaces_what_a_crash_left(
    backend: Backend, nft: NftablesFirewall, later: GuestPolicy
) -> None:
    """A TAP deleted without its elements (a crash in gc, `ip link del`) and made again for
    another address: a fresh guard must not keep the old address or guarantees."""
    before = snapshot(backend)
    nft.guard("nvbr0", vm("tap-a", 5, ALL))
    again = vm("tap-a", 6, later)
    nft.guard("nvbr0", again, fresh=True)
    assert nft.record("nvbr0", "tap-a") == (again if later.any else None)
    nft.unguard("nvbr0", ["tap-a"])
    nft.prune("nvbr0", live=())
    assert snapshot(backend) == before, "only the new elements were there to remove"


def test_a_fresh_guard_writes_what_a_full_one_does(backend: Backend, nft: NftablesFirewall) -> None:
    nft.guard("nvbr0", vm("tap-a", 5, ALL))
    full = snapshot(backend)
    nft.unguard("nvbr0", ["tap-a"])
    nft.guard("nvbr0", vm("tap-a", 5, ALL), fresh=True)
    assert snapshot(backend) == full


def test_a_fresh_guard_that_clashes_is_a_conflict_and_changes_nothing(
    backend: Backend, nft: NftablesFirewall
) -> None:
    nft.guard("nvbr0", vm("tap-a", 5, ALL))
    before = snapshot(backend)
    clash = GuestPolicy.of(port_forwards=("8080:81",))
    with pytest.raises(ConflictError, match="8080:81/tcp"):
        nft.guard("nvbr0", vm("tap-b", 6, clash), fresh=True)
    assert snapshot(backend) == before


def test_an_error_in_any_message_of_the_batch_is_reported(
    backend: Backend, nft: NftablesFirewall
) -> None:
    """Only the last message of a batch asks for an ack: a failure of an earlier one must
    still fail the commit, and the batch must change nothing."""
    a = vm("tap-a", 5, ALL)
    nft.guard("nvbr0", a)
    before = snapshot(backend)
    # forward_addrs (to another address) clashes; forward_ports, the last message, holds
    # the same guest port and is no change: it succeeds.
    b = vm("tap-b", 6, GuestPolicy.of(isolated=True, port_forwards=("8080:80",)))
    with pytest.raises(ConflictError):
        nft.guard("nvbr0", b)
    assert snapshot(backend) == before
    assert nft.record("nvbr0", "tap-b") is None


# A port forward must not take a host port a service listens on ---------------------------


@contextlib.contextmanager
def listener(backend: Backend, protocol: str, address: str, port: int) -> Iterator[None]:
    """A host service on `address:port` (a socket in the backend's namespace, or the
    fake's record of one)."""
    if isinstance(backend, FakeBackend):
        if address.startswith("127."):
            yield  # the fake models only services reachable from outside
            return
        backend.state.nftables.listening.add((protocol, port))
        yield
        backend.state.nftables.listening.discard((protocol, port))
        return
    assert isinstance(backend, KernelBackend)
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM

    def bound() -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind)
        sock.bind((address, port))
        if protocol == "tcp":
            sock.listen()
        return sock

    sock = run_in_netns(backend.netns, bound)
    try:
        yield
    finally:
        sock.close()


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_a_forward_of_a_port_a_host_service_uses_is_refused(
    backend: Backend, nft: NftablesFirewall, protocol: str
) -> None:
    before = snapshot(backend)
    forward = GuestPolicy.of(port_forwards=(f"2222:22/{protocol}",))
    with listener(backend, protocol, "0.0.0.0", 2222):
        for fresh in (True, False):
            with pytest.raises(ConflictError, match=f"0.0.0.0:2222/{protocol}"):
                nft.guard("nvbr0", vm("tap-a", 5, forward), fresh=fresh)
            assert snapshot(backend) == before
    nft.guard("nvbr0", vm("tap-a", 5, forward), fresh=True)
    assert nft.record("nvbr0", "tap-a") == vm("tap-a", 5, forward), "free again: forwarded"


def test_a_loopback_service_or_a_forward_held_already_is_no_conflict(
    nft: NftablesFirewall, backend: Backend
) -> None:
    forward = GuestPolicy.of(port_forwards=("2222:22",))
    with listener(backend, "tcp", "127.0.0.1", 2222):
        nft.guard("nvbr0", vm("tap-a", 5, forward), fresh=True)
    with listener(backend, "tcp", "0.0.0.0", 2222):
        # A service that came later is not the VM's to break: attaching again keeps it.
        nft.guard("nvbr0", vm("tap-a", 5, dataclasses.replace(forward, isolated=True)))
    assert nft.record("nvbr0", "tap-a") == vm(
        "tap-a", 5, dataclasses.replace(forward, isolated=True)
    )


def test_ensure_drops_the_egress_map_of_the_earlier_layout(
    backend: Backend, nft: NftablesFirewall
) -> None:
    table = "netvm-nvbr0"
    legacy = {"family": "inet", "table": table, "name": "egress", "type": "ipv4_addr"}
    nft._run([{"add": {"map": {**legacy, "map": "verdict"}}}], "test", None)
    assert nft.check(POLICY) != []
    assert nft.ensure(POLICY) is True
    assert nft.check(POLICY) == []
    assert not [item for item in nft.ruleset() if "map" in item and item["map"]["name"] == "egress"]
    nft.guard("nvbr0", vm("tap-a", 5, ALL))
    assert nft.record("nvbr0", "tap-a") == vm("tap-a", 5, ALL)


def test_vms_of_one_egress_policy_share_one_dispatch_rule(nft: NftablesFirewall) -> None:
    lists = GuestPolicy.of(egress_deny=("198.51.100.0/24",))
    for n in range(3):
        nft.guard("nvbr0", vm(f"tap-{n}", 10 + n, lists), fresh=True)
    rules = [
        item["rule"]
        for item in nft.ruleset()
        if item.get("rule", {}).get("chain") == "egress_dispatch"
    ]
    assert len(rules) == 1
    for n in range(3):
        nft.unguard("nvbr0", [f"tap-{n}"])
    nft.prune("nvbr0", live=())
    rules = [
        item for item in nft.ruleset() if item.get("rule", {}).get("chain") == "egress_dispatch"
    ]
    assert rules == []


def test_prune_removes_inet_elements_whose_records_are_gone(
    backend: Backend, nft: NftablesFirewall
) -> None:
    """A foreign `nft delete table bridge netvm-B` takes the records; the forward and the
    egress member of a VM stay in the inet table. gc's prune removes them: the next VM
    with that address must not get the old one's forwarded connections."""
    x = vm("tap-x", 5, GuestPolicy.of(egress_deny=("198.51.100.0/24",), port_forwards=("8080:80",)))
    kept = vm(
        "tap-k", 6, GuestPolicy.of(egress_deny=("198.51.100.0/24",), port_forwards=("9090:90",))
    )
    nft.guard("nvbr0", x)
    assert len(nft._inet_elements("nvbr0")) == 4  # forward addr, port, owner; egress member
    nft._run([{"delete": {"table": {"family": "bridge", "name": "netvm-nvbr0"}}}], "test", None)
    nft.ensure(POLICY)
    nft.guard("nvbr0", kept)  # a VM attached since, whose elements must stay
    assert nft.unguard("nvbr0", ["tap-x"]) == {}, "no record names them"
    assert len(nft._inet_elements("nvbr0")) == 8
    assert nft.prune("nvbr0", live=["tap-k"]) == []
    assert sorted(e.schema.name for e in nft._inet_elements("nvbr0")) == sorted(
        e.schema.name for e in elements(kept) if e.schema.family == "inet"
    )
    assert nft.record("nvbr0", "tap-k") == kept


def test_unguard_leaves_a_forward_key_another_vm_holds_now(nft: NftablesFirewall) -> None:
    """A's forward was deleted by hand and its host port given to B since: removing A's
    guarantees must not take B's forward (a destroy goes by the key alone; the forward's
    guest port is the same, so only its address tells whose it is)."""
    forward = GuestPolicy.of(port_forwards=("8080:80",))
    a, b = vm("tap-a", 5, forward), vm("tap-b", 6, forward)
    nft.guard("nvbr0", a)
    mine = [e for e in elements(a) if e.schema.data is not None]
    assert len(mine) == 2
    nft._store().commit([("delete", e) for e in mine], "netvm-nvbr0", "take", "tap-a")
    nft.guard("nvbr0", b)
    assert nft.unguard("nvbr0", ["tap-a"]) == {"tap-a": a}
    theirs = {_key(e) for e in elements(b) if e.schema.family == "inet"}
    assert {_key(e) for e in nft._inet_elements("nvbr0")} == theirs
    assert nft.record("nvbr0", "tap-b") == b


def _key(element: Any) -> tuple[object, ...]:
    return (element.schema.name, element.key, element.data)


def test_prune_of_gone_taps_finds_nothing_stranded(
    nft: NftablesFirewall, caplog: pytest.LogCaptureFixture
) -> None:
    """The elements of the TAPs prune removes are theirs, not elements without a record:
    no warning, and the live VM keeps everything."""
    lists = GuestPolicy.of(
        isolated=True, egress_deny=("198.51.100.0/24",), port_forwards=("81:80",)
    )
    gone, kept = vm("tap-g", 5, lists), vm("tap-k", 6, GuestPolicy.of(isolated=True))
    nft.guard("nvbr0", gone)
    nft.guard("nvbr0", kept)
    with caplog.at_level("WARNING", logger="netvm"):
        assert nft.prune("nvbr0", live=["tap-k"]) == ["tap-g"]
    assert "no VM's record names" not in caplog.text
    assert nft.guards("nvbr0") == {"tap-k": kept}
    assert {_key(e) for e in nft._inet_elements("nvbr0")} == {
        _key(e) for e in elements(kept) if e.schema.family == "inet"
    }
