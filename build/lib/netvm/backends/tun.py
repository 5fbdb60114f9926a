"""TUN/TAP devices through /dev/net/tun ioctls (no netlink, no process)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from netvm.backends.base import TapOptions
from netvm.config import IFNAMSIZ
from netvm.errors import host_error

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000

TUN_DEVICE = "/dev/net/tun"


def tap_flags(options: TapOptions) -> int:
    flags = IFF_TAP | IFF_NO_PI
    if options.multi_queue:
        flags |= IFF_MULTI_QUEUE
    if options.vnet_hdr:
        flags |= IFF_VNET_HDR
    return flags


def ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def open_tun() -> int:
    """A /dev/net/tun descriptor: a TAP made through it lands in the namespace of the thread
    that opened it, whichever thread later issues TUNSETIFF."""
    try:
        return os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise host_error("open " + TUN_DEVICE, None, exc.errno or errno.EIO) from None


def create_persistent_tap(name: str, options: TapOptions, fd: int) -> None:
    """Create a persistent TAP through `fd` (see open_tun; consumed: always closed).

    IFF_TUN_EXCL makes the kernel refuse (EBUSY) when any device has that name, so an
    existing TAP is never silently reused. If a step fails before TUNSETPERSIST, closing
    the descriptor removes the half-made device.
    """
    if len(name.encode()) >= IFNAMSIZ:
        os.close(fd)
        raise host_error("create tap", name, errno.ERANGE)
    operation = "create tap"
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifreq(name, tap_flags(options) | IFF_TUN_EXCL))
        if options.owner is not None:
            operation = "set tap owner"
            fcntl.ioctl(fd, TUNSETOWNER, _as_c_int(options.owner))
        if options.group is not None:
            operation = "set tap group"
            fcntl.ioctl(fd, TUNSETGROUP, _as_c_int(options.group))
        operation = "make tap persistent"
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        raise host_error(operation, name, exc.errno or errno.EIO) from None
    finally:
        os.close(fd)


def _as_c_int(value: int) -> int:
    """An unsigned uid/gid as the C int fcntl.ioctl passes (the kernel reads it unsigned)."""
    return value - (1 << 32) if value >= 1 << 31 else value
