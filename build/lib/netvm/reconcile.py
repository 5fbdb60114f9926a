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
    """
    changed = 0
    marked = [t for t in taps if t.mark is not None]
    in_kernel = {t.mark.vm_id for t in marked if t.mark is not None}
    # Recorded slots first, so that an unrecorded one cannot take a slot a VM is using.
    marked.sort(key=lambda t: (t.mark is None or t.mark.slot is None, t.link.index))
    for tap in marked:
        mark = tap.mark
        assert mark is not None
        lease = tx.get(mark.vm_id)
        if mark.slot is None:
            if lease is None:
                tx.acquire(mark.vm_id)
                changed += 1
            continue
        if lease is not None and lease.slot == mark.slot:
            continue
        holder = tx.holder(mark.slot)
        if holder is not None and holder != mark.vm_id and holder not in in_kernel:
            # A lease without a TAP stands on a slot a running VM uses: move the lease.
            tx.release(holder)
            tx.claim(mark.vm_id, mark.slot)
            tx.acquire(holder)
            changed += 1
            continue
        if tx.claim(mark.vm_id, mark.slot) is None:
            log.error(
                "TAP %s records slot %d for %r, which the lease store gives to %r: left as is",
                tap.link.name,
                mark.slot,
                mark.vm_id,
                holder,
            )
            continue
        changed += 1
    if changed:
        log.warning("lease store rebuilt from the kernel: %d lease(s) restored", changed)
    return changed
