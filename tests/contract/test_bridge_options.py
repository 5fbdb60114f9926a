"""netvm's bridge: link-local frames through its hooks, and a creation told apart from a
bridge made by hand (netvm/host.py), on the fake and on the kernel."""

from __future__ import annotations

import pytest

from netvm import ConflictError, NetworkConfig, NetworkManager
from netvm.backends.base import BridgeOptions, LinkChange
from netvm.host import CREATING_GROUPS, FDB_MAX_LEARNED, LINK_LOCAL_TO_HOOKS
from netvm.naming import parse_bridge_alias

NETVM_OPTIONS = BridgeOptions(
    LINK_LOCAL_TO_HOOKS, no_linklocal_learn=True, fdb_max_learned=FDB_MAX_LEARNED
)
CREATING = CREATING_GROUPS[0] + 7


def bridge_options(manager: NetworkManager) -> BridgeOptions | None:
    link = manager.backend.get_link("nvbr0")
    assert link is not None
    return link.bridge


def test_ensure_host_sends_lldps_address_through_the_hooks_and_learns_nothing_from_it(
    manager: NetworkManager,
) -> None:
    manager.ensure_host()
    assert bridge_options(manager) == NETVM_OPTIONS


def test_ensure_host_mends_the_options_and_keeps_what_an_admin_added(
    manager: NetworkManager,
) -> None:
    manager.ensure_host()
    eapol = 1 << 3  # the admin forwards 802.1X too
    manager.backend.set_bridge_options("nvbr0", BridgeOptions(eapol, False, stp=True))
    manager.ensure_host()
    kept = BridgeOptions(eapol | LINK_LOCAL_TO_HOOKS, True, fdb_max_learned=FDB_MAX_LEARNED)
    assert bridge_options(manager) == kept
    manager.ensure_host()  # nothing left to change
    assert bridge_options(manager) == kept


def test_the_kernel_refuses_to_forward_stp_pause_and_lacp_addresses(
    manager: NetworkManager,
) -> None:
    from netvm import HostError

    manager.ensure_host()
    for bit in (0, 1, 2):
        with pytest.raises(HostError) as refused:
            manager.backend.set_bridge_options("nvbr0", BridgeOptions(1 << bit))
        assert refused.value.errno == 22
    assert bridge_options(manager) == NETVM_OPTIONS


def _cut_short(manager: NetworkManager, bridge_group: int) -> None:
    """What a crash between the bridge's two requests leaves: the intent (naming group
    CREATING) and an unmarked bridge, in that group; or in the default group, as one made
    by hand after the crash would be."""
    manager.host.file.acquire()
    try:
        manager.host.file.write_intent(
            {"op": "create-bridge", "bridge": "nvbr0", "group": CREATING}
        )
    finally:
        manager.host.file.release()
    manager.backend.create_bridge("nvbr0", 1500)
    link = manager.backend.get_link("nvbr0")
    assert link is not None
    if bridge_group:
        assert not manager.backend.change_links([LinkChange(link.index, group=bridge_group)])


def test_a_bridge_left_by_a_cut_short_creation_is_removed_and_made_again(
    manager: NetworkManager,
) -> None:
    _cut_short(manager, CREATING)
    before = manager.backend.get_link("nvbr0")
    manager.ensure_host()
    after = manager.backend.get_link("nvbr0")
    assert before is not None
    assert after is not None
    assert after.index != before.index
    assert parse_bridge_alias(after.alias) is not None
    assert after.group == 0


def test_a_bridge_made_by_hand_after_a_cut_short_creation_is_not_deleted(
    manager: NetworkManager,
) -> None:
    """The intent names the bridge's name, but the bridge of that name now is someone
    else's (made after the crash, in the default group): netvm must leave it."""
    _cut_short(manager, 0)
    before = manager.backend.get_link("nvbr0")
    with pytest.raises(ConflictError, match="netvm did not create it"):
        manager.ensure_host()
    after = manager.backend.get_link("nvbr0")
    assert before is not None
    assert after is not None
    assert after.index == before.index


def accept_ra(manager: NetworkManager) -> int | None:
    link = manager.backend.get_link("nvbr0")
    assert link is not None
    return link.accept_ra


def test_ensure_host_makes_the_host_take_no_router_advertisement_on_the_bridge(
    manager: NetworkManager,
) -> None:
    manager.ensure_host()
    assert accept_ra(manager) == 0


@pytest.mark.parametrize("admin", [1, 2])
def test_ensure_host_mends_accept_ra(manager: NetworkManager, admin: int) -> None:
    manager.ensure_host()
    manager.backend.set_accept_ra("nvbr0", admin)
    assert accept_ra(manager) == admin
    manager.ensure_host()
    assert accept_ra(manager) == 0


def test_accept_ra_of_a_missing_device_is_enoent(manager: NetworkManager) -> None:
    from netvm import HostError

    with pytest.raises(HostError) as refused:
        manager.backend.set_accept_ra("nvbr0", 0)
    assert refused.value.errno == 2


def test_a_host_without_ipv6_needs_no_accept_ra(config: NetworkConfig) -> None:
    """A kernel booted with ipv6.disable=1 has no net.ipv6.conf: nothing to switch off."""
    from netvm.backends.fake import FakeBackend, FakeState

    with NetworkManager(config, FakeBackend(FakeState(ipv6=False))) as manager:
        manager.ensure_host()
        assert accept_ra(manager) is None


@pytest.mark.parametrize(("admin", "after"), [(0, FDB_MAX_LEARNED), (100, 100)])
def test_ensure_host_caps_the_fdb_and_keeps_an_administrators_cap(
    manager: NetworkManager, admin: int, after: int
) -> None:
    """No cap (0, the kernel's default) gets netvm's; an administrator's stays."""
    manager.ensure_host()
    manager.backend.set_bridge_options(
        "nvbr0", BridgeOptions(LINK_LOCAL_TO_HOOKS, True, fdb_max_learned=admin)
    )
    manager.ensure_host()
    options = bridge_options(manager)
    assert options is not None
    assert options.fdb_max_learned == after


def test_a_kernel_without_the_fdb_cap_gets_the_other_options(config: NetworkConfig) -> None:
    """Before Linux 6.8 the bridge has no such cap: nothing to set, nothing to mend."""
    from netvm.backends.fake import FakeBackend, FakeState

    with NetworkManager(config, FakeBackend(FakeState(fdb_cap=False))) as manager:
        manager.ensure_host()
        manager.ensure_host()
        options = bridge_options(manager)
        assert options == BridgeOptions(LINK_LOCAL_TO_HOOKS, True, fdb_max_learned=None)
