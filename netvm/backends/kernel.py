"""KernelBackend: rtnetlink on a raw socket, TAPs through ioctls, netfilter through a Firewall.

Every socket and descriptor is opened on one NamespaceThread, so the backend acts in the
namespace it was given (or the caller's) whatever thread calls it. What only needs an
already-open descriptor runs in the calling thread, without a hop to that thread: a netlink
socket and a /dev/net/tun descriptor act in the namespace they were opened in. That keeps
an attach to one SQLite transaction, two ioctls and two netlink requests. ip_forward (a
/proc file) and the firewall (libiptc handles) run on the namespace thread. Kernel errors
become netvm errors here and in the Firewall implementation, nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar, cast

from netvm.backends import rtnl
from netvm.backends.base import (
    Address,
    BridgeOptions,
    Link,
    LinkChange,
    LinkSetting,
    Rule,
    TapOptions,
)
from netvm.backends.netns import NamespaceThread
from netvm.backends.rtnl import LinkInfo, Rtnl, RtnlError
from netvm.backends.tun import create_persistent_tap, open_tun
from netvm.errors import Closed, HostError, NetvmError, UsedAfterFork, host_error

if TYPE_CHECKING:
    # Imported where used: python-iptables, libnftables and the firewall modules cost a
    # command that does not touch them tens of milliseconds (docs/performance.md).
    from netvm.backends.conntrack import Conntrack
    from netvm.backends.iptables import IptablesFirewall
    from netvm.firewall.model import Firewall, FirewallKind
    from netvm.firewall.nftables import NftablesFirewall

T = TypeVar("T")
log = logging.getLogger("netvm")
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
LEGACY_TABLE_NAMES = "/proc/thread-self/net/ip_tables_names"
"""/proc/net is the namespace of the process; /proc/thread-self/net that of the thread."""
TUN_POOL = 16
"""/dev/net/tun descriptors opened per hop to the namespace thread, used by later create_tap."""


@contextmanager
def _kernel_errors(operation: str, device: str | None) -> Iterator[None]:
    """Translate the kernel's errors into netvm's, in one place."""
    try:
        yield
    except RtnlError as exc:
        raise host_error(operation, device, exc.errno or errno.EIO, exc.message) from None
    except OSError as exc:
        raise host_error(operation, device, exc.errno or errno.EIO) from None


def _to_link(info: LinkInfo) -> Link:
    tap = None
    if info.tun is not None:
        owner, group, multi_queue, vnet_hdr = info.tun
        tap = TapOptions(owner=owner, group=group, multi_queue=multi_queue, vnet_hdr=vnet_hdr)
    return Link(
        index=info.index,
        name=info.name,
        kind=info.kind,
        master=info.master,
        mtu=info.mtu,
        up=info.up,
        alias=info.alias,
        tap=tap,
        isolated=info.isolated,
        group=info.group,
        bridge=None if info.bridge is None else BridgeOptions(*info.bridge),
        accept_ra=info.accept_ra,
        address=info.address,
    )


def _delete_group(rtnl: Rtnl, group: int) -> None:
    try:
        with _kernel_errors("delete link group", str(group)):
            rtnl.delete_group(group)
    except HostError as exc:
        if exc.errno != errno.ENODEV:  # no device in the group (any more)
            raise


class KernelGroupDeleter:
    """One netlink socket of a namespace, for the reaper's thread (netvm/reaper.py)."""

    def __init__(self, rtnl: Rtnl) -> None:
        self._rtnl = rtnl

    def link_groups(self) -> set[int]:
        with _kernel_errors("list links", None):
            return self._rtnl.dump_groups()

    def delete_group(self, group: int) -> None:
        _delete_group(self._rtnl, group)

    def close(self) -> None:
        self._rtnl.close()


class KernelBackend:
    """The real kernel, in the network namespace `netns` (a name under /run/netns or a path).

    `netns=None` acts in the namespace of the process. The firewalls (nftables through
    libnftables, legacy xtables through python-iptables) are made on first use.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._pid = os.getpid()
        self._iptc: IptablesFirewall | None = None
        self._firewalls: dict[FirewallKind, Firewall] = {}
        self._rtnl: Rtnl | None = None
        self._conntrack: Conntrack | None = None
        self._no_conntrack = False
        self._namespace_inode = 0
        self._tun_fds: list[int] = []
        self._tun_lock = threading.Lock()
        self._thread = NamespaceThread(netns, setup=self._open)

    def _open(self) -> None:
        with _kernel_errors("open rtnetlink socket", self.netns):
            self._rtnl = Rtnl()
            self._namespace_inode = os.stat("/proc/thread-self/ns/net").st_ino

    def namespace_id(self) -> str:
        """`net<inode>` of the namespace, as in /proc/PID/ns/net: the same whichever name
        or path reached it."""
        return f"net{self._namespace_inode}"

    def _check_process(self) -> None:
        """The sockets and pooled descriptors are the process's that made them."""
        if self._pid != os.getpid():
            raise UsedAfterFork(f"the KernelBackend of {self.netns or 'this namespace'}", self._pid)

    @property
    def rtnl(self) -> Rtnl:
        self._check_process()
        if self._rtnl is None:
            raise Closed(f"the KernelBackend of {self.netns or 'this namespace'}")
        return self._rtnl

    def _call(self, fn: Callable[[], T]) -> T:
        self._check_process()
        return self._thread.call(fn)

    @property
    def iptc(self) -> IptablesFirewall:
        """The legacy tables' primitives, made on the namespace thread (it loads libiptc)."""

        def make() -> IptablesFirewall:
            from netvm.backends.iptables import IptablesFirewall

            if self._iptc is None:
                self._iptc = IptablesFirewall()
            return self._iptc

        return self._call(make)

    def firewall(self, kind: FirewallKind) -> Firewall:
        """The firewall seam of `kind` in this namespace."""
        found = self._firewalls.get(kind)
        if found is None:
            if kind == "nftables":
                from netvm.firewall.elements import KernelElements
                from netvm.firewall.libnftables import KernelNftRunner, binding_unavailable
                from netvm.firewall.nftables import NftablesFirewall

                found = NftablesFirewall(
                    KernelNftRunner(self._call), binding_unavailable, KernelElements(self._call)
                )
            else:
                from netvm.firewall.xtables import XtablesFirewall

                found = XtablesFirewall(self)
            self._firewalls[kind] = found
        return found

    # Links ------------------------------------------------------------------------------

    def get_link(self, name: str) -> Link | None:
        try:
            return _to_link(self.rtnl.get_link(name))
        except RtnlError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise host_error("get link", name, exc.errno or errno.EIO, exc.message) from None

    def list_links(self, master: int | None = None) -> list[Link]:
        with _kernel_errors("list links", None):
            return [_to_link(info) for info in self.rtnl.dump_links(master)]

    def create_bridge(
        self,
        name: str,
        mtu: int,
        alias: str | None = None,
        group: int = 0,
        options: BridgeOptions | None = None,
    ) -> None:
        """Create (in `group`, with `options`), then set MTU, alias and group 0 in a second
        request.

        The kernel takes no ifalias at creation, and an MTU given at creation is not
        recorded as chosen by the user, so the bridge would follow its ports' MTUs (and
        fall back to 1500 with no port); set afterwards, it stays.
        """
        info = None
        if options is not None:
            info = rtnl.bridge_data(
                options.group_fwd_mask,
                options.no_linklocal_learn,
                options.stp,
                options.fdb_max_learned,
            )
        with _kernel_errors("create bridge", name):
            self.rtnl.create_link(name, "bridge", info, group or None)
        try:
            with _kernel_errors("set bridge mtu and alias", name):
                self.rtnl.set_link(name, mtu=mtu, alias=alias, group=0 if group else None)
        except BaseException:
            # Without its alias the bridge would look like someone else's: it must not
            # outlive this call.
            with contextlib.suppress(RtnlError, OSError):
                self.rtnl.delete_link(name)
            raise

    def set_bridge_options(self, name: str, options: BridgeOptions) -> None:
        with _kernel_errors("set bridge options", name):
            self.rtnl.set_bridge(
                name,
                options.group_fwd_mask,
                options.no_linklocal_learn,
                options.stp,
                options.fdb_max_learned,
            )

    def forget_connections(self, address: ipaddress.IPv4Address) -> None:
        """conntrack.py: the entries whose original or reply source is `address`; a kernel
        without ctnetlink has nothing netvm can delete (said once)."""
        self._check_process()
        if self._no_conntrack:
            return
        if self._conntrack is None:

            def open_socket() -> Conntrack:
                from netvm.backends.conntrack import Conntrack

                return Conntrack()

            try:
                self._conntrack = self._call(open_socket)
            except OSError as exc:  # no nfnetlink in this kernel
                self._without_conntrack(exc.strerror or str(exc))
                return
        with _kernel_errors("delete the connections of " + str(address), None):
            if self._conntrack.forget(address) is None:
                self._without_conntrack("ctnetlink refuses the filter and the dump")

    def _without_conntrack(self, why: str) -> None:
        self._no_conntrack = True
        log.warning(
            "the kernel's connection tracking cannot be asked (%s): a VM given a detached "
            "VM's address may receive that VM's flows until their entries expire",
            why,
        )

    def set_accept_ra(self, name: str, value: int) -> None:
        path = f"/proc/sys/net/ipv6/conf/{name}/accept_ra"

        def run() -> None:
            # The path is looked up in the namespace of the thread that opens it.
            with _kernel_errors("set accept_ra", name), open(path, "w") as conf:
                conf.write(f"{value}\n")

        self._call(run)

    def _tun_fd(self) -> int:
        """A /dev/net/tun descriptor opened in the namespace (a hop only every TUN_POOL)."""
        self._check_process()
        with self._tun_lock:
            if not self._tun_fds:
                self._tun_fds = self._call(lambda: [open_tun() for _ in range(TUN_POOL)])
            return self._tun_fds.pop()

    def create_tap(self, name: str, options: TapOptions) -> int:
        create_persistent_tap(name, options, self._tun_fd())
        # Check that the TAP is in the namespace of the socket (the pooled descriptor's).
        # Measured on Linux 6.18 (cause not identified), this RTM_GETLINK of the new TAP
        # also makes the next RTM_NEWLINK (enslave, up) cheaper by more than its ~45 us:
        # TAP + lookup + enslave took 0.30 -> 0.47 ms from 0 to 1000 bridge ports, against
        # 0.32 -> 0.75 ms without it (docs/performance.md). A lookup of another device or
        # a pause of the same length does not do it.
        try:
            with _kernel_errors("create tap", name):
                return self.rtnl.get_link(name).index
        except BaseException:
            # The TAP is persistent: it must not outlive a failed create_tap.
            with contextlib.suppress(RtnlError, OSError):
                self.rtnl.delete_link(name)
            raise

    def create_taps(self, names: Sequence[str], options: TapOptions) -> dict[str, HostError]:
        """The ioctls of every TAP back to back, on descriptors opened in one hop."""
        self._check_process()
        with self._tun_lock:
            short = len(names) - len(self._tun_fds)
            if short > 0:
                count = short + TUN_POOL
                self._tun_fds += self._call(lambda: [open_tun() for _ in range(count)])
            fds = [self._tun_fds.pop() for _ in names]
        failed: dict[str, HostError] = {}
        for name, fd in zip(names, fds, strict=True):
            try:
                create_persistent_tap(name, options, fd)
            except HostError as exc:
                failed[name] = exc
        # As create_tap: a look-up of each new TAP checks its namespace, and makes the
        # enslave that follows cheaper (at N = 1000: the pipelined enslaves 0.61 -> 0.26 s
        # for 5 ms of look-ups; measured, cause not identified, docs/performance.md).
        for name in names:
            if name in failed:
                continue
            try:
                with _kernel_errors("create tap", name):
                    self.rtnl.get_link(name)
            except HostError as exc:
                with contextlib.suppress(RtnlError, OSError):
                    self.rtnl.delete_link(name)
                failed[name] = exc
        return failed

    def set_links(self, changes: Sequence[LinkSetting]) -> dict[str, HostError]:
        errors: dict[str, HostError] = {}
        unknown = [c.name for c in changes if c.isolated is not None and not c.index]
        if unknown:  # the port isolation goes by index: look the devices up, in one trip
            with _kernel_errors("get links", ",".join(unknown)):
                found = self.rtnl.get_links(unknown)
            indexed = []
            for change in changes:
                if change.isolated is None or change.index:
                    indexed.append(change)
                elif change.name in found:
                    indexed.append(replace(change, index=found[change.name].index))
                else:
                    errors[change.name] = host_error("set link", change.name, errno.ENODEV)
            changes = indexed
        with _kernel_errors("set links", None):
            failed = self.rtnl.set_links(changes)
        for name, code, message in failed:  # a device's first error (its enslave's)
            errors.setdefault(name, host_error("set link", name, code, message))
        return errors

    def set_link(
        self,
        name: str,
        *,
        index: int | None = None,
        master: int | None = None,
        mtu: int | None = None,
        up: bool | None = None,
        alias: str | None = None,
        isolated: bool | None = None,
        group: int | None = None,
        address: bytes | None = None,
    ) -> None:
        if isolated is None:
            with _kernel_errors("set link", name):
                self.rtnl.set_link(
                    name,
                    index=index,
                    master=master,
                    mtu=mtu,
                    up=up,
                    alias=alias,
                    group=group,
                    address=address,
                )
            return
        if address is not None:
            raise ValueError("set_link: address and isolated in one call")
        change = LinkSetting(name, index, master, mtu, up, alias, isolated, group)
        failed = self.set_links([change])
        if failed:
            raise failed[name]

    def set_port_isolated(self, name: str, isolated: bool) -> None:
        with _kernel_errors("set port isolation", name):
            self.rtnl.set_port_isolated(self.rtnl.get_link(name).index, isolated)

    def delete_link(self, name: str, index: int | None = None) -> None:
        with _kernel_errors("delete link", name):
            self.rtnl.delete_link(name, index)

    def delete_links(self, names: Sequence[str]) -> None:
        """Move the links into a link group no device uses, then delete that group.

        The kernel unregisters a whole group in one batch, paying one RCU grace period
        (~17 ms here) instead of one per device. The moves go several per datagram.
        """
        if not names:
            return
        with _kernel_errors("list links", None):
            used = self.rtnl.dump_groups()
        group = random.randrange(1 << 20, 1 << 31)
        while group in used:
            group = random.randrange(1 << 20, 1 << 31)
        with _kernel_errors("group links for deletion", ",".join(names)):
            failed = self.rtnl.set_groups(names, group)
        errors = [(name, code) for name, code in failed if code != errno.ENODEV]
        if len(failed) < len(names):
            with _kernel_errors("delete links", ",".join(names)):
                self.rtnl.delete_group(group)
        if errors:
            name, code = errors[0]
            raise host_error("group link for deletion", name, code)

    def get_links(self, names: Sequence[str]) -> dict[str, Link]:
        with _kernel_errors("get links", ",".join(names)):
            return {name: _to_link(info) for name, info in self.rtnl.get_links(names).items()}

    def change_links(self, changes: Sequence[LinkChange]) -> list[tuple[LinkChange, int]]:
        with _kernel_errors("set links", ",".join(str(c.index) for c in changes)):
            failed = self.rtnl.change_links(changes)
        return [(changes[at], code) for at, code in failed]

    def link_groups(self) -> set[int]:
        with _kernel_errors("list links", None):
            return self.rtnl.dump_groups()

    def delete_group(self, group: int) -> None:
        _delete_group(self.rtnl, group)

    def deleter(self) -> KernelGroupDeleter:
        """A netlink socket of its own, opened in the namespace (on its thread)."""
        with _kernel_errors("open rtnetlink socket", self.netns):
            return KernelGroupDeleter(self._call(Rtnl))

    # Addresses --------------------------------------------------------------------------

    def list_addresses(self, index: int | None = None) -> list[Address]:
        with _kernel_errors("list addresses", None):
            found = self.rtnl.dump_addresses()
        return [
            Address(at, ipaddress.IPv4Interface((address, prefixlen)))
            for at, address, prefixlen in found
            if index is None or at == index
        ]

    def add_address(self, index: int, interface: ipaddress.IPv4Interface) -> None:
        with _kernel_errors("add address " + str(interface), f"index {index}"):
            self.rtnl.change_address(True, index, str(interface.ip), interface.network.prefixlen)

    def delete_address(self, index: int, interface: ipaddress.IPv4Interface) -> None:
        with _kernel_errors("delete address " + str(interface), f"index {index}"):
            self.rtnl.change_address(False, index, str(interface.ip), interface.network.prefixlen)

    def forget_neighbour(self, index: int, address: ipaddress.IPv4Address) -> None:
        with _kernel_errors("delete neighbour " + str(address), f"index {index}"):
            self.rtnl.delete_neighbour(index, str(address))

    # Read-only views for `doctor` -------------------------------------------------------

    def read_proc(self, path: str) -> str | None:
        """A file of /proc/sys/net or /proc/thread-self/net as this namespace has it."""
        if not path.startswith(("/proc/sys/net/", "/proc/thread-self/net/")):
            raise ValueError(f"not a per-namespace /proc path: {path}")

        def run() -> str | None:
            try:
                with open(path) as file:
                    return file.read()
            except OSError:
                return None

        return self._call(run)

    def legacy_policy(self, table: str, chain: str) -> str:
        return self._call(lambda: self.iptc.policy(table, chain))

    # ip_forward -------------------------------------------------------------------------

    def get_ip_forward(self) -> bool:
        def run() -> bool:
            with _kernel_errors("read", IP_FORWARD), open(IP_FORWARD) as switch:
                return switch.read().strip() == "1"

        return self._call(run)

    def set_ip_forward(self, enabled: bool) -> None:
        def run() -> None:
            with _kernel_errors("write", IP_FORWARD), open(IP_FORWARD, "w") as switch:
                switch.write("1\n" if enabled else "0\n")

        self._call(run)

    # Legacy xtables tables --------------------------------------------------------------

    def xtables_unavailable(self) -> str | None:
        from netvm.backends.iptc_compat import load_iptc

        try:
            load_iptc()
        except NetvmError as exc:
            return str(exc)
        return None

    def legacy_tables(self) -> set[str]:
        def run() -> set[str]:
            try:
                with open(LEGACY_TABLE_NAMES) as names:
                    return {line.strip() for line in names if line.strip()}
            except FileNotFoundError:
                return set()  # the kernel has no legacy ip_tables at all
            except OSError as exc:  # EACCES without root: the file is the kernel's 0440
                raise host_error(
                    "read the legacy xtables tables", LEGACY_TABLE_NAMES, exc.errno or errno.EIO
                ) from None

        return self._call(run)

    def legacy_in_use(self) -> bool:
        tables = self.legacy_tables()
        if not tables:
            return False

        def run() -> bool:
            from netvm.backends.iptables import TableReader

            reader = TableReader()
            try:
                return any(reader.holds_rules(table) for table in tables)
            finally:
                reader.close()

        return self._call(run)

    def list_chains(self, table: str) -> list[str]:
        return self._call(lambda: self.iptc.list_chains(table))

    def create_chain(self, table: str, chain: str) -> None:
        self._call(lambda: self.iptc.create_chain(table, chain))

    def delete_chain(self, table: str, chain: str) -> None:
        self._call(lambda: self.iptc.delete_chain(table, chain))

    def list_rules(self, table: str, chain: str) -> list[Rule]:
        return self._call(lambda: self.iptc.list_rules(table, chain))

    def insert_rule(self, table: str, chain: str, rule: Rule, position: int = 0) -> None:
        self._call(lambda: self.iptc.insert_rule(table, chain, rule, position))

    def delete_rule(self, table: str, chain: str, rule: Rule) -> None:
        self._call(lambda: self.iptc.delete_rule(table, chain, rule))

    def close(self) -> None:
        if self._pid != os.getpid():
            return  # a forked child's copy: the sockets and descriptors are the parent's
        if self._iptc is not None:
            self._call(self._iptc.close)
        nft = self._firewalls.get("nftables")
        if nft is not None:
            cast("NftablesFirewall", nft).close()
        with self._tun_lock:
            for fd in self._tun_fds:
                os.close(fd)
            self._tun_fds = []
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None
        if self._conntrack is not None:
            self._conntrack.close()
            self._conntrack = None
        self._thread.stop()
