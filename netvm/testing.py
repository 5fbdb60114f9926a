"""Helpers for tests of code that uses netvm: namespaces, a small internet, emulated guests.

- `throwaway_netns`, `create_netns`, `delete_netns`: named network namespaces made the way
  `ip netns add` makes them (unshare in a thread, bind-mounted under /run/netns), so
  `ip netns list` shows them and `ip netns exec` works in them.
- `internet_topology`: a "host" namespace whose uplink (a veth named like the configured
  egress interface) leads to an "internet" namespace with one TEST-NET-3 address.
- `GuestEmulator` / `emulate_guest`: plays the VM behind a TAP that `attach` made, with a
  real kernel network stack in a "guest" namespace and a frame pump between the two TAPs.
- `run_in_netns`, `ping`, `udp_request`, `UdpEchoServer`, `FrameCapture`: probes that run
  on threads inside a namespace. `snapshot`: netvm's state for before/after comparisons.

Nothing here starts a process or changes the caller's own namespace: namespace work runs on
threads that entered the namespace with setns().
"""

from __future__ import annotations

import contextlib
import ctypes
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
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute

from netvm.backends.base import FILTER, NAT, Backend, TapOptions
from netvm.backends.iptables import load_iptc
from netvm.backends.netns import CLONE_NEWNET, NETNS_RUN_DIR, NamespaceThread, netns_path
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
from netvm.errors import NetvmError, host_error
from netvm.naming import VmNetwork, format_mac

MS_BIND = 0x1000
MNT_DETACH = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def _fail(operation: str, device: str) -> None:
    raise host_error(operation, device, ctypes.get_errno() or errno.EIO)


def create_netns(name: str) -> None:
    """Create the named network namespace /run/netns/NAME (EEXIST if it exists)."""
    NETNS_RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = NETNS_RUN_DIR / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
    except OSError as exc:
        raise host_error("create network namespace", str(path), exc.errno or errno.EIO) from None
    os.close(fd)
    failure: list[BaseException] = []

    def make() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                _fail("unshare network namespace", name)
            source = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
            if _libc.mount(source, str(path).encode(), None, MS_BIND, None) != 0:
                _fail("bind-mount network namespace", str(path))
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=make, name=f"netvm-create-{name}")
    worker.start()
    worker.join()
    if failure:
        path.unlink(missing_ok=True)
        raise failure[0]


def delete_netns(name: str) -> None:
    """Delete a named network namespace; one that is gone already is success."""
    path = NETNS_RUN_DIR / name
    if not path.exists():
        return
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0 and ctypes.get_errno() != errno.EINVAL:
        _fail("unmount network namespace", str(path))
    path.unlink(missing_ok=True)


@contextmanager
def throwaway_netns(prefix: str = "netvm-") -> Iterator[str]:
    """A fresh, randomly named network namespace, deleted on exit (also on error or ^C)."""
    name = f"{prefix}{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


CAP_NET_ADMIN = 12


def kernel_unavailable() -> str | None:
    """Why netvm cannot act on the kernel here (no CAP_NET_ADMIN, no /dev/net/tun, no
    python-iptables libraries), or None when it can: for skipping one's own kernel tests."""
    with open("/proc/self/status") as status:
        caps = next((line for line in status if line.startswith("CapEff:")), "CapEff: 0")
    if not int(caps.split()[1], 16) >> CAP_NET_ADMIN & 1:
        return "needs CAP_NET_ADMIN (run as root)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    try:
        load_iptc()
    except NetvmError as exc:
        return f"needs python-iptables with Debian's iptables package: {exc}"
    return None


def snapshot(backend: Backend) -> dict[str, Any]:
    """The state netvm cares about, by name (not index), for before/after comparisons."""
    links = backend.list_links()
    names = {link.index: link.name for link in links}
    return {
        "links": sorted(
            (
                link.name,
                link.kind,
                names.get(link.master) if link.master else None,
                link.mtu,
                link.up,
                link.alias,
                link.tap,
            )
            for link in links
        ),
        "addresses": sorted((names[a.index], str(a.interface)) for a in backend.list_addresses()),
        "ip_forward": backend.get_ip_forward(),
        "rules": {
            table: {chain: backend.list_rules(table, chain) for chain in backend.list_chains(table)}
            for table in (FILTER, NAT)
        },
    }


# Running code inside a namespace ----------------------------------------------------------

T = TypeVar("T")

PING_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
IP_UDP_HEADERS = 28
"""IPv4 (20) and UDP or ICMP echo (8) header bytes: payload + 28 = the IP packet's size."""


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread inside `netns` (None: this process's own) and return its result.

    Sockets, TUN descriptors and /proc/sys/net files that `fn` opens belong to that namespace.
    The calling thread's namespace is never changed.
    """
    worker = NamespaceThread(netns)
    try:
        return worker.call(fn)
    finally:
        worker.stop()


def _allow_ping() -> None:
    """Let every group use ICMP datagram ("ping") sockets in the calling thread's namespace."""
    with open(PING_GROUP_RANGE, "w") as switch:
        switch.write("0 2147483647\n")


def _up_loopback(ipr: Any) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _unreached(exc: OSError) -> bool:
    """Errors that mean "the packet did not get there", not "the probe is broken"."""
    return exc.errno in (
        errno.EMSGSIZE,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ECONNREFUSED,
        errno.EHOSTDOWN,
    )


def _dont_fragment(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)


IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2


def ping(
    netns: str | None,
    destination: str | ipaddress.IPv4Address,
    *,
    payload: int = 56,
    timeout: float = 1.0,
    dont_fragment: bool = False,
) -> bool:
    """Send one ICMP echo request from inside `netns`; True if the matching reply came back.

    Uses an ICMP datagram socket, so the namespace's net.ipv4.ping_group_range must allow it
    (the namespaces made by this module do). With `dont_fragment`, a packet larger than the
    path MTU is refused (False) instead of fragmented. The IP packet is `payload + 28` bytes.
    """
    target = str(destination)

    def probe() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) as sock:
            if dont_fragment:
                _dont_fragment(sock)
            sequence = secrets.randbelow(1 << 16)
            body = secrets.token_bytes(payload)
            header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, 0, sequence)
            deadline = time.monotonic() + timeout
            try:
                sock.sendto(header + body, (target, 0))
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    data, peer = sock.recvfrom(65535)
                    kind, _, _, _, seq = struct.unpack("!BBHHH", data[:8])
                    if (kind, seq, peer[0], data[8:]) == (ICMP_ECHO_REPLY, sequence, target, body):
                        return True
            except TimeoutError:
                return False
            except OSError as exc:
                if _unreached(exc):
                    return False
                raise
            return False

    return run_in_netns(netns, probe)


def udp_request(
    netns: str | None,
    destination: str | ipaddress.IPv4Address,
    port: int,
    payload: bytes = b"netvm",
    *,
    timeout: float = 1.0,
    dont_fragment: bool = False,
) -> bytes | None:
    """Send one UDP datagram from a fresh socket inside `netns`; return the reply or None.

    Only a datagram from (`destination`, `port`) counts as the reply. With `dont_fragment`,
    a datagram larger than the path MTU is refused (None) instead of fragmented.
    """
    target = str(destination)

    def probe() -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if dont_fragment:
                _dont_fragment(sock)
            deadline = time.monotonic() + timeout
            try:
                sock.sendto(payload, (target, port))
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    data, peer = sock.recvfrom(65535)
                    if peer == (target, port):
                        return data
            except TimeoutError:
                return None
            except OSError as exc:
                if _unreached(exc):
                    return None
                raise
            return None

    return run_in_netns(netns, probe)


class UdpEchoServer:
    """A UDP echo server on a thread inside `netns` that records who sent each datagram.

    `peers` lists the (address, port) of every datagram received, in order: what a host
    "on the internet" sees of a masqueraded guest. Use it as a context manager.
    """

    def __init__(
        self, netns: str | None, address: str | ipaddress.IPv4Address = "0.0.0.0", port: int = 0
    ) -> None:
        self.netns = netns
        self.peers: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._sock = run_in_netns(netns, lambda: self._bind(str(address), port))
        self.address, self.port = self._sock.getsockname()
        self._thread = threading.Thread(target=self._serve, name="netvm-udp-echo", daemon=True)
        self._thread.start()

    def _bind(self, address: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop in ready:
                return
            data, peer = self._sock.recvfrom(65535)
            with self._lock:
                self.peers.append((peer[0], peer[1]))
            with contextlib.suppress(OSError):
                self._sock.sendto(data, peer)

    def seen(self) -> list[str]:
        """The source addresses seen so far, in order."""
        with self._lock:
            return [address for address, _ in self.peers]

    def close(self) -> None:
        if self._thread.is_alive():
            os.eventfd_write(self._stop, 1)
            self._thread.join()
        self._sock.close()
        with contextlib.suppress(OSError):
            os.close(self._stop)

    def __enter__(self) -> UdpEchoServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# A host with an uplink to a small "internet" ---------------------------------------------

INTERNET_IFACE = "isp0"


@dataclass(frozen=True)
class Topology:
    """Two namespaces linked by a veth pair: the VM host, and an "internet" with one host.

    The host's end of the veth is named like the egress interface netvm is configured with,
    carries `uplink` and a default route via `internet`; the internet side carries
    `internet` and a default route back via the uplink, so a packet that leaves the host
    un-masqueraded still reaches it (and can be seen with its private source).
    """

    host_netns: str
    internet_netns: str
    egress_iface: str
    uplink: ipaddress.IPv4Interface
    internet: ipaddress.IPv4Interface
    internet_iface: str = INTERNET_IFACE


@contextmanager
def internet_topology(
    egress_iface: str = "eth0",
    *,
    prefix: str = "netvm-",
    uplink: str = "203.0.113.2/24",
    internet: str = "203.0.113.1/24",
) -> Iterator[Topology]:
    """Build a `Topology` (two fresh namespaces), yield it, and delete both on exit.

    Addresses default to TEST-NET-3 (203.0.113.0/24, RFC 5737). Nothing is created in the
    caller's namespace; ICMP datagram sockets are allowed in both namespaces.
    """
    up = ipaddress.IPv4Interface(uplink)
    far = ipaddress.IPv4Interface(internet)
    if up.network != far.network or up.ip == far.ip:
        raise ValueError(f"uplink {up} and internet {far} must be two addresses of one network")
    with (
        throwaway_netns(f"{prefix}host-") as host,
        throwaway_netns(f"{prefix}inet-") as inet,
    ):

        def build_host() -> None:
            _allow_ping()
            target = os.open(netns_path(inet), os.O_RDONLY | os.O_CLOEXEC)
            ipr = IPRoute()
            try:
                _up_loopback(ipr)
                ipr.link(
                    "add",
                    ifname=egress_iface,
                    kind="veth",
                    peer={"ifname": INTERNET_IFACE, "net_ns_fd": target},
                )
                index = ipr.link_lookup(ifname=egress_iface)[0]
                ipr.addr("add", index=index, address=str(up.ip), prefixlen=up.network.prefixlen)
                ipr.link("set", index=index, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=str(far.ip))
            finally:
                ipr.close()
                os.close(target)

        def build_internet() -> None:
            _allow_ping()
            ipr = IPRoute()
            try:
                _up_loopback(ipr)
                index = ipr.link_lookup(ifname=INTERNET_IFACE)[0]
                ipr.addr("add", index=index, address=str(far.ip), prefixlen=far.network.prefixlen)
                ipr.link("set", index=index, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=str(up.ip))
            finally:
                ipr.close()

        run_in_netns(host, build_host)
        run_in_netns(inet, build_internet)
        yield Topology(host, inet, egress_iface, up, far)


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


def _wait_until_passing(name: str, timeout: float = 3.0) -> None:
    """Wait until the kernel has acted on the TAP's carrier-on (bounded by `timeout`).

    Opening a TAP turns its carrier on at once, but the kernel applies that (operstate, qdisc
    activation, bridge port state) from its link-watch work, which it runs at most once a
    second for all namespaces: until then the host drops the guest's first frames. A TAP
    that is administratively down is not waited for.
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
            run_in_netns(self.host_netns, lambda: _wait_until_passing(self.network.tap_name))
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
        _allow_ping()
        net = self.network
        fd = _open_tap(GUEST_IFACE, IFF_TAP | IFF_NO_PI)
        try:
            ipr = IPRoute()
            try:
                _up_loopback(ipr)
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
) -> Iterator[GuestEmulator]:
    """`with emulate_guest(vm, host_netns, mtu=config.mtu) as guest: guest.ping(gw)`."""
    with GuestEmulator(network, host_netns, mtu=mtu, mac=mac, tap=tap) as guest:
        yield guest


# Frames on a link ------------------------------------------------------------------------

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@dataclass(frozen=True)
class Frame:
    """One Ethernet frame seen on a link: who sent it, to whom, which protocol."""

    source: bytes
    destination: bytes
    ethertype: int
    outgoing: bool
    """True for a frame the namespace sent out on the link, False for one it received."""


class FrameCapture:
    """Records the Ethernet headers of frames on `ifname` in `netns` (an AF_PACKET socket).

    On a host TAP, received (not outgoing) frames are the ones the guest sent.
    """

    def __init__(self, netns: str | None, ifname: str) -> None:
        self.frames: list[Frame] = []
        self._lock = threading.Lock()
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._sock = run_in_netns(netns, lambda: self._open(ifname))
        self._thread = threading.Thread(target=self._run, name="netvm-capture", daemon=True)
        self._thread.start()

    @staticmethod
    def _open(ifname: str) -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.bind((ifname, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        stopping = False
        while True:
            ready = {fd for fd, _ in poller.poll(0 if stopping else None)}
            if self._stop in ready:
                # Read what is queued already before stopping.
                stopping = True
                poller.unregister(self._stop)
            if self._sock.fileno() not in ready:
                if stopping:
                    return
                continue
            try:
                data, where = self._sock.recvfrom(MAX_FRAME)
            except OSError:
                return
            if len(data) < 14:
                continue
            (ethertype,) = struct.unpack("!H", data[12:14])
            frame = Frame(data[6:12], data[0:6], ethertype, where[2] == PACKET_OUTGOING)
            with self._lock:
                self.frames.append(frame)

    def received(self) -> list[Frame]:
        with self._lock:
            return [frame for frame in self.frames if not frame.outgoing]

    def close(self) -> None:
        if self._thread.is_alive():
            os.eventfd_write(self._stop, 1)
            self._thread.join()
        self._sock.close()
        with contextlib.suppress(OSError):
            os.close(self._stop)

    def __enter__(self) -> FrameCapture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
