"""The kernel as the truth: netvm's TAPs as the kernel holds them, and leases rebuilt from them.

Every TAP netvm attaches records its bridge, address slot and vm_id in its ifalias
(naming.tap_alias), and its name is the hash of the vm_id, so the kernel alone says which
TAPs are netvm's, whose they are and which address each VM was given. The lease store is a
cache of that: when it is lost or damaged, `rebuild` puts back what the kernel says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from netvm import naming
from netvm.backends.base import Backend, Link
from netvm.errors import SubnetExhausted
from netvm.leases import LeaseTransaction

log = logging.getLogger("netvm")


@dataclass(frozen=True)
class KernelTap:
    """A TAP netvm made for one bridge: attached (with its mark) or being detached."""

    link: Link
    mark: naming.TapMark | None
    """None for a TAP that a detach marked and has not deleted yet."""

    @property
    def detaching(self) -> bool:
        return self.mark is None


def netvm_taps(backend: Backend, bridge: str) -> list[KernelTap]:
    """Every TAP of the namespace that netvm made for `bridge`, on the bridge or not."""
    detaching = naming.detaching_alias(bridge, "")
    found: list[KernelTap] = []
    for link in backend.list_links():
        if link.kind != "tun" or not link.alias:
            continue
        if link.alias.startswith(detaching):
            found.append(KernelTap(link, None))
            continue
        mark = naming.parse_tap_alias(link.alias, bridge, link.name)
        if mark is not None:
            found.append(KernelTap(link, mark))
    return found


def rebuild(tx: LeaseTransaction, taps: list[KernelTap]) -> int:
    """Lease what the kernel's TAPs record; return how many leases were added or moved.

    A TAP's recorded slot wins over the store (the VM behind it uses that address). A TAP
    made before slots were recorded keeps its lease if it has one, else gets one as a new
    VM would (its preferred slot first, the one it most likely had).

    In three passes, so that the order of the TAPs cannot matter (an old copy of the store
    may have every VM on another's slot): first every lease that stands on a slot a TAP
    records for another VM, or that puts a TAP's VM elsewhere, is let go; then each
    recorded slot is leased to its VM; then the VMs let go that have no recording TAP (a
    lease without a TAP, or a TAP from before slots were recorded) get a free slot.
    """
    changed = 0
    marked = sorted((t for t in taps if t.mark is not None), key=lambda t: t.link.index)
    wanted: dict[int, str] = {}
    unrecorded: list[str] = []
    for tap in marked:
        mark = tap.mark
        assert mark is not None
        if mark.slot is None:
            unrecorded.append(mark.vm_id)
        elif wanted.setdefault(mark.slot, mark.vm_id) != mark.vm_id:
            log.error(
                "TAPs of %r and %r both record slot %d: %s is left without a lease",
                wanted[mark.slot],
                mark.vm_id,
                mark.slot,
                tap.link.name,
            )
    recorded = set(wanted.values())
    moved: list[str] = []
    for slot, vm_id in wanted.items():
        lease = tx.get(vm_id)
        if lease is not None and lease.slot == slot:
            continue
        holder = tx.holder(slot)
        if holder is not None and holder != vm_id:
            tx.release(holder, forget_policy=False)  # moved, not gone: its policy stays
            if holder not in recorded:
                moved.append(holder)
        if lease is not None:
            tx.release(vm_id, forget_policy=False)
    for slot, vm_id in wanted.items():
        lease = tx.get(vm_id)
        if lease is not None and lease.slot == slot:
            continue
        if tx.claim(vm_id, slot) is None:
            log.error("slot %d recorded for %r could not be leased to it", slot, vm_id)
            continue
        changed += 1
    for vm_id in [*unrecorded, *moved]:
        if tx.get(vm_id) is not None:
            continue
        try:
            tx.acquire(vm_id)
        except SubnetExhausted:
            # Every address is a recording TAP's: a lease without a TAP cannot stay (a
            # rebuild that fails would stop every call, gc and teardown included).
            log.error("no address left for %r, which has no TAP: its lease is dropped", vm_id)
            tx.forget_policy(vm_id)
            continue
        changed += 1
    if changed:
        log.warning("lease store rebuilt from the kernel: %d lease(s) restored", changed)
    return changed
