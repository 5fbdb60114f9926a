"""attach_many: a boot storm's attaches in one lease transaction, the kernel work batched.

Per VM, the result is the same as attach's; what changes is how the work is grouped. The
new VMs are leased in one transaction, then their TAPs are made with the TUN ioctls back to
back, each is given its guarantees (one nftables transaction per VM: netvm/firewall), and
one pipelined run of RTM_NEWLINK requests (all sent, then all acks read) puts them on the
bridge. The lease lock is held throughout, so the storm is not interleaved with single
attaches (they wait for it).

Partial success. Each VM succeeds or fails on its own: a vm_id whose lease, TAP,
guarantees or enslave fails is undone (its TAP deleted, its lease freed) and its error is
returned in `AttachManyResult.errors`; the others stay attached. A failure that concerns
them all (no bridge, an unusable lease store) raises and leaves nothing of this call.

Crash safety. The VMs are handled in groups whose intent (their vm_ids and slots) fits the
lock file's intent page; a group's leases are committed once its kernel work is complete.
A SIGKILL in the middle of a group leaves its leases uncommitted and its intent in the lock
file; the next transaction removes each TAP of the intent that is not complete, as for a
single attach (NetworkManager._recover).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from netvm import naming
from netvm.backends.base import LinkSetting, TapOptions
from netvm.errors import ConfigError, DeviceExists, NetvmError
from netvm.leases import LeaseTransaction
from netvm.naming import VmNetwork
from netvm.policy import GuestPolicy
from netvm.statefile import PAGE

if TYPE_CHECKING:
    from netvm.manager import NetworkManager

log = logging.getLogger("netvm")
INTENT_BYTES = PAGE - 256
"""A group's intent stays under this size (the intent page holds a little more)."""


def check_attach_args(tap: object, policy: object) -> None:
    """attach's and attach_many's `tap` and `policy`, by type (their fields check themselves)."""
    if tap is not None and not isinstance(tap, TapOptions):
        raise ConfigError("tap", tap, "a netvm.TapOptions or None")
    if policy is not None and not isinstance(policy, GuestPolicy):
        raise ConfigError("policy", policy, "a netvm.GuestPolicy or None")


@dataclass(frozen=True)
class AttachManyResult:
    """What attach_many did, per VM, in the order the vm_ids were given."""

    networks: dict[str, VmNetwork] = field(default_factory=dict)
    """The VMs attached (new ones and those attached already)."""
    errors: dict[str, NetvmError] = field(default_factory=dict)
    """The VMs not attached, and why; nothing of them was left behind."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_first(self) -> None:
        """Raise the first VM's error, if any (for callers that want all or nothing)."""
        for error in self.errors.values():
            raise error


def groups(vm_ids: list[str]) -> Iterator[list[str]]:
    """The vm_ids in groups whose intent fits the intent page."""
    group: list[str] = []
    size = 64
    for vm_id in vm_ids:
        entry = len(json.dumps(vm_id)) + 12  # [vm_id, slot], a comma
        if group and size + entry > INTENT_BYTES:
            yield group
            group, size = [], 64
        group.append(vm_id)
        size += entry
    if group:
        yield group


def attach_many(
    manager: NetworkManager,
    vm_ids: Iterable[str],
    tap: TapOptions | None,
    policy: GuestPolicy | None,
) -> AttachManyResult:
    ids = list(dict.fromkeys(naming.validate_vm_ids("vm_ids", vm_ids)))
    check_attach_args(tap, policy)
    options = tap if tap is not None else TapOptions()
    chosen = manager._policy(policy)
    manager._check_owner()  # another store's bridge: refused before this store is made
    result = AttachManyResult()
    for group in groups(ids):
        with manager._changing() as tx:
            _attach_group(manager, tx, group, options, chosen, result, policy)
    ordered = AttachManyResult(
        {v: result.networks[v] for v in ids if v in result.networks},
        {v: result.errors[v] for v in ids if v in result.errors},
    )
    return ordered


def _attach_group(
    manager: NetworkManager,
    tx: LeaseTransaction,
    group: list[str],
    options: TapOptions,
    policy: GuestPolicy,
    result: AttachManyResult,
    requested: GuestPolicy | None,
) -> None:
    """`policy` for the new VMs; `requested` (None: each keeps its own) for those leased
    already, as attach."""
    bridge = manager._bridge()  # no bridge: nothing of the group is begun
    fresh: dict[str, VmNetwork] = {}
    slots: dict[str, int] = {}
    again: dict[str, bool] = {}
    """VMs judged one by one after the group (as attach judges them): whether new."""
    for vm_id in group:
        try:
            lease, new = tx.acquire(vm_id)
        except NetvmError as exc:
            result.errors[vm_id] = exc
            continue
        slots[vm_id] = lease.slot
        if new:
            tx.set_policy(vm_id, policy.describe())  # one leased already: in _attach_one
            fresh[vm_id] = VmNetwork.for_slot(vm_id, manager.config.vm_subnet, lease.slot)
        else:
            again[vm_id] = False
    for vm_id, network in list(fresh.items()):
        if tx.take_stale(slots[vm_id]):  # the address was another VM's: its connections go
            try:
                manager.backend.forget_connections(network.guest_ip)
            except NetvmError as exc:
                result.errors[vm_id] = exc
                del fresh[vm_id]
                tx.release(vm_id)  # marks the slot stale again
    tx.intend(_intent(fresh, slots))
    failed = manager.backend.create_taps([n.tap_name for n in fresh.values()], options)
    made: dict[str, VmNetwork] = {}
    for vm_id, network in fresh.items():
        error = failed.get(network.tap_name)
        if isinstance(error, DeviceExists):
            again[vm_id] = True
        elif error is not None:
            result.errors[vm_id] = error
        else:
            made[vm_id] = network
    if len(made) < len(fresh):
        # A TAP that existed is not this call's: a crash must not delete it.
        tx.intend(_intent(made, slots))
    for vm_id, network in list(made.items()):
        try:
            manager._guard(network, policy, fresh=True)
            manager._forget_claim(network, policy)
        except NetvmError as exc:
            result.errors[vm_id] = exc
    changes = [
        LinkSetting(
            network.tap_name,
            master=bridge,
            mtu=manager.config.mtu,
            up=True,
            alias=naming.tap_alias(manager.config.bridge_name, vm_id, slots[vm_id]),
            isolated=True if policy.isolated else None,
            group=manager.port_group,
        )
        for vm_id, network in made.items()
        if vm_id not in result.errors
    ]
    refused = manager.backend.set_links(changes)
    for vm_id, network in made.items():
        if network.tap_name in refused:
            result.errors[vm_id] = refused[network.tap_name]
    _undo(manager, tx, [v for v in fresh if v in result.errors], made)
    for vm_id, network in made.items():
        if vm_id not in result.errors:
            result.networks[vm_id] = network
    tx.restart()  # the group's leases are durable; its intent is done
    tx.clear_intent()
    for vm_id, new in again.items():
        _attach_one(manager, tx, vm_id, new, options, requested, result)


def _intent(networks: dict[str, VmNetwork], slots: dict[str, int]) -> dict[str, Any]:
    return {"op": "attach-many", "vms": [[vm_id, slots[vm_id]] for vm_id in networks]}


def _undo(
    manager: NetworkManager,
    tx: LeaseTransaction,
    failed: list[str],
    made: dict[str, VmNetwork],
) -> None:
    """Remove what the group made for the VMs that failed, and free their leases."""
    taps = [made[v].tap_name for v in failed if v in made]
    manager.backend.delete_links(taps)
    for tap in taps:
        manager._unguard_quietly(tap)
    for vm_id in failed:
        tx.release(vm_id)


def _attach_one(
    manager: NetworkManager,
    tx: LeaseTransaction,
    vm_id: str,
    new: bool,
    options: TapOptions,
    policy: GuestPolicy | None,
    result: AttachManyResult,
) -> None:
    """attach's own checks for a VM leased already or whose TAP's name is taken, inside
    the group's transaction; its failure is undone as attach undoes one (`new`: its lease
    is this call's)."""
    before = None if new else tx.get(vm_id)
    kept = None if new else tx.policy(vm_id)
    try:
        result.networks[vm_id] = manager._attach(tx, vm_id, options, policy)
    except NetvmError as exc:
        result.errors[vm_id] = exc
        intent: dict[str, Any] | None = tx.intent
        if intent is not None:
            try:
                manager._recover(intent, tx, crashed=False)
            except NetvmError as mend:
                log.error("rollback: %s (the next call retries)", mend)
        if before is None:
            tx.release(vm_id)
        else:
            if (lease := tx.get(vm_id)) is None or lease.slot != before.slot:
                tx.release(vm_id)
                tx.claim(vm_id, before.slot)
            if kept is not None:  # the VM runs on with the guarantees it had
                tx.set_policy(vm_id, kept)
            else:  # attached before policies were remembered: what it has is not known
                tx.forget_policy(vm_id)
    tx.restart()
    tx.clear_intent()
