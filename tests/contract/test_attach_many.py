"""attach_many and the batched primitives it uses, on the fake and on the kernel."""

from __future__ import annotations

import errno

import pytest

from netvm import ConflictError, HostError, NetworkManager, TapOptions, naming
from netvm.backends.base import Backend, LinkSetting
from netvm.errors import DeviceExists, NotFound, host_error
from netvm.policy import OPEN


def test_create_taps_makes_each_and_reports_each_failure(backend: Backend) -> None:
    backend.create_tap("tapb1", TapOptions())
    failed = backend.create_taps(["tapb0", "tapb1", "tapb2", "x" * 16], TapOptions(owner=0))
    assert set(failed) == {"tapb1", "x" * 16}
    assert isinstance(failed["tapb1"], DeviceExists)
    assert failed["tapb1"].errno == errno.EBUSY
    assert failed["x" * 16].errno == errno.ERANGE
    for name in ("tapb0", "tapb2"):
        link = backend.get_link(name)
        assert link is not None
        assert link.kind == "tun"
        assert link.tap is not None
        assert link.tap.owner == 0


def test_set_links_applies_each_and_reports_each_failure(backend: Backend) -> None:
    backend.create_bridge("brb0", 1500)
    bridge = backend.get_link("brb0")
    assert bridge is not None
    names = [f"tapl{i}" for i in range(70)]  # more than one datagram of requests
    assert backend.create_taps(names, TapOptions()) == {}
    changes = [LinkSetting(n, master=bridge.index, mtu=1400, up=True, alias=n) for n in names]
    changes.insert(5, LinkSetting("gone0", up=True))
    changes.insert(0, LinkSetting("tapl1", master=999999))  # fails; the next one for it not
    failed = backend.set_links(changes)
    assert set(failed) == {"gone0", "tapl1"}
    assert failed["gone0"].errno == errno.ENODEV
    assert failed["tapl1"].errno == errno.EINVAL
    for name in names:
        link = backend.get_link(name)
        assert link is not None
        # tapl1's second request failed; its first one (before it) took effect
        assert (link.master, link.mtu, link.up, link.alias) == (bridge.index, 1400, True, name)


def test_attach_many_attaches_each_like_attach(manager: NetworkManager) -> None:
    manager.ensure_host()
    before = manager.attach("vm-0")
    result = manager.attach_many(["vm-1", "vm-0", "vm-2", "vm-1"])
    assert result.ok
    assert list(result.networks) == ["vm-1", "vm-0", "vm-2"]
    assert result.networks["vm-0"] == before
    listed = {a.vm_id: a for a in manager.list()}
    assert set(listed) == {"vm-0", "vm-1", "vm-2"}
    for vm_id, network in result.networks.items():
        assert listed[vm_id].on_bridge
        assert listed[vm_id].network == network
    # Again: the same networks, nothing new.
    assert manager.attach_many(["vm-2", "vm-1"]).networks == {
        "vm-2": result.networks["vm-2"],
        "vm-1": result.networks["vm-1"],
    }
    assert len(manager.leases.all()) == 3


def test_attach_many_without_a_bridge_raises_and_leaves_nothing(
    manager: NetworkManager,
) -> None:
    with pytest.raises(NotFound, match="ensure_host"):
        manager.attach_many(["vm-1", "vm-2"], policy=OPEN)
    assert manager.leases.all() == []
    assert [link.kind for link in manager.backend.list_links()] == [None]


def _tuns(backend: Backend) -> set[str]:
    return {link.name for link in backend.list_links() if link.kind == "tun"}


def test_a_failure_in_the_middle_fails_that_vm_only(manager: NetworkManager) -> None:
    manager.ensure_host()
    backend = manager.backend
    ids = [f"vm-{i}" for i in range(6)]
    # vm-1: its name is taken by someone else's device; vm-3: the kernel refuses its
    # enslave; vm-4: its TAP cannot be made.
    backend.create_bridge(naming.tap_name("vm-1"), 1500)
    real_set_links, real_create_taps = backend.set_links, backend.create_taps
    refused = host_error("set link", naming.tap_name("vm-3"), errno.EXFULL, "injected")
    broken = host_error("create tap", naming.tap_name("vm-4"), errno.EIO, "injected")

    def set_links(changes: list[LinkSetting]) -> dict[str, HostError]:
        tap = naming.tap_name("vm-3")
        failed = real_set_links([c for c in changes if c.name != tap])
        return {**failed, tap: refused} if any(c.name == tap for c in changes) else failed

    def create_taps(names: list[str], options: TapOptions) -> dict[str, HostError]:
        tap = naming.tap_name("vm-4")
        failed = real_create_taps([n for n in names if n != tap], options)
        return {**failed, tap: broken} if tap in names else failed

    backend.set_links = set_links  # type: ignore[assignment, method-assign]
    backend.create_taps = create_taps  # type: ignore[assignment, method-assign]
    try:
        result = manager.attach_many(ids, policy=OPEN)
    finally:
        backend.set_links = real_set_links  # type: ignore[method-assign]
        backend.create_taps = real_create_taps  # type: ignore[method-assign]
    assert list(result.networks) == ["vm-0", "vm-2", "vm-5"]
    assert isinstance(result.errors["vm-1"], ConflictError)
    assert result.errors["vm-3"] is refused
    assert result.errors["vm-4"] is broken
    with pytest.raises(ConflictError):
        result.raise_first()
    assert {lease.vm_id for lease in manager.leases.all()} == {"vm-0", "vm-2", "vm-5"}
    assert _tuns(backend) == {naming.tap_name(v) for v in ("vm-0", "vm-2", "vm-5")}
    assert {a.vm_id for a in manager.list() if a.on_bridge} == {"vm-0", "vm-2", "vm-5"}
    with manager.leases.transaction() as tx:
        assert tx.intent is None
    # The failed ones attach once the cause is gone.
    assert set(manager.attach_many(["vm-3", "vm-4"], policy=OPEN).networks) == {"vm-3", "vm-4"}


def test_a_full_subnet_fails_the_vms_beyond_it(manager: NetworkManager) -> None:
    manager.ensure_host()
    ids = [f"vm-{i}" for i in range(260)]
    result = manager.attach_many(ids, policy=OPEN)
    assert len(result.networks) == 253
    assert len(result.errors) == 7
    assert len({n.guest_ip for n in result.networks.values()}) == 253
    assert len(_tuns(manager.backend)) == 253
