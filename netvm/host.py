"""Host set-up of one bridge: bridge, gateway, ip_forward, firewall; and their teardown.

Serialised per network namespace by a StateFile (`host.<namespace>.lock`) whose intent
covers the one kernel change a crash could leave unmarked: a bridge is created and named
netvm's in two requests (the kernel takes no ifalias at creation), so the intent is written
first, and the next holder deletes a bridge that the intent names and that still has no
mark and is still in the link group the intent names (a bridge of that name made by hand
meanwhile is in another). ip_forward has no mark at all: the file that says netvm switched
it on is written before it is switched.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from netvm import naming
from netvm.backends.base import Backend, BridgeOptions, Link
from netvm.config import DEFAULT_STATE_DIR, NetworkConfig
from netvm.errors import ConflictError, NetvmError, StateStoreError, host_error
from netvm.firewall import KINDS, BridgeFirewall, ChosenFirewall, choose_firewall
from netvm.statefile import STATE_DIR_HINT, StateFile
from netvm.undo import Undo

log = logging.getLogger("netvm")

CREATING_GROUPS = (2**31, 2**32 - 1)
"""Link groups of a bridge being created: apart from the reaper's (netvm/reaper.py), whose
groups are deleted with all they hold."""
LINK_LOCAL_TO_HOOKS = 1 << 0x0E
"""group_fwd_mask bit of LLDP (01:80:c2:00:00:0e), the one link-local address the kernel
would hand to the port's own stack without any bridge hook; the others pass the bridge's
input hook, where netvm's rules drop them from guarded TAPs (guard_rules.py)."""


FDB_MAX_LEARNED = 4096
"""The most MACs netvm's bridge learns (Linux 6.8+): a guest without anti-spoofing sending
from random MACs filled the FDB without bound (20 000 entries in a test, each kept 300 s,
and every unknown one flooded). Four per port of a full bridge (1023 ports), for guests
that bridge containers of their own."""


class HostSetup:
    """What ensure_host and teardown_host change, for one bridge in one namespace."""

    def __init__(self, config: NetworkConfig, backend: Backend, namespace: str) -> None:
        self.config = config
        self.backend = backend
        state_dir = config.state_dir
        self.file = StateFile(state_dir / f"host.{namespace}.lock")
        self.ip_forward_flag = state_dir / f"ip_forward-enabled-by-netvm.{namespace}"
        self.store = naming.store_id(state_dir)
        """The lease store the bridge's mark names (naming.store_id of state_dir)."""
        self.firewall_changed = False
        """The last ensure changed netvm's firewall rules (made its tables, after a flush)."""
        self._threads = threading.RLock()
        """The lock file serialises processes; the threads of one manager take turns here
        (a StateFile is not thread-safe)."""

    @property
    def alias(self) -> str:
        return naming.bridge_alias(self.config.vm_subnet, self.store)

    # Locking and recovery ---------------------------------------------------------------

    @contextmanager
    def locked(self, required: bool = True) -> Iterator[None]:
        """Hold the namespace's host lock; first mend what a holder that died left.

        Not `required` (teardown), an unusable state_dir is no reason to stop: no netvm
        process can take the lock there either, so the work goes on unlocked.
        """
        with self._threads:
            yield from self._locked(required)

    def _locked(self, required: bool) -> Iterator[None]:
        try:
            self.file.acquire()
        except StateStoreError as exc:
            if required:
                raise
            log.warning("going on without the host lock: %s", exc)
            yield
            return
        try:
            intent = self.file.read_intent()
            if intent is not None:
                self._recover(intent)
                self.file.clear_intent()
            yield
            if self.file.read_intent() is not None:
                self.file.clear_intent()
        finally:
            self.file.release()

    def _recover(self, intent: dict[str, object]) -> None:
        name = intent.get("bridge")
        if intent.get("op") != "create-bridge" or not isinstance(name, str):
            return
        link = self.backend.get_link(name)
        if link is None or link.kind != "bridge" or link.alias is not None:
            return
        group = intent.get("group")
        if group is not None and link.group != group:
            return  # not the one netvm made: a bridge of that name someone made since
        if self.backend.list_links(master=link.index):
            return
        log.warning("removing bridge %s: its creation by netvm was interrupted", name)
        try:
            self.backend.delete_link(name, index=link.index)
        except NetvmError as exc:
            if getattr(exc, "errno", None) != errno.ENODEV:
                raise

    # Ownership --------------------------------------------------------------------------

    def check_bridge(self, link: Link, claim: bool = False) -> None:
        """ConflictError unless `link` is a bridge netvm made for this subnet and lease
        store. A mark from before bridges recorded their store is accepted only to
        `claim` it (ensure_host rewrites it, teardown removes the bridge): attach, detach
        and gc cannot tell whose leases its VMs are."""
        name = link.name
        if link.kind != "bridge":
            raise ConflictError(
                f"{name} already exists but is not a bridge (kind {link.kind or 'none'}); "
                "netvm does not adopt it: remove it or choose another bridge_name"
            )
        mark = naming.parse_bridge_alias(link.alias)
        if mark is None:
            raise ConflictError(
                f"bridge {name} already exists but netvm did not create it "
                f"(its ifalias is {link.alias!r}, not {self.alias!r}); netvm does not adopt it: "
                "remove it or choose another bridge_name"
            )
        if mark.subnet is not None and mark.subnet != self.config.vm_subnet:
            raise ConflictError(
                f"bridge {name} serves {mark.subnet} for another netvm configuration, not "
                f"{self.config.vm_subnet}; use that vm_subnet, or another bridge_name"
            )
        if mark.store is None and not claim:
            raise ConflictError(
                f"bridge {name} carries the mark of an older netvm ({link.alias!r}), which "
                "does not say which state_dir holds its leases: run ensure_host() once with "
                f"this state_dir ({self.config.state_dir}), which records it"
            )
        if mark.store is not None and mark.store != self.store:
            default = mark.store == naming.store_id(DEFAULT_STATE_DIR)
            where = f" ({DEFAULT_STATE_DIR}, the default)" if default else ""
            raise ConflictError(
                f"bridge {name} has its leases in another state_dir{where} than "
                f"{self.config.state_dir} (its mark {link.alias!r}): two lease stores would "
                "hand one address out twice; use the state_dir of the manager that made it "
                "(the same absolute path: the mark keeps only a digest of it), or another "
                "bridge_name"
            )

    def check_owner(self) -> Link | None:
        """The bridge if it exists, after check_bridge; reads only."""
        link = self.backend.get_link(self.config.bridge_name)
        if link is not None:
            self.check_bridge(link, claim=True)
        return link

    # Set-up -----------------------------------------------------------------------------

    def ensure(self, undo: Undo, chosen: ChosenFirewall | None = None) -> Link:
        """`chosen`: the firewall, if the caller has picked it already (~0.15 ms to pick)."""
        bridge = self._ensure_bridge(undo)
        self._ensure_gateway(bridge, undo)
        self._ensure_ip_forward(undo)
        self._ensure_firewall(undo, chosen or self.chosen_firewall())
        return bridge

    def _ensure_bridge(self, undo: Undo) -> Link:
        name, mtu = self.config.bridge_name, self.config.mtu
        link = self.backend.get_link(name)
        if link is None:
            # Made in a link group of its own, named in the intent, until it has its alias:
            # a crash in between leaves a bridge that is told apart from one made by hand.
            group = random.randrange(*CREATING_GROUPS)
            self.file.write_intent({"op": "create-bridge", "bridge": name, "group": group})
            options = BridgeOptions(
                LINK_LOCAL_TO_HOOKS, no_linklocal_learn=True, fdb_max_learned=FDB_MAX_LEARNED
            )
            self.backend.create_bridge(name, mtu, self.alias, group, options)
            undo.push(f"delete bridge {name}", lambda: self.backend.delete_link(name))
            self.file.clear_intent()
            log.info("created bridge %s", name)
            link = self.backend.get_link(name)
            if link is None:
                raise host_error("create bridge", name, errno.ENODEV, "it vanished")
        self.check_bridge(link, claim=True)
        if link.alias != self.alias:
            # Made before netvm recorded the subnet: it now says which subnet it serves.
            old = link.alias
            self.backend.set_link(name, alias=self.alias)
            undo.push(
                f"restore the alias of {name}", lambda: self.backend.set_link(name, alias=old)
            )
        self._ensure_link_local(link, undo)
        self._ensure_no_router_advertisements(link, undo)
        self._ensure_address(link, undo)
        if link.mtu != mtu or not link.up:
            before = link
            self.backend.set_link(name, mtu=mtu, up=True)
            undo.push(
                f"restore {name}", lambda: self.backend.set_link(name, mtu=before.mtu, up=before.up)
            )
        return link

    def _ensure_link_local(self, link: Link, undo: Undo) -> None:
        """Frames to 802.1D link-local addresses take the bridge's hooks, where netvm's
        rules see them, and teach the bridge no MAC; STP stays off (BridgeOptions)."""
        have = link.bridge or BridgeOptions()
        # An administrator's cap is kept; none (0) gets netvm's; None: the kernel has none.
        cap = have.fdb_max_learned
        want = BridgeOptions(
            have.group_fwd_mask | LINK_LOCAL_TO_HOOKS,
            no_linklocal_learn=True,
            fdb_max_learned=cap if cap is None else cap or FDB_MAX_LEARNED,
        )
        # STP off: with it on, BPDUs (01:80:c2:00:00:00) pass no hook and a guest's would
        # make its TAP the root port.
        if want == have:
            return
        self.backend.set_bridge_options(link.name, want)
        undo.push(
            f"restore the link-local options of {link.name}",
            lambda: self.backend.set_bridge_options(link.name, have),
        )

    def _ensure_address(self, link: Link, undo: Undo) -> None:
        """The bridge's MAC, the gateway's to every guest, is set: left to the kernel, a
        bridge takes the lowest MAC of its ports, and a TAP's coming or going changed it.
        The guests kept the old one in their ARP caches, and their frames to it, no longer
        local, were flooded to the other ports instead of reaching the host (their internet
        gone until the entry went stale); the host's own ARP table was flushed with each
        change. Derived from the gateway's address (naming.guest_mac): the same after a
        teardown and a new ensure_host, and no guest's."""
        want = naming.guest_mac(self.config.gateway.ip)
        old = link.address
        if old is None or old == want:
            return
        self.backend.set_link(link.name, address=want)
        undo.push(
            f"restore the MAC of {link.name}", lambda: self.backend.set_link(link.name, address=old)
        )

    def _ensure_no_router_advertisements(self, link: Link, undo: Undo) -> None:
        """The host takes no IPv6 router advertisement from a guest: with accept_ra on
        (the kernel's default unless the host forwards IPv6), one RA from any VM without
        anti-spoofing, a router VM's radvd say, would give the host a default route via
        that guest and an address of its choosing."""
        old = link.accept_ra
        if old is None or old == 0:
            return
        self.backend.set_accept_ra(link.name, 0)
        undo.push(
            f"restore accept_ra of {link.name}",
            lambda: self.backend.set_accept_ra(link.name, old),
        )

    def _ensure_gateway(self, bridge: Link, undo: Undo) -> None:
        gateway = self.config.gateway
        addresses = self.backend.list_addresses()
        if any(a.index == bridge.index and a.interface == gateway for a in addresses):
            return
        for address in addresses:
            if address.interface.ip == gateway.ip:
                raise ConflictError(
                    f"the gateway address {gateway.ip} is already assigned "
                    f"({address.interface} on interface index {address.index}); "
                    "remove it or choose another vm_subnet"
                )
        self.backend.add_address(bridge.index, gateway)
        undo.push(
            f"remove {gateway} from {bridge.name}",
            lambda: self.backend.delete_address(bridge.index, gateway),
        )

    def _ensure_ip_forward(self, undo: Undo) -> None:
        """Switch ip_forward on, having first recorded (per namespace) that netvm does.

        Recorded first, a crash in between leaves a record of a switch that did not happen:
        harmless (teardown finds it off). The other order could leave it on for ever.
        """
        if self.backend.get_ip_forward():
            return
        flag = self.ip_forward_flag
        existed = flag.exists()
        try:
            fd = os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
        except OSError as exc:
            raise StateStoreError(
                "create", str(flag), f"{exc.strerror}; {STATE_DIR_HINT}"
            ) from None
        if not existed:
            undo.push("forget ip_forward", lambda: flag.unlink(missing_ok=True))
        # Pushed first: an exception (KeyboardInterrupt) between the switch and a push after
        # it would leave ip_forward on and its record forgotten. Off while off is harmless.
        undo.push("switch ip_forward back off", lambda: self.backend.set_ip_forward(False))
        self.backend.set_ip_forward(True)

    def chosen_firewall(self) -> ChosenFirewall:
        return choose_firewall(self.config.firewall, self.backend)

    @property
    def firewall_policy(self) -> BridgeFirewall:
        config = self.config
        return BridgeFirewall(config.bridge_name, config.vm_subnet, config.host_egress_iface)

    def _ensure_firewall(self, undo: Undo, chosen: ChosenFirewall) -> None:
        """netvm's rules in the chosen firewall, and in no other (a switch moves them)."""
        policy = self.firewall_policy
        firewall = self.backend.firewall(chosen.kind)
        self.firewall_changed = firewall.ensure(policy)
        if self.firewall_changed:
            undo.push(
                f"remove netvm's {chosen.kind} rules",
                lambda: firewall.remove(policy.bridge),
            )
        for kind in KINDS:
            other = self.backend.firewall(kind)
            if kind != chosen.kind and other.unavailable() is None:
                other.remove(policy.bridge)

    # Teardown ---------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Firewall, bridge (if netvm's and empty) and ip_forward; what had to stay."""
        problems: list[str] = []
        for kind in KINDS:
            firewall = self.backend.firewall(kind)
            if firewall.unavailable() is None:
                problems += firewall.remove(self.config.bridge_name)
        bridge = self.backend.get_link(self.config.bridge_name)
        if bridge is not None and bridge.kind == "bridge":
            if naming.parse_bridge_alias(bridge.alias) is None:
                problems.append(f"bridge {bridge.name} kept: netvm did not create it")
            elif others := self.backend.list_links(master=bridge.index):
                names = ", ".join(link.name for link in others)
                problems.append(f"bridge {bridge.name} kept: ports netvm did not create: {names}")
            else:
                self.backend.delete_link(bridge.name)
        self._teardown_ip_forward()
        return problems

    def _teardown_ip_forward(self) -> None:
        """Switch ip_forward off only if netvm switched it on and no netvm bridge is left
        in the namespace (whichever bridge's set-up switched it on)."""
        flag: Path = self.ip_forward_flag
        if not flag.exists():
            return
        links = self.backend.list_links()
        if any(naming.parse_bridge_alias(link.alias) is not None for link in links):
            return
        if self.backend.get_ip_forward():
            self.backend.set_ip_forward(False)
        try:
            flag.unlink(missing_ok=True)
        except OSError as exc:
            log.error("could not remove %s: %s", flag, exc)

    def close(self) -> None:
        self.file.close()
