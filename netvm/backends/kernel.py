"""KernelBackend: rtnetlink through pyroute2, TAPs through ioctls, netfilter through a Firewall.

Everything runs on one NamespaceThread, so the backend acts in the namespace it was given
(or the caller's) whatever thread calls it. Kernel errors become netvm errors here and in
the Firewall implementation, nowhere else.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netvm.backends.base import Address, Firewall, Link, Rule, TapOptions
from netvm.backends.iptables import IptablesFirewall
from netvm.backends.netns import NamespaceThread
from netvm.backends.tun import create_persistent_tap
from netvm.errors import host_error

T = TypeVar("T")
IFF_UP = 0x1
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


@contextmanager
def _kernel_errors(operation: str, device: str | None) -> Iterator[None]:
    """Translate pyroute2's and the OS's errors into netvm's, in one place."""
    try:
        yield
    except NetlinkError as exc:
        raise host_error(
            operation, device, exc.code, str(exc.args[1:][0]) if exc.args[1:] else ""
        ) from None
    except OSError as exc:
        raise host_error(operation, device, exc.errno or errno.EIO) from None


def _to_link(msg: Any) -> Link:
    kind: str | None = None
    tap: TapOptions | None = None
    info = msg.get_attr("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND")
        data = info.get_attr("IFLA_INFO_DATA")
        if kind == "tun" and data is not None:
            tap = TapOptions(
                owner=data.get_attr("IFLA_TUN_OWNER"),
                group=data.get_attr("IFLA_TUN_GROUP"),
                multi_queue=bool(data.get_attr("IFLA_TUN_MULTI_QUEUE")),
                vnet_hdr=bool(data.get_attr("IFLA_TUN_VNET_HDR")),
            )
    master = msg.get_attr("IFLA_MASTER")
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        master=master or None,
        mtu=msg.get_attr("IFLA_MTU"),
        up=bool(msg["flags"] & IFF_UP),
        alias=msg.get_attr("IFLA_IFALIAS") or None,
        tap=tap,
    )


class KernelBackend:
    """The real kernel, in the network namespace `netns` (a name under /run/netns or a path).

    `netns=None` acts in the namespace of the process. `firewall` is the netfilter
    implementation (python-iptables unless given); it is created on first use.
    """

    def __init__(
        self, netns: str | None = None, firewall_factory: Callable[[], Firewall] | None = None
    ) -> None:
        self.netns = netns
        self._firewall_factory = firewall_factory or IptablesFirewall
        self._firewall: Firewall | None = None
        self._ipr: Any = None
        self._thread = NamespaceThread(netns, setup=self._open)

    def _open(self) -> None:
        with _kernel_errors("open rtnetlink socket", self.netns):
            self._ipr = IPRoute()

    def _call(self, fn: Callable[[], T]) -> T:
        return self._thread.call(fn)

    @property
    def firewall(self) -> Firewall:
        """The Firewall, made on the namespace thread on first use (it loads libiptc)."""

        def make() -> Firewall:
            if self._firewall is None:
                self._firewall = self._firewall_factory()
            return self._firewall

        return self._call(make)

    # Links ------------------------------------------------------------------------------

    def get_link(self, name: str) -> Link | None:
        def run() -> Link | None:
            try:
                return _to_link(self._ipr.link("get", ifname=name)[0])
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    return None
                raise host_error("get link", name, exc.code) from None

        return self._call(run)

    def list_links(self, master: int | None = None) -> list[Link]:
        def run() -> list[Link]:
            with _kernel_errors("list links", None):
                if master is None:
                    messages = self._ipr.link("dump")
                else:
                    messages = self._ipr.link("dump", master=master)
                links = [_to_link(m) for m in messages]
            return [link for link in links if master is None or link.master == master]

        return self._call(run)

    def create_bridge(self, name: str, mtu: int, alias: str | None = None) -> None:
        def run() -> None:
            with _kernel_errors("create bridge", name):
                self._ipr.link("add", ifname=name, kind="bridge", mtu=mtu)
            if alias is not None:
                with _kernel_errors("set bridge alias", name):
                    self._ipr.link("set", ifname=name, ifalias=alias)

        self._call(run)

    def create_tap(self, name: str, options: TapOptions) -> None:
        self._call(lambda: create_persistent_tap(name, options))

    def set_link(
        self,
        name: str,
        *,
        master: int | None = None,
        mtu: int | None = None,
        up: bool | None = None,
        alias: str | None = None,
    ) -> None:
        request: dict[str, Any] = {}
        if master is not None:
            request["master"] = master
        if mtu is not None:
            request["mtu"] = mtu
        if up is not None:
            request["state"] = "up" if up else "down"
        if alias is not None:
            request["ifalias"] = alias

        def run() -> None:
            with _kernel_errors("set link", name):
                self._ipr.link("set", ifname=name, **request)

        self._call(run)

    def delete_link(self, name: str) -> None:
        def run() -> None:
            with _kernel_errors("delete link", name):
                self._ipr.link("del", ifname=name)

        self._call(run)

    def delete_links(self, names: Sequence[str]) -> None:
        """Move the links into a link group no device uses, then delete that group.

        The kernel unregisters a whole group in one batch, paying one RCU grace period
        (~17 ms here) instead of one per device.
        """
        if not names:
            return

        def run() -> None:
            with _kernel_errors("list links", None):
                used = {m.get_attr("IFLA_GROUP") for m in self._ipr.link("dump")}
            group = random.randrange(1 << 20, 1 << 31)
            while group in used:
                group = random.randrange(1 << 20, 1 << 31)
            moved = 0
            for name in names:
                try:
                    self._ipr.link("set", ifname=name, group=group)
                    moved += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise host_error("group link for deletion", name, exc.code) from None
            if moved:
                with _kernel_errors("delete links", ",".join(names)):
                    self._ipr.link("del", group=group)

        self._call(run)

    # Addresses --------------------------------------------------------------------------

    def list_addresses(self, index: int | None = None) -> list[Address]:
        def run() -> list[Address]:
            with _kernel_errors("list addresses", None):
                query: dict[str, Any] = {"family": socket.AF_INET}
                if index is not None:
                    query["index"] = index
                messages = self._ipr.addr("dump", **query)
                return [
                    Address(
                        m["index"],
                        ipaddress.IPv4Interface(
                            (m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"), m["prefixlen"])
                        ),
                    )
                    for m in messages
                    if index is None or m["index"] == index
                ]

        return self._call(run)

    def add_address(self, index: int, interface: ipaddress.IPv4Interface) -> None:
        def run() -> None:
            with _kernel_errors("add address " + str(interface), f"index {index}"):
                self._ipr.addr(
                    "add",
                    index=index,
                    address=str(interface.ip),
                    prefixlen=interface.network.prefixlen,
                )

        self._call(run)

    def delete_address(self, index: int, interface: ipaddress.IPv4Interface) -> None:
        def run() -> None:
            with _kernel_errors("delete address " + str(interface), f"index {index}"):
                self._ipr.addr(
                    "del",
                    index=index,
                    address=str(interface.ip),
                    prefixlen=interface.network.prefixlen,
                )

        self._call(run)

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

    # Firewall ---------------------------------------------------------------------------

    def list_chains(self, table: str) -> list[str]:
        return self._call(lambda: self.firewall.list_chains(table))

    def create_chain(self, table: str, chain: str) -> None:
        self._call(lambda: self.firewall.create_chain(table, chain))

    def delete_chain(self, table: str, chain: str) -> None:
        self._call(lambda: self.firewall.delete_chain(table, chain))

    def list_rules(self, table: str, chain: str) -> list[Rule]:
        return self._call(lambda: self.firewall.list_rules(table, chain))

    def insert_rule(self, table: str, chain: str, rule: Rule, position: int = 0) -> None:
        self._call(lambda: self.firewall.insert_rule(table, chain, rule, position))

    def delete_rule(self, table: str, chain: str, rule: Rule) -> None:
        self._call(lambda: self.firewall.delete_rule(table, chain, rule))

    def close(self) -> None:
        def run() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        self._call(run)
        self._thread.stop()
