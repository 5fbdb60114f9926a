"""NetworkManager: composes backend primitives into idempotent, all-or-nothing operations.

Crash safety (docs/design.md): every kernel object netvm keeps carries netvm's mark, and
the few changes that make an object before it can carry one are preceded by an intent in a
StateFile. The next call that takes the same lock finds the intent of a holder that died and
mends the kernel from it; the same code undoes a call that fails. The kernel is the truth:
a TAP's ifalias records its vm_id and address slot, so the lease store is rebuilt from it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from netvm import attaching, detaching, naming
from netvm.attaching import AttachManyResult, check_attach_args
from netvm.backends.base import Backend, Link, LinkChange, TapOptions
from netvm.backends.kernel import KernelBackend
from netvm.config import NetworkConfig
from netvm.errors import (
    Closed,
    ConfigError,
    ConflictError,
    DeviceExists,
    HostError,
    NetvmError,
    NotFound,
    StateStoreError,
    host_error,
)
from netvm.firewall import BridgeFirewall, ChosenFirewall, Firewall, FirewallKind
from netvm.firewall.choice import NO_NFTABLES
from netvm.firewall.guard import VmGuard
from netvm.host import HostSetup
from netvm.leases import DamagedStore, LeaseStore, LeaseTransaction
from netvm.naming import VmNetwork
from netvm.policy import OPEN, GuestPolicy
from netvm.reaper import CLOSE_WAIT, Reaper
from netvm.reconcile import KernelTap, netvm_taps, rebuild
from netvm.statefile import STATE_DIR_HINT, InFlight
from netvm.undo import Undo as _Undo
from netvm.validation import check_subnet_free

log = logging.getLogger("netvm")

BRIDGE_ALIAS = naming.BRIDGE_ALIAS
"""The prefix of the ifalias that marks a bridge as netvm's (`netvm-bridge:<subnet>`)."""


@dataclass(frozen=True)
class Attachment:
    """One VM as list() sees it: from the leases and from the kernel."""

    vm_id: str
    tap_name: str
    network: VmNetwork | None
    """From the lease, else from the slot the TAP records; None for an old TAP without one."""
    tap_present: bool
    on_bridge: bool
    policy: GuestPolicy | None = None
    """The guarantees the firewall holds for the TAP (None: none)."""


class _Occupied(Exception):
    """An in-flight attach found its TAP's name taken by a device it cannot judge alone."""


def _retired_tap_of(link: Link, vm_id: str) -> bool:
    """Whether `link` is a TAP of `vm_id` that a detach (of any bridge) retired: netvm's,
    about to be deleted, so an attach of the VM may rename it away."""
    return link.kind == "tun" and naming.retired_vm_id(link.alias) == vm_id


def _fixed_flags(options: TapOptions) -> tuple[int | None, int | None, bool]:
    """The flags a TAP keeps for life. vnet_hdr is left out: every opener of the TAP sets
    it anew (TUNSETIFF), so a VMM that opened the TAP may have changed it."""
    return options.owner, options.group, options.multi_queue


def _describe(options: TapOptions) -> str:
    def show(value: int | None) -> str:
        return "-" if value is None else str(value)

    return (
        f"owner={show(options.owner)} group={show(options.group)} "
        f"multi_queue={'on' if options.multi_queue else 'off'}"
    )


class NetworkManager:
    """Host networking for microVMs on one bridge.

    `backend` defaults to the kernel in the current network namespace.
    """

    def __init__(self, config: NetworkConfig | None = None, backend: Backend | None = None) -> None:
        self.config = config if config is not None else NetworkConfig()
        self._owns_backend = backend is None
        self.backend: Backend = backend if backend is not None else KernelBackend()
        # State files are per network namespace: the same bridge name in two namespaces
        # is two bridges.
        namespace = self.backend.namespace_id()
        self.host = HostSetup(self.config, self.backend, namespace)
        self.leases = LeaseStore(
            self.config.state_dir,
            f"{self.config.bridge_name}.{namespace}",
            self.config.vm_subnet,
            repair=self._repair,
        )
        self._closed = False
        self._bridge_index: int | None = None
        self.port_group = naming.port_group(self.config.bridge_name)
        """The link group of this bridge's TAPs (naming.port_group), set with the enslave."""
        self._firewall_kind: FirewallKind | None = None
        self._fell_back: str | None = None
        """Why `auto` picked iptables, until the missing default guarantees are said."""
        self._reaper = Reaper(
            self.backend.deleter, f"netvm-reaper-{self.config.bridge_name}", self._sweep
        )
        self._swept = False
        # A detached TAP stays a (down) port of the bridge until the reaper deletes it,
        # unless the subnet holds enough guests to fill the bridge's 1023 ports: then the
        # detach also releases the port (~0.25 ms more), so that an attach right after
        # it cannot find the bridge full.
        capacity = self.config.vm_subnet.num_addresses - 3
        self._release_ports = capacity > naming.MAX_BRIDGE_PORTS // 2

    @classmethod
    def from_env(cls, backend: Backend | None = None) -> NetworkManager:
        return cls(NetworkConfig.from_env(), backend)

    def close(self, timeout: float | None = CLOSE_WAIT) -> None:
        """Wait (at most `timeout` seconds) for the deletion of the TAPs detached so far,
        then release everything. What is not deleted by then is left, marked, to the next
        ensure_host or gc."""
        self._closed = True
        self._reaper.close(timeout)
        self.leases.close()
        self.host.close()
        if self._owns_backend:
            self.backend.close()

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("the NetworkManager")

    def __enter__(self) -> NetworkManager:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # Firewall ---------------------------------------------------------------------------

    @property
    def firewall_policy(self) -> BridgeFirewall:
        """What netvm keeps in the firewall for this bridge."""
        return self.host.firewall_policy

    def choose_firewall(self) -> ChosenFirewall:
        """The firewall that holds (or will hold) this bridge's rules, and why."""
        return self.host.chosen_firewall()

    # Host set-up ------------------------------------------------------------------------

    def ensure_host(self) -> None:
        """Bridge, gateway address, MTU, up, ip_forward, NAT and FORWARD rules.

        Only what is missing is added; running it again changes nothing. If a step fails,
        what this call created is removed before the error is raised.
        """
        self._check_open()
        undo = _Undo()
        with self.host.locked():
            # Reads first: a bridge another configuration owns, or an unusable state_dir,
            # fails before the kernel is touched (and the first attach does not pay for
            # creating the database).
            self.host.check_owner()
            check_subnet_free(self.backend, self.config)
            self.leases.open()
            chosen = self.host.chosen_firewall()
            self._refuse_to_drop_guarantees(chosen)
            # Until the guarantees are given back (if the tables had to be made again), a
            # file says so: a crash in between leaves it for the next ensure_host.
            pending = self._restore_flag.exists()
            if not pending:
                self._mark_restore(True)
            try:
                bridge = self.host.ensure(undo, chosen)
            except BaseException:
                undo.run()
                self._bridge_index = None
                if not pending:
                    with suppress(StateStoreError):  # the error to raise is the one above
                        self._mark_restore(False)
                raise
            self._bridge_index = bridge.index
            self._firewall_kind = None
            if not (self.host.firewall_changed or pending) or self._restore_guarantees():
                self._mark_restore(False)
        if not self._swept:
            # TAPs that processes which died marked and did not delete: off this call's path.
            self._swept = True
            self._reaper.request_sweep()

    def _refuse_to_drop_guarantees(self, chosen: ChosenFirewall) -> None:
        """A firewall other than nftables cannot hold guarantees: ConflictError, before any
        change, if VMs attached with some would lose them (`auto` switching to iptables
        when Docker on iptables-legacy started after them, or the configuration changed)."""
        if chosen.kind == "nftables":
            return
        guarded = self._guarded_vms()
        if guarded:
            names = ", ".join(sorted(guarded)[:5]) + (", ..." if len(guarded) > 5 else "")
            raise ConflictError(
                f"the firewall would become {chosen.kind} ({chosen.reason}), which cannot hold "
                f"the guarantees of {len(guarded)} attached VM(s) ({names}): set "
                "firewall=nftables (netvm doctor says what else the host needs), or first "
                "detach them, or attach them again with the open policy under "
                "firewall=nftables"
            )

    def _guarded_vms(self) -> list[str]:
        """The vm_ids of the VMs with guarantees: those the lease store remembers with a
        policy, and those whose TAP the firewall holds guarantees for (by their TAP's
        name where no lease names it)."""
        with self.leases.transaction() as tx:
            policies = tx.policies()
            by_tap = {lease.tap_name: lease.vm_id for lease in tx.all()}
        guarded = {vm_id for vm_id, text in policies.items() if text != OPEN.describe()}
        nftables = self.backend.firewall("nftables")
        if nftables.unavailable() is None:
            held = nftables.guards(self.config.bridge_name)
            guarded |= {by_tap.get(tap, tap) for tap, guard in held.items() if guard.policy.any}
        return sorted(guarded)

    @property
    def _restore_flag(self) -> Path:
        return self.config.state_dir / f"guarantees-to-restore.{self.leases.path.stem}"

    def _mark_restore(self, pending: bool) -> None:
        try:
            if pending:
                self._restore_flag.touch()
            else:
                self._restore_flag.unlink(missing_ok=True)
        except OSError as exc:
            raise StateStoreError(
                "mark", str(self._restore_flag), f"{exc.strerror}; {STATE_DIR_HINT}"
            ) from None

    def _restore_guarantees(self) -> bool:
        """Give back the guarantees the firewall lost, now that ensure_host has made
        netvm's tables (or some of their parts) again. A foreign `nft flush ruleset` takes
        every VM's elements with the tables: each VM leased with a remembered policy that
        asks for some, whose TAP is this bridge's and has no record, is guarded with it
        again. A foreign `nft delete table` of one of the tables can leave the records (in
        the bridge table) and take the rest: each VM with a record gets every element of
        it written again (firewall.restore). Elements no record names then go (prune).
        False if a VM's could not be (logged): the next ensure_host tries again."""
        if self._kind() != "nftables":
            return True
        firewall = self.backend.firewall("nftables")
        bridge = self.config.bridge_name
        restored: list[str] = []
        failed = False
        with self._changing() as tx:
            wanted = tx.policies()
            held = firewall.guards(bridge)
            taps = netvm_taps(self.backend, bridge)
            for tap in taps:
                mark, name = tap.mark, tap.link.name
                lease = tx.get(mark.vm_id) if mark is not None else None
                if mark is None or lease is None:
                    continue
                network = VmNetwork.for_slot(mark.vm_id, self.config.vm_subnet, lease.slot)
                if network.tap_name != name:
                    continue
                record = held.get(name)
                if record is None:
                    try:
                        policy = GuestPolicy.parse(wanted[mark.vm_id])
                    except (KeyError, ConfigError):
                        continue  # no policy remembered, or not one netvm can read
                    if not policy.any:
                        continue
                try:
                    if record is not None:
                        firewall.restore(bridge, record)  # its elements, written again
                    else:
                        self._guard(network, policy)
                        restored.append(mark.vm_id)
                except NetvmError as exc:
                    log.error("the guarantees of %r not given back (retried): %s", mark.vm_id, exc)
                    failed = True
            try:
                # A table lost with the records leaves the other table's elements of VMs
                # detached since (their record named them): prune's job, done now, before
                # another VM is given such a VM's address.
                firewall.prune(bridge, [tap.link.name for tap in taps])
            except NetvmError as exc:
                log.error("elements without a record not removed (retried): %s", exc)
                failed = True
        if restored:
            log.warning(
                "the firewall had lost the guarantees of %d VM(s), given back: %s",
                len(restored),
                ", ".join(sorted(restored)),
            )
        return not failed

    def teardown_host(self) -> None:
        """Remove every netvm TAP of this bridge, netvm's rules and chains, and the bridge
        if netvm created it. Nothing that is not netvm's is touched; running it on a clean
        host is success.
        """
        self._check_open()
        with self.host.locked(required=False):
            try:
                self._check_owner(again=True, claim=True)  # an older mark too: all of it goes
                self._collect(set(), prune=False)  # the elements go with netvm's tables
                with suppress(StateStoreError):
                    self._mark_restore(False)
                problems = self.host.teardown()
                if problems:  # a table stays (a foreign jump into it): its elements go
                    self._prune_quietly([])
            finally:
                self._bridge_index = None  # claimed for teardown only, checked again after
        if problems:
            raise ConflictError("teardown incomplete: " + "; ".join(problems))

    # Transactions -----------------------------------------------------------------------

    @contextmanager
    def _changing(self, drain: bool = True) -> Iterator[LeaseTransaction]:
        """A lease transaction whose failure also undoes what its intent says was begun.

        `drain`: wait for the attaches in flight first (LeaseStore.transaction)."""
        with self.leases.transaction(drain) as tx:
            try:
                yield tx
                tx.commit()
            except BaseException:
                tx.rollback()
                tx.undo.run()
                self._settle(tx)
                raise

    def _relearn_policies(self, tx: LeaseTransaction) -> None:
        """Leased VMs with no remembered policy (a store lost and rebuilt from the kernel,
        or VMs that a netvm from before remembering attached) get the policy the firewall's
        record of their TAP holds, or the open policy where it holds none (no record is
        what the open policy leaves): what ensure_host gives back after a flush. Done
        again by the next opening of the store if the firewall cannot be read now."""
        missing = tx.unremembered()
        if not missing:
            return
        try:
            firewall = self._elements()
            held = firewall.guards(self.config.bridge_name) if firewall is not None else {}
        except NetvmError as exc:
            log.warning("the VMs' policies were not read from the firewall: %s", exc)
            return
        if firewall is None:
            return  # no guarantee can be held: none was lost
        for lease in missing:
            guard = held.get(lease.tap_name)
            tx.set_policy(lease.vm_id, (guard.policy if guard is not None else OPEN).describe())

    def _settle(self, tx: LeaseTransaction) -> None:
        """Bring the kernel in line with the store, as the intent describes; keep the intent
        if that fails, for the next call."""
        try:
            intent = tx.intent
            if intent is not None:
                self._recover(intent, tx, crashed=False)
                tx.clear_intent()
        except NetvmError as exc:
            log.error("rollback: %s (the next call retries)", exc)

    def _repair(self, tx: LeaseTransaction) -> None:
        """The store's hook: a holder's leftover intent, attaches in flight that died or
        failed, then a rebuild of a new store."""
        intent = tx.intent
        if intent is not None:
            self._recover(intent, tx, crashed=True)
            tx.clear_intent()
        for index, orphan in tx.orphans:
            if orphan is not None:
                self._recover(orphan, tx, crashed=not orphan.get("failed"))
            tx.forget_orphan(index)
        tx.orphans = []
        if tx.fresh:
            rebuild(tx, netvm_taps(self.backend, self.config.bridge_name))
            self._relearn_policies(tx)

    def _recover(self, intent: dict[str, Any], tx: LeaseTransaction, crashed: bool) -> None:
        """Undo or finish the change `intent` describes. `crashed`: its maker died."""
        if intent.get("op") == "detach" and isinstance(intent.get("group"), int):
            detaching.recover_retired(self, intent, tx, crashed)
            return
        name = intent.get("tap")
        link = self._tun(name) if isinstance(name, str) else None
        level = logging.WARNING if crashed else logging.DEBUG
        if intent.get("op") == "attach-many":
            for vm_id, slot in intent.get("vms", []):
                one = {"vm_id": vm_id, "slot": slot, "new": True}
                self._recover_attach(one, self._tun(naming.tap_name(vm_id)), tx, level)
            return
        if intent.get("op") == "attach":
            self._recover_attach(intent, link, tx, level)
        elif intent.get("op") == "detach" and link is not None:
            self._recover_detach(intent, link, tx, level)

    def _tun(self, name: str) -> Link | None:
        link = self.backend.get_link(name)
        return link if link is not None and link.kind == "tun" else None

    def _recover_attach(
        self, intent: dict[str, Any], link: Link | None, tx: LeaseTransaction, level: int
    ) -> None:
        """The TAP an attach was making stays only if that attach completed; so does the
        lease it created (`new`: an attach in flight commits its lease first)."""
        vm_id, slot = intent.get("vm_id"), intent.get("slot")
        if not isinstance(vm_id, str) or not isinstance(slot, int):
            return
        lease = tx.get(vm_id)
        alias = naming.tap_alias(self.config.bridge_name, vm_id, slot)
        complete = (
            link is not None
            and lease is not None
            and lease.slot == slot
            and link.alias == alias
            and link.up
            and link.master is not None
            and link.master == self._bridge_or_none()
        )
        if complete:
            return
        if link is not None and (link.alias is None or link.alias == alias):
            log.log(level, "removing TAP %s of %r: its attach did not complete", link.name, vm_id)
            self._delete_if_same(link)
            self._unguard_quietly(link.name)
        if intent.get("new") and lease is not None and lease.slot == slot:
            log.log(level, "freeing the lease of %r: its attach did not complete", vm_id)
            tx.release(vm_id)

    def _recover_detach(
        self, intent: dict[str, Any], link: Link, tx: LeaseTransaction, level: int
    ) -> None:
        """(An intent of netvm before the deferred detach.) A detach that did not commit
        is undone; one that did is finished."""
        vm_id, alias = intent.get("vm_id"), intent.get("alias")
        if not isinstance(vm_id, str) or link.index != intent.get("index"):
            return
        if link.alias != naming.detaching_alias(self.config.bridge_name, vm_id):
            return
        if tx.get(vm_id) is None:
            log.log(level, "deleting TAP %s of %r: its detach did not finish", link.name, vm_id)
            self._delete_if_same(link)
            self._unguard_quietly(link.name)
        elif isinstance(alias, str):
            log.log(level, "restoring TAP %s of %r: its detach did not complete", link.name, vm_id)
            self.backend.set_link(link.name, up=bool(intent.get("up")), alias=alias)

    def _check_owner(self, again: bool = False, claim: bool = False) -> None:
        """ConflictError if the bridge is netvm's for another subnet or lease store: its
        TAPs are not this manager's to detach or delete. Checked once, as _bridge does,
        unless `again`: gc and teardown always look (the bridge may have been deleted and
        made again by another store's manager since), and a detach does when a TAP it
        meets is on a bridge of another index. `claim`: as host.check_bridge."""
        if self._bridge_index is not None and not again:
            return
        self._bridge_index = None
        link = self.backend.get_link(self.config.bridge_name)
        marked = link is not None and naming.parse_bridge_alias(link.alias) is not None
        if link is not None and link.kind == "bridge" and marked:
            self.host.check_bridge(link, claim)
            self._bridge_index = link.index  # checked: later detaches need no look-up

    def _bridge_or_none(self) -> int | None:
        link = self.backend.get_link(self.config.bridge_name)
        return link.index if link is not None and link.kind == "bridge" else None

    # VMs --------------------------------------------------------------------------------

    def attach(
        self, vm_id: str, tap: TapOptions | None = None, policy: GuestPolicy | None = None
    ) -> VmNetwork:
        """Lease an address and put the VM's TAP on the bridge (MTU set, up), with the
        guarantees of `policy` (default: `config.guest_policy`, else anti-spoofing where the
        firewall can give it; docs/firewall.md).

        Attaching a vm_id again returns the same network, and gives it `policy` if one is
        given; with None it keeps the guarantees it has (a retry without the policy must not
        take a tenant's isolation away). If a step fails, the TAP and the lease this call
        created are removed.
        """
        self._check_open()
        vm_id = naming.validate_vm_id(vm_id)
        check_attach_args(tap, policy)
        options = tap if tap is not None else TapOptions()
        self._kind()  # the firewall is picked before anything changes
        self._check_owner()  # another store's bridge: refused before this store is made
        try:
            return self._attach_two_phase(vm_id, options, policy)
        except DamagedStore:
            # Found damaged mid-way (what this call did is undone): the store is rebuilt
            # from the kernel when the next transaction opens it.
            with self._changing() as tx:
                return self._attach(tx, vm_id, options, policy)

    def attach_many(
        self,
        vm_ids: Iterable[str],
        tap: TapOptions | None = None,
        policy: GuestPolicy | None = None,
    ) -> AttachManyResult:
        """Attach many VMs at once (a boot storm): one lease transaction per group of VMs,
        the TUN ioctls back to back, the enslave requests pipelined (netvm/attaching.py).

        Each VM succeeds or fails on its own: the result maps each vm_id to its network or
        to its error, and a VM that failed left nothing behind. Errors that concern every
        VM (no bridge, the lease store) raise, and nothing of this call is left.
        """
        self._check_open()
        return attaching.attach_many(self, vm_ids, tap, policy)

    def _reattach_if_leased(self, vm_id: str, tap: TapOptions | None, policy: GuestPolicy) -> bool:
        """Attach a VM again with `policy` only if it is still leased, under the lease lock:
        an undo must not bring back a VM that another call or process detached meanwhile.
        False if it is not leased."""
        options = tap if tap is not None else TapOptions()
        with self._changing() as tx:
            if tx.get(vm_id) is None:
                return False
            self._attach(tx, vm_id, options, policy)
            return True

    def _policy_for(
        self, tx: LeaseTransaction, vm_id: str, new: bool, requested: GuestPolicy | None
    ) -> GuestPolicy:
        """`requested`; for a VM leased already and none requested, the policy it was
        attached with (the default if none is remembered, or not one netvm can read)."""
        if requested is not None or new:
            return self._policy(requested)
        kept = tx.policy(vm_id)
        if kept is not None:
            try:
                return GuestPolicy.parse(kept)
            except ConfigError:
                log.warning("the remembered policy of %r is unreadable: the default", vm_id)
        return self._policy(None)

    def _attach_two_phase(
        self, vm_id: str, options: TapOptions, requested: GuestPolicy | None
    ) -> VmNetwork:
        """A new VM: the lease and an in-flight intent under the lock, the kernel work after
        it, so that other attaches do not queue behind this one's (docs/performance.md).

        A VM that has a lease already (attached again, or one whose TAP must be checked)
        is attached inside the transaction, after any attach of it still in flight.
        """
        flight: InFlight | None = None
        held: list[InFlight] = []  # the flight, from before its slot is locked
        try:
            with self._changing(drain=False) as tx:
                lease, new = tx.acquire(vm_id)
                policy = self._policy_for(tx, vm_id, new, requested)
                tx.set_policy(vm_id, policy.describe())
                network = VmNetwork.for_slot(vm_id, self.config.vm_subnet, lease.slot)
                intent = {
                    "op": "attach",
                    "tap": network.tap_name,
                    "vm_id": vm_id,
                    "slot": lease.slot,
                    "new": True,
                }
                flight = tx.begin_inflight(intent, lease.slot, held) if new else None
                stale = new and tx.take_stale(lease.slot)
                if flight is None:
                    if stale:  # attached inside the transaction: the connections first
                        self.backend.forget_connections(network.guest_ip)
                    tx.wait_for(lease.slot)
                    if tx.orphans:  # the attach waited for failed or died: mend it first
                        self._repair(tx)
                    return self._attach(tx, vm_id, options, requested)
                try:
                    tx.commit()
                except BaseException:
                    flight.finish()  # nothing was committed: nothing to mend
                    raise
            try:
                self._attach_in_flight(flight, network, lease.slot, options, policy, stale)
            except _Occupied:
                # The TAP's name is taken, not by a detach of this VM: the checks of an
                # attach inside the transaction decide (netvm's TAP of this VM, or someone
                # else's).
                self._abandon(flight)
                with self._changing() as tx:
                    return self._attach(tx, vm_id, options, requested)
            except Exception:
                self._abandon(flight)
                raise
            flight.finish()
        finally:
            # Whatever stopped this call before finish() (KeyboardInterrupt, SystemExit
            # from a signal handler, anywhere from the slot's taking on): the slot is let
            # go, its intent left to the next transaction as a dead process's would be. A
            # slot kept would make every drain, in every process, wait for ever.
            for taken in held:
                taken.abandon()
        log.debug("attached %s as %s", vm_id, network.tap_name)
        return network

    def _attach_in_flight(
        self,
        flight: InFlight,
        network: VmNetwork,
        slot: int,
        options: TapOptions,
        policy: GuestPolicy,
        stale: bool = False,
    ) -> None:
        """The kernel work of a new VM's attach, outside the lock; its intent is `flight`.
        `stale`: its address was another VM's, whose connections are deleted first."""
        name = network.tap_name
        if stale:
            self.backend.forget_connections(network.guest_ip)
        try:
            index = self.backend.create_tap(name, options)
        except DeviceExists:
            link = self.backend.get_link(name)
            if link is None or not _retired_tap_of(link, network.vm_id):
                flight.update({"op": "attach", "vm_id": network.vm_id, "slot": slot, "new": True})
                raise _Occupied from None
            # A detach of this VM has not deleted its old TAP yet: finish that first.
            self._delete_if_same(link)
            index = self.backend.create_tap(name, options)
        # The TAP is down and on no bridge yet: its guarantees are in place before its
        # first frame. A failure from here on is undone by the intent (_recover_attach).
        self._bridge()
        self._guard(network, policy, fresh=True)
        self._forget_claim(network, policy)
        alias = naming.tap_alias(self.config.bridge_name, network.vm_id, slot)
        self._enslave(name, alias, index, policy.isolated)

    def _abandon(self, flight: InFlight) -> None:
        """Leave a failed attach's intent to the next transaction, which mends it as it
        mends one whose process died (one code path for both); this call opens that
        transaction at once unless another process's comes first."""
        flight.update({**flight.intent, "failed": True})
        flight.abandon()
        try:
            with self.leases.transaction(drain=False):
                pass
        except NetvmError as exc:
            log.error("rollback: %s (the next call retries)", exc)

    # Guarantees (netvm/policy.py, docs/firewall.md) -------------------------------------

    def _kind(self) -> FirewallKind:
        if self._firewall_kind is None:
            chosen = self.choose_firewall()
            self._firewall_kind = chosen.kind
            self._fell_back = chosen.reason if chosen.kind == "iptables" else None
        return self._firewall_kind

    def _policy(self, policy: GuestPolicy | None) -> GuestPolicy:
        if policy is not None:
            return policy
        if self.config.guest_policy is not None:
            return self.config.guest_policy
        if self._kind() == "nftables":
            return GuestPolicy()
        if self._fell_back is not None and self._fell_back.startswith(NO_NFTABLES):
            # Not the host's choice (its legacy tables hold rules) but nftables unusable,
            # a library missing say: the VMs lose the default anti-spoofing. Said, once.
            log.warning(
                "VMs attached without a policy get no guarantee: the default (anti-spoofing) "
                "needs nftables, and %s",
                self._fell_back.removeprefix("auto: "),
            )
            self._fell_back = None
        return OPEN

    def _guard(self, network: VmNetwork, policy: GuestPolicy, fresh: bool = False) -> None:
        """The firewall's elements for the VM (`fresh`: its TAP was just made)."""
        vm = VmGuard(network.tap_name, network.guest_mac, network.guest_ip, policy)
        self.backend.firewall(self._kind()).guard(self.config.bridge_name, vm, fresh)

    def _forget_claim(self, network: VmNetwork, policy: GuestPolicy) -> None:
        """The host's ARP entry of a guarded VM's address goes once its guarantees stop new
        claims: a neighbour without anti-spoofing may have answered for the free address
        before (the host would send it the VM's traffic until the entry went stale)."""
        if not policy.anti_spoof:
            return
        with suppress(NotFound):
            self.backend.forget_neighbour(self._bridge(), network.guest_ip)

    def _elements(self) -> Firewall | None:
        """The firewall that holds per-VM elements: nftables, where it can be used."""
        firewall = self.backend.firewall("nftables")
        return firewall if firewall.unavailable() is None else None

    def _unguard(self, tap: str) -> None:
        firewall = self._elements()
        if firewall is not None:
            firewall.unguard(self.config.bridge_name, [tap])

    def _unguard_quietly(self, tap: str) -> None:
        try:
            self._unguard(tap)
        except NetvmError as exc:
            log.error("rollback: could not remove the guarantees of %s (gc will): %s", tap, exc)

    def _attach(
        self,
        tx: LeaseTransaction,
        vm_id: str,
        options: TapOptions,
        requested: GuestPolicy | None,
    ) -> VmNetwork:
        lease, new = tx.acquire(vm_id)
        policy = self._policy_for(tx, vm_id, new, requested)
        tx.set_policy(vm_id, policy.describe())
        network = VmNetwork.for_slot(vm_id, self.config.vm_subnet, lease.slot)
        if new and tx.take_stale(lease.slot):
            # Inside the transaction: a failure rolls the stale mark back with the lease.
            self.backend.forget_connections(network.guest_ip)
        name = network.tap_name
        intent = {"op": "attach", "tap": name, "vm_id": vm_id, "slot": lease.slot}
        tx.intend(intent)
        try:
            index = self.backend.create_tap(name, options)
        except DeviceExists:
            tx.clear_intent()  # the TAP is not this call's: a failure must leave it
            link = self.backend.get_link(name)
            if link is None or not _retired_tap_of(link, vm_id):
                network = self._reuse_tap(tx, network, options, link)
                self._regard(tx, network, policy, link)
                return network
            # A detach of this VM has not deleted its old TAP yet: finish that first.
            self._delete_if_same(link)
            tx.intend(intent)
            index = self.backend.create_tap(name, options)
        # The TAP is down and on no bridge yet: its guarantees are in place before its
        # first frame. A failure from here on is undone by the intent (_recover_attach).
        self._bridge()  # no bridge: say "run ensure_host() first" before anything else
        self._guard(network, policy, fresh=True)
        self._forget_claim(network, policy)
        alias = naming.tap_alias(self.config.bridge_name, vm_id, lease.slot)
        self._enslave(name, alias, index, policy.isolated)
        log.debug("attached %s as %s", vm_id, name)
        return network

    def _regard(
        self, tx: LeaseTransaction, network: VmNetwork, policy: GuestPolicy, link: Link | None
    ) -> None:
        """Give a VM attached again `policy`; if the transaction then fails (a full
        state_dir), it is given back what it had: its store still says that."""
        name, bridge = network.tap_name, self.config.bridge_name
        firewall = self.backend.firewall(self._kind())
        old = firewall.record(bridge, name)
        self._guard(network, policy)
        if old != VmGuard(name, network.guest_mac, network.guest_ip, policy):
            if old is None:
                tx.undo.push(f"remove the guarantees of {name}", lambda: self._unguard(name))
            else:
                tx.undo.push(
                    f"restore the guarantees of {name}", lambda: firewall.guard(bridge, old)
                )
        if link is not None and link.isolated != policy.isolated:
            self.backend.set_port_isolated(name, policy.isolated)
            was = link.isolated
            tx.undo.push(
                f"restore the port isolation of {name}",
                lambda: self.backend.set_port_isolated(name, was),
            )

    def _reuse_tap(
        self, tx: LeaseTransaction, network: VmNetwork, options: TapOptions, link: Link | None
    ) -> VmNetwork:
        """The TAP exists: accept it only if it is this VM's, and mend its settings."""
        if link is None:
            raise host_error("attach", network.tap_name, errno.EAGAIN, "the TAP vanished; retry")
        mark = self._check_tap(link, network.vm_id)
        if link.tap is not None and _fixed_flags(link.tap) != _fixed_flags(options):
            raise ConflictError(
                f"TAP {link.name} of {network.vm_id!r} exists with other flags "
                f"({_describe(link.tap)}) than requested ({_describe(options)}); detach it first"
            )
        lease = tx.get(network.vm_id)
        assert lease is not None
        if mark.slot is not None and mark.slot != lease.slot:
            # The kernel is the truth: the VM behind this TAP uses the address it records.
            if tx.claim(network.vm_id, mark.slot) is None:
                self._check_holder(tx, mark.slot)
                raise ConflictError(
                    f"TAP {link.name} of {network.vm_id!r} records address slot {mark.slot}, "
                    f"which the lease store gives to {tx.holder(mark.slot)!r}; detach one of them"
                )
            network = VmNetwork.for_slot(network.vm_id, self.config.vm_subnet, mark.slot)
            lease = tx.get(network.vm_id)
            assert lease is not None
        alias = naming.tap_alias(self.config.bridge_name, network.vm_id, lease.slot)
        bridge = self._bridge()
        if (
            link.master != bridge
            or link.mtu != self.config.mtu
            or not link.up
            or link.alias != alias
            or link.group != self.port_group
        ):
            self._enslave(link.name, alias)
        return network

    def _check_holder(self, tx: LeaseTransaction, slot: int) -> None:
        """The store gives `slot`, which a TAP records, to another VM: if that VM's own TAP
        records another slot, the store contradicts the kernel on both (rows edited by
        hand): DamagedStore, and the attach retries on a store rebuilt from the kernel."""
        holder = tx.holder(slot)
        link = self.backend.get_link(naming.tap_name(holder)) if holder is not None else None
        if holder is None or link is None or link.kind != "tun":
            return
        theirs = naming.parse_tap_alias(link.alias, self.config.bridge_name, link.name)
        if theirs is not None and theirs.vm_id == holder and theirs.slot not in (None, slot):
            self.leases.mark_damaged()
            raise DamagedStore(
                "read",
                str(self.leases.path),
                f"slot {slot} is leased to {holder!r}, whose TAP records slot {theirs.slot}: "
                "the store contradicts the kernel; it is rebuilt from the kernel",
            )

    def _check_tap(self, link: Link, vm_id: str) -> naming.TapMark:
        mark = None
        if link.kind == "tun":
            mark = naming.parse_tap_alias(link.alias, self.config.bridge_name, link.name)
        if mark is None or mark.vm_id != vm_id:
            raise ConflictError(
                f"{link.name} already exists and is not netvm's TAP for {vm_id!r} on "
                f"{self.config.bridge_name} (kind {link.kind or 'none'}, ifalias {link.alias!r}); "
                "netvm leaves it alone: remove it or use another vm_id"
            )
        return mark

    def _bridge(self) -> int:
        if self._bridge_index is None:
            link = self.backend.get_link(self.config.bridge_name)
            if link is None:
                raise host_error(
                    "attach",
                    self.config.bridge_name,
                    errno.ENODEV,
                    "the bridge does not exist: run ensure_host() first",
                )
            self.host.check_bridge(link)
            self._bridge_index = link.index
        return self._bridge_index

    def _enslave(
        self, name: str, alias: str, index: int | None = None, isolated: bool = False
    ) -> None:
        """One request: master, MTU, up, alias and the port group, and for an isolated VM
        the port's isolation in the same datagram (`index`: the new TAP's, known from its creation).
        A cached bridge index is checked on failure."""
        cached = self._bridge_index

        def send() -> None:
            self.backend.set_link(
                name,
                index=index,
                master=self._bridge(),
                mtu=self.config.mtu,
                up=True,
                alias=alias,
                isolated=True if isolated else None,  # a new port is not isolated
                group=self.port_group,
            )

        try:
            send()
        except HostError as exc:
            if cached is None or exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV):
                raise
            # The bridge may have been deleted and made again (a new index) behind us.
            self._bridge_index = None
            if self._bridge() == cached:
                raise
            send()

    def detach(self, vm_id: str) -> None:
        """Take the VM's TAP off the bridge and free its lease; a VM that is already gone
        is success. The TAP is deleted moments later, off the caller's path (below).

        Deleting a device makes the kernel wait for an RCU grace period (~16 ms) per
        request, so a detach does not delete: under the lease lock, one request takes the
        TAP down (and off the bridge where it can fill up), renames it away from the VM's
        name (naming.detached_name: free for a new attach at once), marks it
        `netvm-detaching:<bridge>:<vm_id>` and moves it into the reaper's link group; the
        reaper's thread deletes the group, all the TAPs detached meanwhile in one request
        (netvm/reaper.py).
        """
        self._check_open()
        vm_id = naming.validate_vm_id(vm_id)
        detaching.detach(self, [vm_id])

    def detach_many(self, vm_ids: Iterable[str]) -> None:
        """Detach each vm_id: one lock, the TAPs looked up and changed in pipelined
        requests, one deferred deletion. Every TAP is checked first (a ConflictError
        changes nothing); the leases are committed every detaching.DETACH_CHUNK VMs."""
        self._check_open()
        wanted = list(dict.fromkeys(naming.validate_vm_ids("vm_ids", vm_ids)))
        if wanted:
            detaching.detach(self, wanted)

    def wait_detached(self, timeout: float | None = CLOSE_WAIT) -> bool:
        """Wait until the TAPs this manager detached so far are deleted; False on timeout."""
        return self._reaper.wait(timeout)

    def _prune_quietly(self, live: list[str]) -> None:
        try:
            firewall = self._elements()
            if firewall is not None:
                firewall.prune(self.config.bridge_name, live)
        except NetvmError as exc:
            log.error("guarantees of gone TAPs not removed (gc will): %s", exc)

    def _unguard_into(self, taps: Collection[str], unguarded: list[VmGuard]) -> None:
        """Remove the TAPs' guarantees, keeping what they were for a rollback."""
        if not taps:
            return  # a detach whose TAPs are all there asks nothing more of the firewall
        firewall = self._elements()
        if firewall is not None:
            unguarded += firewall.unguard(self.config.bridge_name, taps).values()

    def _sweep(self) -> None:
        """(On the reaper's thread.) See netvm/detaching.py: sweep."""
        detaching.sweep(self)

    def _delete_if_same(self, link: Link) -> None:
        """Delete `link` if that very device (its ifindex) still exists.

        A TAP a detach marked (an attach of its VM found it under the VM's name: its
        rename failed) is not deleted here: renamed away (naming.detached_name), its
        name is free at once, and the reaper deletes it with its group. Any other, or one
        that cannot be renamed, is deleted now, paying the kernel's grace period.
        """
        if link.kind == "tun" and naming.retired_vm_id(link.alias) is not None:
            # Retired by a detach of this bridge or another's: netvm's, being deleted.
            group = self._reaper.begin()
            retire = LinkChange(
                link.index, name=naming.detached_name(link.index), up=False, group=group
            )
            try:
                failed = self.backend.change_links([retire])
            finally:
                self._reaper.end(group, 1)
            if not failed or failed[0][1] == errno.ENODEV:
                return
            log.warning("TAP %s cannot be renamed (%s): deleted now", link.name, failed[0][1])
        try:
            self.backend.delete_link(link.name, index=link.index)
        except HostError as exc:
            if exc.errno != errno.ENODEV:
                raise

    def gc(self, keep: Iterable[str] = ()) -> list[str]:
        """Detach every VM of this bridge whose vm_id is not in `keep`; return their vm_ids.

        The TAPs are deleted in one kernel request. With the lease store unusable (state_dir
        read-only, say), the TAPs are found and deleted from the kernel alone.
        """
        self._check_open()
        kept = set(naming.validate_vm_ids("keep", keep))
        self._check_owner(again=True)
        return self._collect(kept)

    def _collect(self, kept: set[str], prune: bool = True) -> list[str]:
        """gc, the bridge's owner checked. `prune`: remove the guarantees of the TAPs that
        are gone (teardown does not: it removes netvm's tables with them)."""
        removed: set[str] = set()
        try:
            with self._changing() as tx:
                self._gc(kept, tx, removed, prune)
        except StateStoreError as exc:
            log.warning("gc works from the kernel alone: %s", exc)
            self._gc(kept, None, removed, prune)
        return sorted(removed)

    def _gc(
        self, kept: set[str], tx: LeaseTransaction | None, removed: set[str], prune: bool
    ) -> None:
        doomed: set[str] = set()
        names: list[str] = []
        for tap in netvm_taps(self.backend, self.config.bridge_name):
            # TAPs a detach marked but did not get to delete (it was interrupted) go too.
            if tap.mark is None:
                names.append(tap.link.name)
            elif tap.mark.vm_id not in kept:
                names.append(tap.link.name)
                doomed.add(tap.mark.vm_id)
        if tx is not None:
            doomed.update(lease.vm_id for lease in tx.all() if lease.vm_id not in kept)
        self.backend.delete_links(names)
        firewall = self._elements() if prune else None
        if firewall is not None:
            # Also the elements of TAPs that are gone already (a crash, a hand-deleted TAP).
            live = [t.link.name for t in netvm_taps(self.backend, self.config.bridge_name)]
            firewall.prune(self.config.bridge_name, live)
        removed.update(doomed)
        if tx is not None:
            for vm_id in doomed:
                tx.release(vm_id)

    def _list(self, tx: LeaseTransaction, taps: list[KernelTap]) -> list[Attachment]:
        bridge = self._bridge_or_none()
        subnet = self.config.vm_subnet
        by_vm = {t.mark.vm_id: t for t in taps if t.mark is not None}
        result: list[Attachment] = []
        leased: set[str] = set()
        for lease in tx.all():
            leased.add(lease.vm_id)
            tap = by_vm.get(lease.vm_id)
            ours = tap is not None and tap.link.name == lease.tap_name
            result.append(
                Attachment(
                    vm_id=lease.vm_id,
                    tap_name=lease.tap_name,
                    network=VmNetwork.for_slot(lease.vm_id, subnet, lease.slot),
                    tap_present=ours,
                    on_bridge=ours and tap is not None and tap.link.master == bridge,
                )
            )
        for vm_id, tap in by_vm.items():
            if vm_id in leased or bridge is None or tap.link.master != bridge:
                continue
            slot = tap.mark.slot if tap.mark is not None else None
            network = None
            if slot is not None and slot < naming.guest_capacity(subnet):
                network = VmNetwork.for_slot(vm_id, subnet, slot)
            result.append(Attachment(vm_id, tap.link.name, network, True, True))
        return result

    # Defined last: inside the class body, the name `list` is this method from here on.
    def list(self) -> list[Attachment]:
        """Every VM of this bridge: leased ones, and netvm TAPs on the bridge without a lease.
        ConflictError for a bridge whose leases are in another state_dir (before any store
        is made in this one: a mistyped state_dir must not leave a second store behind)."""
        self._check_open()
        self.host.check_owner()  # reads only: an older netvm's mark is listed, as before
        with self.leases.transaction() as tx:
            found = self._list(tx, netvm_taps(self.backend, self.config.bridge_name))
        firewall = self._elements()
        guards = firewall.guards(self.config.bridge_name) if firewall is not None else {}
        return [
            dataclasses.replace(a, policy=guards[a.tap_name].policy) if a.tap_name in guards else a
            for a in found
        ]
