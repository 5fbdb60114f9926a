"""NetworkManager: composes backend primitives into idempotent, all-or-nothing operations."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

from netvm import naming
from netvm.backends.base import Backend, Link, TapOptions
from netvm.backends.kernel import KernelBackend
from netvm.config import NetworkConfig
from netvm.errors import ConflictError, DeviceExists, HostError, NetvmError, host_error
from netvm.firewall import KINDS, BridgeFirewall, ChosenFirewall, choose_firewall
from netvm.leases import STATE_DIR_HINT, LeaseStore, LeaseTransaction
from netvm.naming import VmNetwork
from netvm.undo import Undo as _Undo
from netvm.validation import check_subnet_free

log = logging.getLogger("netvm")

BRIDGE_ALIAS = "netvm-bridge"
"""The ifalias that marks a bridge as created by netvm (teardown deletes only such a one)."""


@dataclass(frozen=True)
class Attachment:
    """One VM as list() sees it: from the leases and from the kernel."""

    vm_id: str
    tap_name: str
    network: VmNetwork | None
    """None when a netvm TAP is on the bridge but its lease is gone (e.g. state_dir lost)."""
    tap_present: bool
    on_bridge: bool


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
        state_dir = self.config.state_dir
        self.leases = LeaseStore(
            state_dir, f"{self.config.bridge_name}.{namespace}", self.config.vm_subnet
        )
        self._host_lock_path = state_dir / f"host.{namespace}.lock"
        self._ip_forward_flag = state_dir / f"ip_forward-enabled-by-netvm.{namespace}"
        self._bridge_index: int | None = None

    @classmethod
    def from_env(cls, backend: Backend | None = None) -> NetworkManager:
        return cls(NetworkConfig.from_env(), backend)

    def close(self) -> None:
        self.leases.close()
        if self._owns_backend:
            self.backend.close()

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
        config = self.config
        return BridgeFirewall(config.bridge_name, config.vm_subnet, config.host_egress_iface)

    def choose_firewall(self) -> ChosenFirewall:
        """The firewall that holds (or will hold) this bridge's rules, and why."""
        return choose_firewall(self.config.firewall, self.backend)

    # Host set-up ------------------------------------------------------------------------

    def ensure_host(self) -> None:
        """Bridge, gateway address, MTU, up, ip_forward, NAT and FORWARD rules.

        Only what is missing is added; running it again changes nothing. If a step fails,
        what this call created is removed before the error is raised.
        """
        undo = _Undo()
        # The lease store first: an unusable state_dir fails before the kernel is touched,
        # and the first attach does not pay for creating the database.
        self.leases.open()
        with self._host_lock():
            check_subnet_free(self.backend, self.config)
            try:
                bridge = self._ensure_bridge(undo)
                self._ensure_gateway(bridge, undo)
                self._ensure_ip_forward(undo)
                self._ensure_firewall(undo)
            except BaseException:
                undo.run()
                self._bridge_index = None
                raise
        self._bridge_index = bridge.index

    @contextmanager
    def _host_lock(self) -> Iterator[None]:
        """Serialise host set-up and teardown of every netvm process in this namespace.

        flock() on a file of state_dir: it excludes other processes and, since each call
        opens its own file description, other threads of this process too.
        """
        try:
            self._host_lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = os.open(self._host_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise HostError(
                "open host lock", str(self._host_lock_path), exc.errno or 0, STATE_DIR_HINT
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _ensure_bridge(self, undo: _Undo) -> Link:
        name, mtu = self.config.bridge_name, self.config.mtu
        link = self.backend.get_link(name)
        if link is None:
            self.backend.create_bridge(name, mtu, alias=BRIDGE_ALIAS)
            undo.push(f"delete bridge {name}", lambda: self.backend.delete_link(name))
            log.info("created bridge %s", name)
            link = self.backend.get_link(name)
            if link is None:
                raise host_error("create bridge", name, errno.ENODEV, "it vanished")
        self._check_bridge(link)
        if link.mtu != mtu or not link.up:
            before = link
            self.backend.set_link(name, mtu=mtu, up=True)
            undo.push(
                f"restore {name}", lambda: self.backend.set_link(name, mtu=before.mtu, up=before.up)
            )
        return link

    def _check_bridge(self, link: Link) -> None:
        name = link.name
        if link.kind != "bridge":
            raise ConflictError(
                f"{name} already exists but is not a bridge (kind {link.kind or 'none'}); "
                "netvm does not adopt it: remove it or choose another bridge_name"
            )
        if link.alias != BRIDGE_ALIAS:
            raise ConflictError(
                f"bridge {name} already exists but netvm did not create it "
                f"(its ifalias is {link.alias!r}, not {BRIDGE_ALIAS!r}); netvm does not adopt it: "
                "remove it or choose another bridge_name"
            )

    def _ensure_gateway(self, bridge: Link, undo: _Undo) -> None:
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

    def _ensure_ip_forward(self, undo: _Undo) -> None:
        """Switch ip_forward on, and remember (per namespace) that netvm did."""
        if self.backend.get_ip_forward():
            return
        self.backend.set_ip_forward(True)
        undo.push("switch ip_forward back off", lambda: self.backend.set_ip_forward(False))
        self._ip_forward_flag.touch()
        undo.push("forget ip_forward", lambda: self._ip_forward_flag.unlink(missing_ok=True))

    def _ensure_firewall(self, undo: _Undo) -> None:
        """netvm's rules in the chosen firewall, and in no other (a switch moves them)."""
        chosen = self.choose_firewall()
        policy = self.firewall_policy
        firewall = self.backend.firewall(chosen.kind)
        if firewall.ensure(policy):
            undo.push(
                f"remove netvm's {chosen.kind} rules",
                lambda: firewall.remove(policy.bridge),
            )
        for kind in KINDS:
            other = self.backend.firewall(kind)
            if kind != chosen.kind and other.unavailable() is None:
                other.remove(policy.bridge)

    # VMs --------------------------------------------------------------------------------

    def attach(self, vm_id: str, tap: TapOptions | None = None) -> VmNetwork:
        """Lease an address and put the VM's TAP on the bridge (MTU set, up).

        Attaching a vm_id again returns the same network. If a step fails, the TAP and
        the lease this call created are removed.
        """
        naming.validate_vm_id(vm_id)
        options = tap if tap is not None else TapOptions()
        with self.leases.transaction() as tx:
            lease, _ = tx.acquire(vm_id)
            network = VmNetwork.for_slot(vm_id, self.config.vm_subnet, lease.slot)
            self._ensure_tap(network, options)
        return network

    def _ensure_tap(self, network: VmNetwork, options: TapOptions) -> None:
        name = network.tap_name
        try:
            self.backend.create_tap(name, options)
        except DeviceExists:
            link = self.backend.get_link(name)
            if link is None or link.alias != naming.detaching_alias(
                self.config.bridge_name, network.vm_id
            ):
                self._reuse_tap(network, options, link)
                return
            # A detach of this VM has not deleted its old TAP yet: finish that first.
            self._delete_if_same(link)
            self.backend.create_tap(name, options)
        try:
            self._enslave(name, naming.tap_alias(self.config.bridge_name, network.vm_id))
        except BaseException:
            self._delete_quietly(name)
            raise
        log.debug("attached %s as %s", network.vm_id, name)

    def _reuse_tap(self, network: VmNetwork, options: TapOptions, link: Link | None) -> None:
        """The TAP exists: accept it only if it is this VM's, and mend its settings."""
        if link is None:
            raise host_error("attach", network.tap_name, errno.EAGAIN, "the TAP vanished; retry")
        self._check_tap(link, network.vm_id)
        if link.tap is not None and _fixed_flags(link.tap) != _fixed_flags(options):
            raise ConflictError(
                f"TAP {link.name} of {network.vm_id!r} exists with other flags "
                f"({_describe(link.tap)}) than requested ({_describe(options)}); detach it first"
            )
        bridge = self._bridge()
        if link.master != bridge or link.mtu != self.config.mtu or not link.up:
            self._enslave(link.name, naming.tap_alias(self.config.bridge_name, network.vm_id))

    def _check_tap(self, link: Link, vm_id: str) -> None:
        if link.kind != "tun" or link.alias != naming.tap_alias(self.config.bridge_name, vm_id):
            raise ConflictError(
                f"{link.name} already exists and is not netvm's TAP for {vm_id!r} on "
                f"{self.config.bridge_name} (kind {link.kind or 'none'}, ifalias {link.alias!r}); "
                "netvm leaves it alone: remove it or use another vm_id"
            )

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
            self._check_bridge(link)
            self._bridge_index = link.index
        return self._bridge_index

    def _enslave(self, name: str, alias: str) -> None:
        """One request: master, MTU, up and alias. A cached bridge index is checked on failure."""
        cached = self._bridge_index
        try:
            self.backend.set_link(
                name, master=self._bridge(), mtu=self.config.mtu, up=True, alias=alias
            )
        except HostError as exc:
            if cached is None or exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENODEV):
                raise
            # The bridge may have been deleted and made again (a new index) behind us.
            self._bridge_index = None
            if self._bridge() == cached:
                raise
            self.backend.set_link(
                name, master=self._bridge(), mtu=self.config.mtu, up=True, alias=alias
            )

    def _delete_quietly(self, name: str) -> None:
        try:
            self.backend.delete_link(name)
        except NetvmError as exc:
            log.error("rollback: could not delete %s: %s", name, exc)

    def detach(self, vm_id: str) -> None:
        """Delete the VM's TAP and free its lease; a VM that is already gone is success.

        Deleting a device makes the kernel wait for an RCU grace period (~16 ms), so the
        lease lock is not held for it: inside the lock the TAP is taken down and marked as
        detaching, and the lease is freed; the deletion follows, by ifindex, so that it can
        never hit a TAP that a new attach of the same vm_id made meanwhile.
        """
        naming.validate_vm_id(vm_id)
        name = naming.tap_name(vm_id)
        detaching = naming.detaching_alias(self.config.bridge_name, vm_id)
        with self.leases.transaction() as tx:
            link = self.backend.get_link(name)
            if link is not None and link.alias != detaching:
                self._check_tap(link, vm_id)
                self.backend.set_link(name, up=False, alias=detaching)
            tx.release(vm_id)
        if link is not None:
            self._delete_if_same(link)

    def _delete_if_same(self, link: Link) -> None:
        """Delete `link` if that very device (its ifindex) still exists."""
        try:
            self.backend.delete_link(link.name, index=link.index)
        except HostError as exc:
            if exc.errno != errno.ENODEV:
                raise

    def _ports(self) -> dict[str, Link]:
        bridge = self.backend.get_link(self.config.bridge_name)
        if bridge is None or bridge.kind != "bridge":
            return {}
        return {link.name: link for link in self.backend.list_links(master=bridge.index)}

    def _list(self, tx: LeaseTransaction, ports: dict[str, Link]) -> list[Attachment]:
        result: list[Attachment] = []
        leased: set[str] = set()
        for lease in tx.all():
            leased.add(lease.tap_name)
            link = ports.get(lease.tap_name) or self.backend.get_link(lease.tap_name)
            ours = (
                link is not None
                and naming.vm_id_from_alias(link.alias, self.config.bridge_name) == lease.vm_id
            )
            result.append(
                Attachment(
                    vm_id=lease.vm_id,
                    tap_name=lease.tap_name,
                    network=VmNetwork.for_slot(lease.vm_id, self.config.vm_subnet, lease.slot),
                    tap_present=ours,
                    on_bridge=ours and lease.tap_name in ports,
                )
            )
        for link in ports.values():
            vm_id = naming.vm_id_from_alias(link.alias, self.config.bridge_name)
            if link.kind == "tun" and vm_id is not None and link.name not in leased:
                result.append(Attachment(vm_id, link.name, None, True, True))
        return result

    def gc(self, keep: Iterable[str] = ()) -> list[str]:
        """Detach every VM of this bridge whose vm_id is not in `keep`; return their vm_ids.

        The TAPs are deleted in one kernel request.
        """
        kept = set(naming.validate_vm_ids("keep", keep))
        with self.leases.transaction() as tx:
            ports = self._ports()
            doomed = [a for a in self._list(tx, ports) if a.vm_id not in kept]
            # TAPs a detach marked but did not get to delete (it was interrupted) go too.
            prefix = naming.detaching_alias(self.config.bridge_name, "")
            unfinished = [n for n, link in ports.items() if (link.alias or "").startswith(prefix)]
            self.backend.delete_links([a.tap_name for a in doomed if a.tap_present] + unfinished)
            for attachment in doomed:
                tx.release(attachment.vm_id)
        return sorted(a.vm_id for a in doomed)

    def teardown_host(self) -> None:
        """Remove every netvm TAP of this bridge, netvm's rules and chains, and the bridge
        if netvm created it. Nothing that is not netvm's is touched; running it on a clean
        host is success.
        """
        with self._host_lock():
            self._teardown_host()

    def _teardown_host(self) -> None:
        self.gc(keep=())
        problems: list[str] = []
        for kind in KINDS:
            firewall = self.backend.firewall(kind)
            if firewall.unavailable() is None:
                problems += firewall.remove(self.config.bridge_name)
        bridge = self.backend.get_link(self.config.bridge_name)
        if bridge is not None and bridge.kind == "bridge" and bridge.alias == BRIDGE_ALIAS:
            others = self.backend.list_links(master=bridge.index)
            if others:
                names = ", ".join(link.name for link in others)
                problems.append(f"bridge {bridge.name} kept: ports netvm did not create: {names}")
            else:
                self.backend.delete_link(bridge.name)
        self._bridge_index = None
        self._teardown_ip_forward()
        if problems:
            raise ConflictError("teardown incomplete: " + "; ".join(problems))

    def _teardown_ip_forward(self) -> None:
        """Switch ip_forward off only if netvm switched it on and no netvm bridge is left
        in the namespace (whichever bridge's set-up switched it on)."""
        if not self._ip_forward_flag.exists():
            return
        if any(link.alias == BRIDGE_ALIAS for link in self.backend.list_links()):
            return
        if self.backend.get_ip_forward():
            self.backend.set_ip_forward(False)
        self._ip_forward_flag.unlink(missing_ok=True)

    # Defined last: inside the class body, the name `list` is this method from here on.
    def list(self) -> list[Attachment]:
        """Every VM of this bridge: leased ones, and netvm TAPs on the bridge without a lease."""
        with self.leases.transaction() as tx:
            return self._list(tx, self._ports())
