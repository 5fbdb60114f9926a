"""Detach: a VM's TAP retired at once, deleted off the caller's path (docs/design.md).

Under the lease lock, one request by ifindex takes each TAP down, renames it away (its VM's
name is free at once), marks it `netvm-detaching:<bridge>:<vm_id>` and moves it into the
reaper's link group; its guarantees are removed and its lease freed. The manager's reaper
(netvm/reaper.py) deletes each group in one request, so the kernel's RCU wait is paid once
per batch. What a detach cut short leaves is finished or undone by `recover_retired`, and
what a dead process's reaper left is deleted by `sweep`.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from typing import TYPE_CHECKING, Any

from netvm import naming
from netvm.backends.base import NO_MASTER, Link, LinkChange
from netvm.errors import NetvmError, StateStoreError, host_error
from netvm.leases import LeaseTransaction
from netvm.reconcile import netvm_taps

if TYPE_CHECKING:
    from netvm.firewall.guard import VmGuard
    from netvm.manager import NetworkManager

log = logging.getLogger("netvm")

DETACH_CHUNK = 128
"""TAPs one detach intent names (the intent page holds 4 KiB); detach_many commits per chunk."""


def detach(manager: NetworkManager, vm_ids: list[str]) -> None:
    manager._check_owner()  # another subnet's or lease store's bridge: hands off
    group = manager._reaper.begin()
    moved = [0]
    unguarded: list[VmGuard] = []
    try:
        with manager._changing() as tx:
            retire_vms(manager, tx, vm_ids, group, moved, unguarded)
    except BaseException:
        # _changing put the TAPs back as they were: their guarantees follow.
        for guard in unguarded:
            try:
                manager.backend.firewall("nftables").guard(manager.config.bridge_name, guard)
            except NetvmError as exc:
                log.error("rollback: guarantees of %s not restored: %s", guard.tap, exc)
        raise
    finally:
        # After the commit, or after _changing undid what the intent names.
        manager._reaper.end(group, moved[0])


def retire_vms(
    manager: NetworkManager,
    tx: LeaseTransaction,
    vm_ids: list[str],
    group: int,
    moved: list[int],
    unguarded: list[VmGuard],
) -> None:
    bridge = manager.config.bridge_name
    names = {naming.tap_name(vm_id): vm_id for vm_id in vm_ids}
    if len(names) == 1:
        (name,) = names
        link = manager.backend.get_link(name)
        links = {} if link is None else {name: link}
    else:
        links = manager.backend.get_links(list(names))
    if {link.master for link in links.values() if link.master} - {manager._bridge_index}:
        manager._check_owner(again=True)  # the bridge was made again since it was checked
    doomed: list[tuple[Link, str]] = []
    for name, link in list(links.items()):
        vm_id = names[name]
        if naming.retired_vm_id(link.alias) == vm_id and link.kind == "tun":
            if link.alias != naming.detaching_alias(bridge, vm_id):
                del links[name]  # retired by another bridge's detach, whose reaper has it
                continue
        else:
            manager._check_tap(link, vm_id)  # a foreign device: ConflictError, no change
        doomed.append((link, vm_id))
    for first in range(0, len(doomed), DETACH_CHUNK):
        part = doomed[first : first + DETACH_CHUNK]
        if first:
            tx.restart()  # the chunks before are done: no rollback undoes them
            unguarded.clear()
        tx.intend(
            {
                "op": "detach",
                "group": group,
                "taps": [link.index for link, _ in part],
                "isolated": [link.index for link, _ in part if link.isolated],
            }
        )
        moved[0] += len(part)  # from here on the group may hold them
        retire(manager, part, group)
        manager._unguard_into([link.name for link, _ in part], unguarded)
        for _, vm_id in part:
            tx.release(vm_id)
    gone = {name: vm_id for name, vm_id in names.items() if name not in links}
    manager._unguard_into(list(gone), unguarded)
    for vm_id in gone.values():
        tx.release(vm_id)


def retire(manager: NetworkManager, doomed: list[tuple[Link, str]], group: int) -> None:
    """Down, renamed away, marked and in `group` (off the bridge too where the bridge
    can fill up), in pipelined requests.

    The rename frees the VM's name at once: an attach of the VM makes its new TAP
    without meeting the old one, which the reaper may delete at any moment.
    """
    bridge = manager.config.bridge_name
    release = NO_MASTER if manager._release_ports else None
    changes = [
        LinkChange(
            link.index,
            name=naming.detached_name(link.index),
            up=False,
            master=release,
            alias=naming.detaching_alias(bridge, vm_id),
            group=group,
        )
        for link, vm_id in doomed
    ]
    failed = manager.backend.change_links(changes)
    for change, code in failed:
        if code not in (errno.ENODEV, errno.EEXIST, errno.EBUSY):
            raise host_error("detach", f"TAP with ifindex {change.index}", code)
    retry = [change for change, code in failed if code != errno.ENODEV]
    if not retry:
        return
    # The name is taken, or the kernel (< 6.2) renames no device that is up: all else
    # first, then the name alone. A TAP that cannot be renamed keeps its VM's name
    # until deleted (an attach of the VM meanwhile renames or deletes it first).
    unnamed = [dataclasses.replace(change, name=None) for change in retry]
    for change, code in manager.backend.change_links(unnamed):
        if code != errno.ENODEV:  # gone meanwhile: nothing to delete
            raise host_error("detach", f"TAP with ifindex {change.index}", code)
    renames = [LinkChange(change.index, name=change.name) for change in retry]
    for change, code in manager.backend.change_links(renames):
        log.info("detached TAP %d keeps its name: %s", change.index, errno.errorcode[code])


def recover_retired(
    manager: NetworkManager, intent: dict[str, Any], tx: LeaseTransaction, crashed: bool
) -> None:
    """A detach (intent: its group and TAPs) was cut short. A TAP whose lease is gone
    (its detach committed) is deleted with the group. One whose lease is still held is
    put back as it was if the detach failed in this process (which restores its
    guarantees too), and its detach is finished if its process died (it wanted the VM
    gone, and what it had of the guarantees went with it)."""
    level = logging.WARNING if crashed else logging.DEBUG
    group = intent["group"]
    taps = {index for index in intent.get("taps", []) if isinstance(index, int)}
    isolated = set(intent.get("isolated", []))
    bridge = manager.config.bridge_name
    master = manager._bridge_or_none()
    finished = False
    for link in manager.backend.list_links():
        if link.index not in taps or link.kind != "tun":
            continue
        vm_id = naming.detaching_vm_id(link.alias, bridge)
        if vm_id is None:
            continue  # never marked: the detach did not reach it
        lease = tx.get(vm_id)
        if lease is None:
            finished = True
            continue
        if crashed:
            log.log(level, "finishing the detach of %r (TAP %s)", vm_id, link.name)
            manager._unguard_quietly(link.name)
            tx.release(vm_id)
            finished = True
            continue
        log.log(level, "restoring TAP %s of %r: its detach did not complete", link.name, vm_id)
        name = naming.tap_name(vm_id)
        restore = LinkChange(
            link.index,
            name=name if link.name != name else None,
            up=True,
            master=master if link.master != master else None,
            alias=naming.tap_alias(bridge, vm_id, lease.slot),
            group=manager.port_group,
        )
        failed = manager.backend.change_links([restore])
        if failed:
            log.error("TAP %s of %r could not be restored: %s", link.name, vm_id, failed[0][1])
            finished = True
        elif link.index in isolated and master is not None:
            manager.backend.set_port_isolated(name, True)
    if finished:
        manager._reaper.doom(group)


def sweep(manager: NetworkManager) -> None:
    """(On the reaper's thread.) Delete the TAPs of this bridge that detaches marked and
    no live reaper has deleted: those of processes that died. Under the lease lock, so
    that no detach is half-way; TAPs of live reapers may go too, which is harmless."""
    try:
        with manager.leases.transaction():
            taps = netvm_taps(manager.backend, manager.config.bridge_name)
            marked = [tap.link for tap in taps if tap.detaching]
            firewall = manager._elements()
            if firewall is not None:  # the guarantees of TAPs gone or going
                live = [tap.link.name for tap in taps if not tap.detaching]
                firewall.prune(manager.config.bridge_name, live)
            # TAPs an older netvm attached are in the default group: into the port group,
            # where the bridge's input rule drops their link-local frames (guard_rules.py).
            older = [t.link for t in taps if not t.detaching and t.link.group == 0]
            if older:
                regroup = [LinkChange(t.index, group=manager.port_group) for t in older]
                for change, code in manager.backend.change_links(regroup):
                    if code != errno.ENODEV:  # ENODEV: gone meanwhile
                        log.warning("TAP %d not put in its port group: %d", change.index, code)
            if not marked:
                return
            group = manager._reaper.begin()
            try:
                manager.backend.change_links([LinkChange(t.index, group=group) for t in marked])
            finally:
                manager._reaper.end(group, len(marked))
            log.warning("deleting %d TAP(s) whose detach did not finish", len(marked))
    except StateStoreError as exc:
        log.warning("sweep skipped (gc works from the kernel alone): %s", exc)
