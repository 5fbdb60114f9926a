"""The guest emulator: a VM's network stack behind a TAP that attach() made."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute

from netvm.backends.base import TapOptions
from netvm.backends.tun import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TUN_DEVICE,
    TUNSETIFF,
    ifreq,
    tap_flags,
)
from netvm.config import IFNAMSIZ
from netvm.errors import host_error
from netvm.naming import VmNetwork, format_mac
from netvm.testing.namespaces import T, create_netns, delete_netns, run_in_netns
from netvm.testing.probes import allow_ping, ping, udp_request, up_loopback

# The guest emulator ----------------------------------------------------------------------

GUEST_IFACE = "eth0"
TUNGETIFF = 0x800454D2
IFF_PERSIST = 0x0800
MAX_FRAME = 65536
IFF_UP_FLAG = 0x1
BR_STATE_FORWARDING = 3


def _open_tap(name: str, flags: int) -> int:
    """Open (attach to) a TAP in the calling thread's namespace; return the descriptor."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifreq(name, flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _attach_host_tap(name: str, flags: int) -> int:
    """Attach to an existing persistent TAP as a VMM does (no IFF_TUN_EXCL).

    TUNSETIFF on a name that does not exist would create a new TAP; that one is closed
    (which deletes it) and NotFound is raised, so a missing TAP is never papered over.
    """
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise host_error("attach to tap", name, errno.ENODEV, "no such TAP") from None
    try:
        fd = _open_tap(name, flags)
    except OSError as exc:
        raise host_error("attach to tap", name, exc.errno or errno.EIO) from None
    answer = fcntl.ioctl(fd, TUNGETIFF, ifreq(name, 0))
    (got,) = struct.unpack_from("H", answer, IFNAMSIZ)
    if not got & IFF_PERSIST:
        os.close(fd)
        raise host_error("attach to tap", name, errno.ENODEV, "it vanished")
    return fd


def wait_until_passing(name: str, timeout: float = 3.0) -> None:
    """Wait until the kernel has acted on the TAP's carrier-on (bounded by `timeout`).

    Opening a TAP turns its carrier on at once, but the kernel applies that (operstate, qdisc
    activation, bridge port state) from its link-watch work, which it runs at most once a
    second for all namespaces: until then the host drops the guest's first frames. A TAP
    that is administratively down is not waited for. The same holds for a veth's carrier
    (internet_topology waits for both ends). In the calling thread's namespace.
    """
    deadline = time.monotonic() + timeout
    with IPRoute() as ipr:
        while time.monotonic() < deadline:
            (link,) = ipr.link("get", ifname=name)
            if not link["flags"] & IFF_UP_FLAG:
                return
            if link.get_attr("IFLA_OPERSTATE") == "UP":
                if not link.get_attr("IFLA_MASTER"):
                    return
                states = [
                    info.get_attr("IFLA_BRPORT_STATE")
                    for port in ipr.brport("show", index=link["index"])
                    if (info := port.get_attr("IFLA_PROTINFO")) is not None
                ]
                if all(state == BR_STATE_FORWARDING for state in states):
                    return
            time.sleep(0.005)


class GuestEmulator:
    """Plays the VM behind a netvm TAP, with a real kernel network stack for the guest.

    A fresh "guest" namespace gets a TAP named eth0 configured as the guest kernel would
    configure it from `network.kernel_ip_arg()`: address/prefix, default route via the
    gateway, MAC `network.guest_mac` (or `mac`), MTU `mtu`. A pump thread moves frames
    between that TAP and the host TAP `network.tap_name` in `host_netns`, which it opens the
    way a VMM does. Ordinary sockets, ARP and ICMP in `netns` then behave as in the VM.

    Use it as a context manager; the namespace, both descriptors and the thread are gone
    after `close()`. If netvm deletes the host TAP meanwhile (detach), `host_lost` becomes
    True and the guest's frames go nowhere, as in a VM whose TAP was removed.
    """

    def __init__(
        self,
        network: VmNetwork,
        host_netns: str | None,
        *,
        mtu: int = 1500,
        mac: bytes | None = None,
        tap: TapOptions | None = None,
        prefix: str = "netvm-guest-",
    ) -> None:
        options = tap if tap is not None else TapOptions()
        if options.vnet_hdr:
            raise ValueError("a TAP with vnet_hdr is not supported by the guest emulator")
        self.network = network
        self.host_netns = host_netns
        self.mtu = mtu
        self.mac = network.guest_mac if mac is None else mac
        self.netns = f"{prefix}{secrets.token_hex(4)}"
        self.frames_to_host = 0
        self.frames_to_guest = 0
        self.host_lost = False
        self._host_flags = tap_flags(options) & ~IFF_VNET_HDR
        self._guest_fd: int | None = None
        self._host_fd: int | None = None
        self._stop: int | None = None
        self._pump: threading.Thread | None = None
        self._created = False

    # Life cycle ---------------------------------------------------------------------------

    def start(self) -> GuestEmulator:
        try:
            create_netns(self.netns)
            self._created = True
            self._guest_fd = run_in_netns(self.netns, self._configure_guest)
            self._host_fd = run_in_netns(
                self.host_netns, lambda: _attach_host_tap(self.network.tap_name, self._host_flags)
            )
            run_in_netns(self.host_netns, lambda: wait_until_passing(self.network.tap_name))
            self._stop = os.eventfd(0, os.EFD_CLOEXEC)
            self._pump = threading.Thread(
                target=self._run_pump, name=f"netvm-pump-{self.network.tap_name}", daemon=True
            )
            self._pump.start()
        except BaseException:
            self.close()
            raise
        return self

    def _configure_guest(self) -> int:
        allow_ping()
        net = self.network
        fd = _open_tap(GUEST_IFACE, IFF_TAP | IFF_NO_PI)
        try:
            ipr = IPRoute()
            try:
                up_loopback(ipr)
                index = ipr.link_lookup(ifname=GUEST_IFACE)[0]
                ipr.link("set", index=index, address=format_mac(self.mac), mtu=self.mtu, state="up")
                ipr.addr("add", index=index, address=str(net.guest_ip), prefixlen=net.prefixlen)
                ipr.route("add", dst="0.0.0.0/0", gateway=str(net.gateway_ip))
            finally:
                ipr.close()
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """Stop the pump, close both TAP descriptors, delete the guest namespace."""
        try:
            if self._pump is not None and self._stop is not None:
                os.eventfd_write(self._stop, 1)
                self._pump.join()
            self._pump = None
        finally:
            for attr in ("_host_fd", "_guest_fd", "_stop"):
                fd = getattr(self, attr)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(self, attr, None)
            if self._created:
                delete_netns(self.netns)
                self._created = False

    def __enter__(self) -> GuestEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # The pump -----------------------------------------------------------------------------

    def _run_pump(self) -> None:
        guest, host, stop = self._guest_fd, self._host_fd, self._stop
        assert guest is not None
        assert host is not None
        assert stop is not None
        poller = select.poll()
        for fd in (guest, host, stop):
            poller.register(fd, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == stop:
                    return
                if fd == host:
                    if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        self._lose_host(poller, host)
                        continue
                    frame = self._read(host)
                    if frame is None:
                        self._lose_host(poller, host)
                    elif self._write(guest, frame):
                        self.frames_to_guest += 1
                else:
                    frame = self._read(guest)
                    if frame is not None and not self.host_lost and self._write(host, frame):
                        self.frames_to_host += 1

    def _lose_host(self, poller: select.poll, host: int) -> None:
        self.host_lost = True
        poller.unregister(host)

    @staticmethod
    def _read(fd: int) -> bytes | None:
        try:
            return os.read(fd, MAX_FRAME)
        except OSError:
            return None

    @staticmethod
    def _write(fd: int, frame: bytes) -> bool:
        try:
            os.write(fd, frame)
        except OSError:
            return False
        return True

    # Probes from inside the guest -----------------------------------------------------------

    def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a thread inside the guest namespace."""
        return run_in_netns(self.netns, fn)

    def ping(self, destination: str | ipaddress.IPv4Address, **options: Any) -> bool:
        """`ping()` from the guest (same keyword options)."""
        return ping(self.netns, destination, **options)

    def udp_request(
        self,
        destination: str | ipaddress.IPv4Address,
        port: int,
        payload: bytes = b"netvm",
        **options: Any,
    ) -> bytes | None:
        """`udp_request()` from the guest (same keyword options)."""
        return udp_request(self.netns, destination, port, payload, **options)


@contextmanager
def emulate_guest(
    network: VmNetwork,
    host_netns: str | None,
    *,
    mtu: int = 1500,
    mac: bytes | None = None,
    tap: TapOptions | None = None,
    prefix: str = "netvm-guest-",
) -> Iterator[GuestEmulator]:
    """`with emulate_guest(vm, host_netns, mtu=config.mtu) as guest: guest.ping(gw)`.
    `prefix`: the start of the guest namespace's name (a test cleaning up by prefix)."""
    with GuestEmulator(network, host_netns, mtu=mtu, mac=mac, tap=tap, prefix=prefix) as guest:
        yield guest
